//! Stage (c): the MoVQ autoencoder on the synthetic world — reconstruction (MSE) plus the VQ
//! codebook and commitment losses. Kandinsky's pipelines never quantise: they encode to the
//! unquantised latent and decode the UNet's continuous latents with `force_not_quantize`. The
//! decoder can be trained on quantised latents (the straight-through estimator, as VQ-GAN) or on
//! the unquantised ones the pipelines give it ([`MovqLoss::quantised`]); the codebook and
//! commitment losses train either way, so the codebook stays usable.

use super::checkpoint;
use super::shapes::{
    planar_batch, planar_images, splitmix64, training_example, training_examples, Example, Rng,
};
use super::trainer::{parse_config, run_loop, TrainOptions, TrainReport};
use candle_core::Tensor;
use kandinsky::error::{Error, Result};
use kandinsky::loading::Weights;
use kandinsky::models::{VQModel, VQModelConfig};
use kandinsky::utils::torch_utils::TorchGenerator;
use std::path::PathBuf;

/// The MoVQ of our small Kandinsky: 64×64 images, 3 levels (16×16×4 latents), a 256-entry
/// codebook, SpatialNorm decoder.
pub const SMALL_MOVQ_CONFIG: &str = r#"{
  "_class_name": "VQModel",
  "act_fn": "silu",
  "block_out_channels": [32, 64, 64],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
  "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "force_upcast": false,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 1,
  "lookup_from_codebook": false,
  "mid_block_add_attention": true,
  "norm_num_groups": 32,
  "norm_type": "spatial",
  "num_vq_embeddings": 256,
  "out_channels": 3,
  "sample_size": 64,
  "scaling_factor": 0.18215,
  "vq_embed_dim": 4
}"#;

/// [`SMALL_MOVQ_CONFIG`] with `latent_channels` channels in its latent (and codebook vectors)
/// and `codebook_size` codebook entries.
pub fn small_movq_config(latent_channels: usize, codebook_size: usize) -> Result<String> {
    let mut value = parse_config(SMALL_MOVQ_CONFIG, "movq")?;
    value["num_vq_embeddings"] = codebook_size.into();
    value["latent_channels"] = latent_channels.into();
    value["vq_embed_dim"] = latent_channels.into();
    serde_json::to_string_pretty(&value).map_err(|source| Error::Json {
        path: PathBuf::from("(movq config)"),
        source,
    })
}

/// A batch of synthetic images `(B, 3, S, S)` in [-1, 1]: examples `first..first + batch`.
pub fn image_batch(seed: u64, first: u64, batch: usize, side: usize) -> Result<Tensor> {
    image_tensor(&training_examples(seed, first, batch, side), side)
}

/// Training image `index` of the MoVQ (`side × side` RGB8, HWC): with probability `collage`
/// (drawn from the image's own stream; even sides only) a 2×2 collage of four training renders
/// at `side / 2`, otherwise the training render at `side`. An autoencoder needs no caption, and
/// small objects' corners, which it learns last, are a few percent of a single render's pixels.
/// A pure function of its arguments.
pub fn movq_image(seed: u64, index: u64, side: usize, collage: f32) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xc0_11a6e);
    if collage <= 0.0 || rng.unit() >= collage || side < 2 || side % 2 == 1 {
        return training_example(seed, index, side).image;
    }
    let half = side / 2;
    let mut out = vec![0u8; side * side * 3];
    for q in 0..4u64 {
        // Indices of their own, far from the single renders'.
        let part = training_example(
            seed,
            (1u64 << 62).wrapping_add(index.wrapping_mul(4)) + q,
            half,
        )
        .image;
        let (ox, oy) = ((q as usize % 2) * half, (q as usize / 2) * half);
        for y in 0..half {
            let row = ((oy + y) * side + ox) * 3;
            out[row..row + half * 3].copy_from_slice(&part[y * half * 3..(y + 1) * half * 3]);
        }
    }
    out
}

/// The MoVQ's training batch: images `first..first + batch` of [`movq_image`] in [-1, 1].
pub fn movq_batch(
    seed: u64,
    first: u64,
    batch: usize,
    side: usize,
    collage: f32,
) -> Result<Tensor> {
    let images: Vec<Vec<u8>> = (0..batch as u64)
        .map(|i| movq_image(seed, first + i, side, collage))
        .collect();
    let images: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    planar_images(&images, side, to_unit_range)
}

/// A pixel byte in [-1, 1] (`x / 127.5 - 1`).
fn to_unit_range(_channel: usize, v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// The examples' images in [-1, 1] (`x / 127.5 - 1`), `(B, 3, S, S)`.
pub fn image_tensor(examples: &[Example], side: usize) -> Result<Tensor> {
    planar_batch(examples, side, to_unit_range)
}

/// How the MoVQ's decoder is trained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MovqLoss {
    /// Decode the quantised latents (straight-through) rather than the unquantised ones that
    /// Kandinsky's pipelines decode.
    pub quantised: bool,
    /// Weight of an L1 pixel loss added to the MSE (0: MSE only). L1 keeps pulling at small
    /// errors, which MSE all but ignores: flat colours and sharp corners.
    pub l1: f64,
    /// Fraction of the training images that are collages ([`movq_image`]): four half-size
    /// renders in a 2×2 grid, so that a step sees four times the edges and corners.
    pub collage: f32,
    /// Train the decoder alone ([`decoder_composite_loss`], always on the unquantised latents:
    /// `quantised` does not apply): the encoder, codebook and latent scale stay as they are, so
    /// every network trained on the latents stays valid.
    pub decoder_only: bool,
    /// With `decoder_only`: the fraction of the images whose latents are composites, a random
    /// rectangle of latent cells taken from another image of the batch.
    pub composite: f32,
    /// With `composite`: half of the composites get Gaussian noise of a standard deviation
    /// uniform in `[0, foreign_noise]` on their foreign cells, and their loss counts only their
    /// own pixels (0: none). A UNet's latents in a repainted area are seldom clean encodings;
    /// the decoder must keep the other pixels whatever they hold.
    pub foreign_noise: f32,
}

impl Default for MovqLoss {
    fn default() -> Self {
        Self {
            quantised: true,
            l1: 0.0,
            collage: 0.0,
            decoder_only: false,
            composite: 0.0,
            foreign_noise: 0.0,
        }
    }
}

/// `(total, reconstruction MSE)` of the decoder alone, on unquantised latents (as the pipelines
/// decode them) of which a `how.composite` fraction are composites: a random rectangle of latent
/// cells comes from the next image of the batch, and the target is the same composite of the
/// two images' pixels. An inpainting pipeline decodes such latents (the kept area's next to the
/// generated ones), and a decoder that spreads the generated cells into the kept pixels changes
/// what the user kept; this teaches it to decode each cell's pixels from the cells around it.
pub fn decoder_composite_loss(
    movq: &VQModel,
    x: &Tensor,
    how: MovqLoss,
    rng: &mut Rng,
) -> Result<(Tensor, Tensor)> {
    let z = movq.encode(x)?.detach();
    let (zc, xc, keep) = composites(&z, x, how.composite, rng)?;
    let (zc, weights) = if how.foreign_noise > 0.0 {
        let b = z.dim(0)?;
        let sigma: Vec<f32> = (0..b)
            .map(|_| {
                if rng.unit() < 0.5 {
                    rng.unit() * how.foreign_noise
                } else {
                    0.0
                }
            })
            .collect();
        let noised: Vec<f32> = sigma.iter().map(|&s| (s > 0.0) as u8 as f32).collect();
        let sigma = Tensor::from_vec(sigma, (b, 1, 1, 1), z.device())?;
        let noised = Tensor::from_vec(noised, (b, 1, 1, 1), z.device())?;
        let foreign = (1.0 - &keep)?;
        let noise = TorchGenerator::new(rng.next_u64()).randn(z.shape(), z.device())?;
        let zc = (zc + noise.broadcast_mul(&foreign.broadcast_mul(&sigma)?)?)?;
        let foreign_px = foreign.upsample_nearest2d(x.dim(2)?, x.dim(3)?)?;
        let weights = (1.0 - foreign_px.broadcast_mul(&noised)?)?;
        (zc, Some(weights))
    } else {
        (zc, None)
    };
    decoded_loss(movq, &zc, &xc, weights.as_ref(), how.l1)
}

/// `(MSE + l1 · L1, MSE)` of `movq`'s decoding of `z` against `x`, each the mean over the pixels
/// that `weights (B, 1, H, W)` count (all of them without weights).
fn decoded_loss(
    movq: &VQModel,
    z: &Tensor,
    x: &Tensor,
    weights: Option<&Tensor>,
    l1: f64,
) -> Result<(Tensor, Tensor)> {
    let diff = (movq.decode(z, true)? - x)?;
    let weighted_mean = |t: Tensor| -> Result<Tensor> {
        Ok(match weights {
            None => t.mean_all()?,
            Some(w) => {
                let counted = (w.sum_all()? * x.dim(1)? as f64)?;
                t.broadcast_mul(w)?.sum_all()?.broadcast_div(&counted)?
            }
        })
    };
    let rec = weighted_mean(diff.sqr()?)?;
    let total = if l1 > 0.0 {
        (&rec + (weighted_mean(diff.abs()?)? * l1)?)?
    } else {
        rec.clone()
    };
    Ok((total, rec))
}

/// The decoder UNet's own latents for training images: each image encoded, noised part of the
/// way and denoised again by a trained decoder pipeline (image-to-image with the image's own
/// caption and CLIP embedding). They are what the MoVQ decoder is given at sampling time, with
/// the UNet's errors (soft corners, a tab or bump on a small square), and the image they came from
/// is the target, so a decoder trained on them learns to draw the intended image from them.
pub struct RefinedLatents {
    /// `(N, C, h, w)`.
    latents: Tensor,
    /// The training example ([`training_example`]) of each row.
    indices: Vec<u64>,
    /// The data seed of the examples.
    seed: u64,
}

/// How [`refine_latents`] builds its latents.
#[derive(Debug, Clone, Copy)]
pub struct RefineSettings {
    /// Training examples `0..n`.
    pub n: usize,
    /// Sampler steps of the whole schedule (image-to-image runs the last `strength` of them).
    pub steps: usize,
    /// Classifier-free guidance.
    pub guidance: f64,
    /// Each chunk's strength is uniform in this range.
    pub strength: (f64, f64),
    /// Examples denoised together (one strength and generator each).
    pub chunk: usize,
    /// Data seed.
    pub seed: u64,
    /// Image side.
    pub side: usize,
}

/// Builds [`RefinedLatents`] with `decoder` (either family) and the prior pipeline's CLIP image
/// encoder, the chunks shared over `threads` threads (each chunk's output depends only on its
/// index, so the result does not depend on `threads`). `progress(done, n)` after each chunk.
pub fn refine_latents(
    decoder: &super::eval::EvalDecoder,
    prior: &kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::KandinskyPriorPipeline,
    s: &RefineSettings,
    threads: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<RefinedLatents> {
    use super::eval::EvalDecoder;
    use kandinsky::pipelines::decoder::DecoderParams;
    let (lo, hi) = s.strength;
    if s.n == 0 || s.chunk == 0 || s.steps == 0 || !(0.0 < lo && lo <= hi && hi <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "refined latents need n, chunk and steps ≥ 1 and 0 < strength ≤ 1, got {s:?}"
        )));
    }
    let params = DecoderParams {
        height: s.side,
        width: s.side,
        steps: s.steps,
        guidance_scale: s.guidance,
    };
    let firsts: Vec<usize> = (0..s.n).step_by(s.chunk).collect();
    let chunk = |c: usize| -> Result<Tensor> {
        let first = firsts[c];
        let n = s.chunk.min(s.n - first);
        let examples = training_examples(s.seed, first as u64, n, s.side);
        let images = image_tensor(&examples, s.side)?;
        let emb = examples
            .iter()
            .map(|e| prior.embed_image(s.side, s.side, &e.image))
            .collect::<Result<Vec<_>>>()?;
        let emb = Tensor::cat(&emb, 0)?;
        let neg = prior.zero_image_embeds(n)?;
        let mut rng = Rng::new(splitmix64(splitmix64(s.seed ^ 0x5e_f14e) ^ c as u64));
        let strength = lo + (hi - lo) * rng.unit() as f64;
        let mut gen = TorchGenerator::new(rng.next_u64());
        let noop = &mut |_: usize, _: usize| {};
        match decoder {
            EvalDecoder::V21(d) => {
                let captions: Vec<String> = examples.iter().map(|e| e.caption.clone()).collect();
                d.img2img_latents(
                    &captions, None, &images, &emb, &neg, params, strength, &mut gen, noop,
                )
            }
            EvalDecoder::V22(d) => {
                d.img2img_latents(&images, &emb, &neg, params, strength, &mut gen, noop)
            }
        }
    };
    let done = std::sync::atomic::AtomicUsize::new(0);
    let latents = super::threads::try_map_on_threads(threads, firsts.len(), |c| {
        let latents = chunk(c)?.detach();
        let n = latents.dim(0)?;
        progress(
            done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n,
            s.n,
        );
        Ok::<_, Error>(latents)
    })?;
    RefinedLatents::new(
        Tensor::cat(&latents, 0)?.contiguous()?,
        (0..s.n as u64).collect(),
        s.seed,
    )
}

impl RefinedLatents {
    /// `latents (N, C, h, w)` of the training examples `indices` (N ≥ 1 of them) of data seed
    /// `seed`.
    pub fn new(latents: Tensor, indices: Vec<u64>, seed: u64) -> Result<Self> {
        if latents.dims4()?.0 != indices.len() || indices.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} refined latents for {} example indices",
                latents.dim(0)?,
                indices.len()
            )));
        }
        Ok(Self {
            latents,
            indices,
            seed,
        })
    }

    /// `(N, C, h, w)`.
    pub fn latents(&self) -> &Tensor {
        &self.latents
    }

    /// The training example of each row.
    pub fn indices(&self) -> &[u64] {
        &self.indices
    }

    /// The data seed of the examples.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Writes them to `path` (safetensors, atomically).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let dev = self.latents.device();
        let idx: Vec<i64> = self.indices.iter().map(|&i| i as i64).collect();
        let n = idx.len();
        let seed = self.seed.to_string().into_bytes();
        let sn = seed.len();
        let tensors: std::collections::HashMap<String, Tensor> = [
            ("latents".to_string(), self.latents.clone()),
            ("indices".to_string(), Tensor::from_vec(idx, n, dev)?),
            ("seed".to_string(), Tensor::from_vec(seed, sn, dev)?),
        ]
        .into_iter()
        .collect();
        checkpoint::write_atomic(path, &tensors)
    }

    /// Reads what [`RefinedLatents::save`] wrote.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let mut t = checkpoint::read_all(path)?;
        let mut take = |name: &str| {
            t.remove(name).ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                files: path.display().to_string(),
            })
        };
        let latents = take("latents")?;
        let indices: Vec<u64> = take("indices")?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|i| i as u64)
            .collect();
        let seed = String::from_utf8(take("seed")?.to_vec1::<u8>()?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::InvalidArgument(format!("{}: bad seed", path.display())))?;
        Self::new(latents, indices, seed).map_err(|e| e.within(path.display().to_string()))
    }

    /// `batch` rows drawn with `rng`: `(latents, images in [-1, 1])`.
    pub fn batch(&self, batch: usize, side: usize, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
        let rows: Vec<usize> = (0..batch).map(|_| rng.below(self.indices.len())).collect();
        let examples: Vec<Example> = rows
            .iter()
            .map(|&r| training_example(self.seed, self.indices[r], side))
            .collect();
        let x = image_tensor(&examples, side)?;
        let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let z = self
            .latents
            .index_select(&Tensor::new(rows.as_slice(), self.latents.device())?, 0)?;
        Ok((z, x))
    }
}

/// `(total, reconstruction MSE)` losses of one batch.
pub fn movq_loss(movq: &VQModel, x: &Tensor, how: MovqLoss) -> Result<(Tensor, Tensor)> {
    let z = movq.encode(x)?;
    let zq = movq.quantizer().lookup(&z)?;
    let codebook = (&zq - z.detach())?.sqr()?.mean_all()?;
    let commitment = (&z - zq.detach())?.sqr()?.mean_all()?;
    let decoded = if how.quantised {
        (&z + (&zq - &z)?.detach())?
    } else {
        z
    };
    let diff = (movq.decode(&decoded, true)? - x)?;
    let rec = diff.sqr()?.mean_all()?;
    let mut total = ((&rec + codebook)? + (commitment * 0.25)?)?;
    if how.l1 > 0.0 {
        total = (total + (diff.abs()?.mean_all()? * how.l1)?)?;
    }
    Ok((total, rec))
}

/// `1 / std` of the (unquantised, as the pipelines use them) latents of 256 held-aside training
/// images (a stream of their own, so the value depends only on the weights and the seed), or 1
/// when they are constant.
pub fn latent_scale(movq: &VQModel, seed: u64, side: usize) -> Result<f64> {
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0usize);
    for chunk in 0..8u64 {
        let x = image_batch(seed ^ 0x1a7e_5ca1e, chunk * 32, 32, side)?;
        let v: Vec<f32> = movq.encode(&x)?.flatten_all()?.to_vec1()?;
        n += v.len();
        for x in v {
            sum += x as f64;
            sum_sq += (x as f64) * (x as f64);
        }
    }
    let mean = sum / n as f64;
    let std = (sum_sq / n as f64 - mean * mean).max(0.0).sqrt();
    Ok(if std > 1e-6 { 1.0 / std } else { 1.0 })
}

/// Multiplies the MoVQ's latent space by `k` without changing what it computes: the encoder's
/// `quant_conv` and the codebook scale up, and every layer that reads the latent
/// (`post_quant_conv` and the decoder's SpatialNorm `conv_y`/`conv_b`) scales its weights down.
/// Kandinsky's pipelines have no latent scaling factor, so this is how the diffusion model gets
/// unit-variance latents (the same role as Stable Diffusion's `scaling_factor`).
pub fn standardise_latents(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    k: f64,
) -> Result<()> {
    for (name, t) in tensors.iter_mut() {
        let up = matches!(
            name.as_str(),
            "quant_conv.weight" | "quant_conv.bias" | "quantize.embedding.weight"
        );
        let down = name == "post_quant_conv.weight"
            || (name.starts_with("decoder.")
                && (name.ends_with("conv_y.weight") || name.ends_with("conv_b.weight")));
        if up {
            *t = (&*t * k)?;
        } else if down {
            *t = (&*t / k)?;
        }
    }
    Ok(())
}

/// Latents `z (B, C, h, w)` and images `x (B, 3, H, W)` where each row, with probability
/// `fraction` (batches of two or more), takes a random rectangle of latent cells from the next
/// row, and its pixels the same rectangle scaled to the image; and which latent cells are the
/// row's own `(B, 1, h, w)` (1) rather than the next row's (0).
fn composites(
    z: &Tensor,
    x: &Tensor,
    fraction: f32,
    rng: &mut Rng,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, _, h, w) = z.dims4()?;
    let (side_h, side_w) = (x.dim(2)?, x.dim(3)?);
    let mut keep = vec![1f32; b * h * w];
    if b > 1 {
        for r in 0..b {
            if rng.unit() >= fraction {
                continue;
            }
            let (rh, rw) = (1 + rng.below(h), 1 + rng.below(w));
            let (y0, x0) = (rng.below(h - rh + 1), rng.below(w - rw + 1));
            for y in y0..y0 + rh {
                keep[(r * h + y) * w + x0..(r * h + y) * w + x0 + rw].fill(0.0);
            }
        }
    }
    let next: Vec<u32> = (0..b).map(|i| ((i + 1) % b) as u32).collect();
    let next = Tensor::new(next.as_slice(), x.device())?;
    let keep = Tensor::from_vec(keep, (b, 1, h, w), x.device())?;
    let keep_px = keep.upsample_nearest2d(side_h, side_w)?;
    let mix = |a: &Tensor, k: &Tensor| -> Result<Tensor> {
        let other = a.index_select(&next, 0)?;
        Ok((a.broadcast_mul(k)? + other.broadcast_mul(&(1.0 - k)?)?)?)
    };
    Ok((mix(z, &keep)?, mix(x, &keep_px)?, keep))
}

/// A trained MoVQ to start from (`movq_dir`: its `config.json` and weights, as the MoVQ stage
/// exports them): the config's text and the parameters in f32.
pub fn movq_init(
    movq_dir: &std::path::Path,
) -> Result<(String, std::collections::HashMap<String, Tensor>)> {
    let config_path = movq_dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let store = kandinsky::loading::WeightStore::from_dir(movq_dir)?;
    let shapes = store.shapes();
    let weights = Weights::from_store(store, candle_core::DType::F32, &candle_core::Device::Cpu);
    let params = shapes
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), weights.get(shape.as_slice(), &name)?)))
        .collect::<Result<_>>()?;
    Ok((config, params))
}

/// Trains (or resumes training of) the MoVQ with the loss `how` and exports `out_dir/movq/`.
pub fn train_movq(
    opts: &TrainOptions,
    config_json: &str,
    how: MovqLoss,
    refined: Option<&RefinedLatents>,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    let config_value = parse_config(config_json, "movq")?;
    let config: VQModelConfig =
        serde_json::from_value(config_value.clone()).map_err(|source| Error::Json {
            path: PathBuf::from("(movq config)"),
            source,
        })?;
    if refined.is_some() && !how.decoder_only {
        return Err(Error::InvalidArgument(
            "refined latents train the MoVQ's decoder alone".into(),
        ));
    }
    if let Some(r) = refined {
        if r.seed != opts.seed {
            return Err(Error::InvalidArgument(format!(
                "the refined latents were built from seed {}'s examples, training uses seed {}",
                r.seed, opts.seed
            )));
        }
        let side = opts.image_size >> (config.block_out_channels.len().max(1) - 1);
        let want = [config.latent_channels, side, side];
        let (_, c, h, w) = r.latents.dims4()?;
        if [c, h, w] != want {
            return Err(Error::InvalidArgument(format!(
                "the refined latents are {c}x{h}x{w}, this MoVQ's latents of {0}x{0} images are \
                 {1}x{2}x{2}",
                opts.image_size, want[0], want[1]
            )));
        }
    }
    if how.decoder_only && opts.init.is_empty() {
        return Err(Error::InvalidArgument(
            "training the MoVQ's decoder alone needs a trained MoVQ to start from".into(),
        ));
    }
    run_loop(
        opts,
        |params| VQModel::new(&Weights::trainable(params), &config),
        |movq, step| {
            let x = movq_batch(
                opts.seed,
                step * opts.batch as u64,
                opts.batch,
                opts.image_size,
                how.collage,
            )?;
            if how.decoder_only {
                let mut rng = Rng::new(opts.seed ^ 0xdec0_de00 ^ step.wrapping_mul(0x2545_f491));
                let (total, rec) = decoder_composite_loss(movq, &x, how, &mut rng)?;
                match refined {
                    None => Ok((total, rec)),
                    // As many refined rows as plain ones, the two losses averaged.
                    Some(r) => {
                        let (z, xr) = r.batch(opts.batch, opts.image_size, &mut rng)?;
                        let (rt, rr) = decoded_loss(movq, &z, &xr, None, how.l1)?;
                        Ok((((total + rt)? * 0.5)?, ((rec + rr)? * 0.5)?))
                    }
                }
            } else {
                movq_loss(movq, &x, how)
            }
        },
        |params| {
            let mut tensors = params.tensors();
            // A decoder trained alone keeps its encoder's latents, already standardised: the
            // scale is 1 up to rounding, and rescaling would move what the UNets learnt.
            if !how.decoder_only {
                let movq = VQModel::new(&Weights::trainable(params), &config)?;
                let scale = latent_scale(&movq, opts.seed, opts.image_size)?;
                standardise_latents(&mut tensors, scale)?;
            }
            checkpoint::export_component(
                &opts.out_dir.join("movq"),
                &config_value,
                &tensors,
                "diffusion_pytorch_model.safetensors",
            )
        },
        log,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collages_tile_four_half_size_renders_and_are_off_by_default() -> Result<()> {
        let side = 64;
        // Without collages, the MoVQ's batch is the training renders, as before the option.
        let plain = movq_batch(5, 10, 3, side, 0.0)?;
        let reference = image_batch(5, 10, 3, side)?;
        assert_eq!(
            (plain - reference)?.abs()?.max_all()?.to_scalar::<f32>()?,
            0.0
        );
        // With every image a collage, each quadrant is a half-size training render.
        let image = movq_image(5, 7, side, 1.0);
        let half = side / 2;
        let mut quadrants = Vec::new();
        for q in 0..4 {
            let (ox, oy) = ((q % 2) * half, (q / 2) * half);
            let mut part = Vec::new();
            for y in 0..half {
                let row = ((oy + y) * side + ox) * 3;
                part.extend_from_slice(&image[row..row + half * 3]);
            }
            quadrants.push(part);
        }
        for (q, part) in quadrants.iter().enumerate() {
            let index = (1u64 << 62) + 7 * 4 + q as u64;
            assert_eq!(
                part,
                &training_example(5, index, half).image,
                "quadrant {q}"
            );
        }
        assert_ne!(quadrants[0], quadrants[1]);
        // A fraction: about that many collages, deterministically.
        let count = |f: f32| {
            (0..400)
                .filter(|&i| movq_image(1, i, side, f) != training_example(1, i, side).image)
                .count()
        };
        let n = count(0.5);
        assert!((150..=250).contains(&n), "{n} of 400 collages at 0.5");
        assert_eq!(n, count(0.5));
        Ok(())
    }

    #[test]
    fn composites_take_one_rectangle_from_the_next_image_in_latents_and_pixels() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        // Row r's latents are all r, its pixels all 10 + r: what a cell holds names its source.
        let (b, h, side) = (3usize, 4usize, 16usize);
        let z = Tensor::arange(0f32, b as f32, &dev)?
            .reshape((b, 1, 1, 1))?
            .broadcast_as((b, 2, h, h))?
            .contiguous()?;
        let x = (z.narrow(1, 0, 1)?.upsample_nearest2d(side, side)? + 10.0)?
            .broadcast_as((b, 3, side, side))?
            .contiguous()?;
        let (zc, xc, keep) = composites(&z, &x, 1.0, &mut Rng::new(3))?;
        let keep: Vec<f32> = keep.flatten_all()?.to_vec1()?;
        let (zc, xc): (Vec<f32>, Vec<f32>) =
            (zc.flatten_all()?.to_vec1()?, xc.flatten_all()?.to_vec1()?);
        let f = side / h;
        for r in 0..b {
            let next = ((r + 1) % b) as f32;
            let cell = |c: usize, y: usize, x_: usize| zc[((r * 2 + c) * h + y) * h + x_];
            let mut taken = 0;
            for y in 0..h {
                for x_ in 0..h {
                    let v = cell(0, y, x_);
                    assert!(v == r as f32 || v == next, "row {r}: cell holds {v}");
                    assert_eq!(cell(1, y, x_), v, "row {r}: every channel alike");
                    taken += (v == next) as usize;
                    assert_eq!(keep[(r * h + y) * h + x_], (v == r as f32) as u8 as f32);
                    // The cell's pixels come from the same image, in every channel.
                    for c in 0..3 {
                        for py in y * f..(y + 1) * f {
                            for px in x_ * f..(x_ + 1) * f {
                                assert_eq!(xc[((r * 3 + c) * side + py) * side + px], 10.0 + v);
                            }
                        }
                    }
                }
            }
            assert!(taken > 0, "row {r}: every row is a composite at fraction 1");
        }
        // At fraction 0 nothing moves.
        let (z0, x0, _) = composites(&z, &x, 0.0, &mut Rng::new(3))?;
        assert_eq!((z0 - &z)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert_eq!((x0 - &x)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn refined_latents_round_trip_and_pair_each_latent_with_its_source_image() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (n, side) = (5usize, 16usize);
        // Row r's latents are all 100 + its example index: a batch row names its source.
        let indices: Vec<u64> = vec![3, 9, 4, 11, 0];
        let latents = Tensor::new(
            indices
                .iter()
                .map(|&i| 100.0 + i as f32)
                .collect::<Vec<_>>(),
            &dev,
        )?
        .reshape((n, 1, 1, 1))?
        .broadcast_as((n, 4, 2, 2))?
        .contiguous()?;
        let refined = RefinedLatents::new(latents, indices.clone(), u64::MAX - 7)?;
        let dir = tempfile::tempdir().map_err(|e| Error::io(std::path::Path::new("tmp"), e))?;
        let path = dir.path().join("refined.safetensors");
        refined.save(&path)?;
        let back = RefinedLatents::load(&path)?;
        assert_eq!(back.indices, indices);
        assert_eq!(back.seed, u64::MAX - 7);
        let same = (&back.latents - &refined.latents)?.abs()?.max_all()?;
        assert_eq!(same.to_scalar::<f32>()?, 0.0);
        let (z, x) = back.batch(8, side, &mut Rng::new(2))?;
        assert_eq!(z.dims4()?, (8, 4, 2, 2));
        for row in 0..8 {
            let index = (z.get(row)?.flatten_all()?.to_vec1::<f32>()?[0] - 100.0) as u64;
            assert!(indices.contains(&index));
            let want = image_tensor(&[training_example(u64::MAX - 7, index, side)], side)?;
            let diff = (x.get(row)?.unsqueeze(0)? - want)?.abs()?.max_all()?;
            assert_eq!(diff.to_scalar::<f32>()?, 0.0, "row {row}: its own image");
        }
        Ok(())
    }

    #[test]
    fn the_decoder_alone_trains_and_the_encoder_gets_no_gradient() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let config: VQModelConfig = serde_json::from_str(&small_movq_config(4, 16)?).unwrap();
        let params = kandinsky::loading::ParamStore::with_init(0, Default::default(), &dev);
        let movq = VQModel::new(&Weights::trainable(&params), &config)?;
        let x = movq_batch(0, 0, 2, 32, 0.0)?;
        let how = MovqLoss {
            decoder_only: true,
            composite: 1.0,
            ..Default::default()
        };
        let decoder_gradients_only = |loss: &Tensor| -> Result<()> {
            let grads = loss.backward()?;
            for (name, var) in params.vars() {
                let decoder = name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
                assert_eq!(
                    grads.get(var.as_tensor()).is_some(),
                    decoder,
                    "{name}: a gradient only for the decoder's parameters"
                );
            }
            Ok(())
        };
        let (loss, _) = decoder_composite_loss(&movq, &x, how, &mut Rng::new(1))?;
        decoder_gradients_only(&loss)?;
        // Noise on the foreign cells of half the composites: still the decoder's gradient only.
        let noisy = MovqLoss {
            foreign_noise: 2.0,
            ..how
        };
        let (ln, _) = decoder_composite_loss(&movq, &x, noisy, &mut Rng::new(1))?;
        decoder_gradients_only(&ln)?;
        assert!(ln.to_scalar::<f32>()?.is_finite());
        // Without composites the loss is the plain reconstruction of the unquantised latents.
        let plain = MovqLoss {
            composite: 0.0,
            ..how
        };
        let (l0, _) = decoder_composite_loss(&movq, &x, plain, &mut Rng::new(1))?;
        let direct = (movq.decode(&movq.encode(&x)?, true)? - &x)?
            .sqr()?
            .mean_all()?;
        assert_eq!(l0.to_scalar::<f32>()?, direct.to_scalar::<f32>()?);
        Ok(())
    }
}
