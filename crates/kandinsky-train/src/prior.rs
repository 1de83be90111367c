//! Stage (d): the diffusion prior, CLIP text → CLIP image embedding, on the synthetic world:
//! x0 prediction under the cosine (`squaredcos_cap_v2`) schedule the UnCLIP scheduler samples
//! with, in the space normalised by the prior's `clip_mean`/`clip_std` (set from the data), with
//! 10 % of captions dropped to `""` so classifier-free guidance works (the pipelines' negative is
//! the empty prompt).

use super::checkpoint;
use super::clip::clip_batch;
use super::shapes::Rng;
use super::trainer::{parse_config, run_loop, TrainOptions, TrainReport};
use candle_core::{Device, Tensor, D};
use kandinsky::error::{Error, Result};
use kandinsky::loading::{ParamStore, Weights};
use kandinsky::models::clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
use kandinsky::models::transformers::prior_transformer::{
    PriorTransformer, PriorTransformerConfig,
};
use kandinsky::schedulers::{alphas_cumprod, betas_for_alpha_bar};
use kandinsky::tokenization::PromptTokenizer;
use kandinsky::utils::torch_utils::TorchGenerator;
use std::path::PathBuf;

/// The small prior: 4 layers of 4 × 16 heads over 64-wide CLIP embeddings, 77 text tokens.
pub const SMALL_PRIOR_CONFIG: &str = r#"{
  "_class_name": "PriorTransformer",
  "added_emb_type": "prd",
  "additional_embeddings": 4,
  "attention_head_dim": 16,
  "clip_embed_dim": null,
  "dropout": 0.0,
  "embedding_dim": 64,
  "embedding_proj_dim": null,
  "embedding_proj_norm_type": null,
  "encoder_hid_proj_type": "linear",
  "norm_in_type": null,
  "num_attention_heads": 4,
  "num_embeddings": 77,
  "num_layers": 4,
  "time_embed_act_fn": "silu",
  "time_embed_dim": null
}"#;

/// Fraction of captions replaced by `""` during training.
pub const TEXT_DROPOUT: f32 = 0.1;

/// The frozen CLIP the prior learns to map between.
pub struct FrozenClip {
    /// Text tower.
    pub text: ClipTextModelWithProjection,
    /// Vision tower.
    pub vision: ClipVisionModelWithProjection,
    /// Its tokenizer.
    pub tokenizer: PromptTokenizer,
}

/// CLIP conditioning of a batch: `(text_embeds, last_hidden_state, mask, image_embeds)`.
pub type Conditioning = (Tensor, Tensor, Tensor, Tensor);

impl FrozenClip {
    /// Embeds examples `first..first + batch` (captions dropped to `""` with probability
    /// `dropout`, decided by `rng`).
    pub fn embed(
        &self,
        seed: u64,
        first: u64,
        batch: usize,
        side: usize,
        dropout: f32,
        rng: &mut Rng,
    ) -> Result<Conditioning> {
        let (pixels, captions) = clip_batch(seed, first, batch, side)?;
        let captions: Vec<String> = captions
            .into_iter()
            .map(|c| {
                if rng.unit() < dropout {
                    String::new()
                } else {
                    c
                }
            })
            .collect();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let tok = self.tokenizer.encode(&refs, &Device::Cpu)?;
        let text = self.text.forward(&tok.input_ids, None)?;
        let image = self.vision.forward(&pixels)?.image_embeds;
        // Frozen: no gradient flows into CLIP even when its towers are variables.
        Ok((
            text.text_embeds.detach(),
            text.last_hidden_state.detach(),
            tok.attention_mask,
            image.detach(),
        ))
    }
}

/// CLIP's outputs for training examples `0..len` and for the empty caption, computed once, so
/// that training draws batches from them instead of running both frozen towers every step
/// (about a quarter of a prior step). The image embeddings are of one render per example.
pub struct PriorPool {
    /// `(len + 1, D)`: the examples' text embeddings, then the empty caption's.
    text: Tensor,
    /// `(len + 1, 77, D)`: the same for the text tower's last hidden state.
    hidden: Tensor,
    /// `(len + 1, 77)`: the same for the attention masks.
    mask: Tensor,
    /// `(len, D)`: the examples' image embeddings.
    image: Tensor,
}

impl FrozenClip {
    /// The [`PriorPool`] of examples `0..size` of `seed`, `side` pixels wide (64 at a time, as
    /// [`embedding_stats`] and fresh batches embed them).
    pub fn pool(&self, seed: u64, size: usize, side: usize) -> Result<PriorPool> {
        if size == 0 {
            return Err(Error::InvalidArgument("the prior's pool is empty".into()));
        }
        let mut rng = Rng::new(0);
        let (mut text, mut hidden, mut mask, mut image) = (vec![], vec![], vec![], vec![]);
        for first in (0..size).step_by(64) {
            let (t, h, m, i) = self.embed(
                seed,
                first as u64,
                64.min(size - first),
                side,
                0.0,
                &mut rng,
            )?;
            text.push(t);
            hidden.push(h);
            mask.push(m);
            image.push(i);
        }
        let tok = self.tokenizer.encode(&[""], &Device::Cpu)?;
        let empty = self.text.forward(&tok.input_ids, None)?;
        text.push(empty.text_embeds.detach());
        hidden.push(empty.last_hidden_state.detach());
        mask.push(tok.attention_mask.to_dtype(mask[0].dtype())?);
        Ok(PriorPool {
            text: Tensor::cat(&text, 0)?,
            hidden: Tensor::cat(&hidden, 0)?,
            mask: Tensor::cat(&mask, 0)?,
            image: Tensor::cat(&image, 0)?,
        })
    }
}

impl PriorPool {
    /// Examples in the pool.
    pub fn len(&self) -> usize {
        self.image.dim(0).unwrap_or(0)
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A batch of `batch` examples drawn with `rng`, each caption dropped to `""` with
    /// probability `dropout`.
    pub fn batch(&self, batch: usize, dropout: f32, rng: &mut Rng) -> Result<Conditioning> {
        let n = self.len();
        let idx: Vec<u32> = (0..batch).map(|_| rng.below(n) as u32).collect();
        let text_idx: Vec<u32> = idx
            .iter()
            .map(|&i| if rng.unit() < dropout { n as u32 } else { i })
            .collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        let text_idx = Tensor::new(text_idx.as_slice(), &Device::Cpu)?;
        Ok((
            self.text.index_select(&text_idx, 0)?,
            self.hidden.index_select(&text_idx, 0)?,
            self.mask.index_select(&text_idx, 0)?,
            self.image.index_select(&idx, 0)?,
        ))
    }
}

/// The x0-prediction loss of one batch and the mean cosine similarity of the predictions with
/// the targets; per-sample timesteps and noise from `rng` / `generator`.
pub fn prior_loss(
    prior: &PriorTransformer,
    cond: &Conditioning,
    mean: &Tensor,
    std: &Tensor,
    rng: &mut Rng,
    generator: &mut TorchGenerator,
) -> Result<(Tensor, Tensor)> {
    let (text_embeds, hidden, mask, image) = cond;
    let b = image.dim(0)?;
    let x0 = image.broadcast_sub(mean)?.broadcast_div(std)?;
    let ac = alphas_cumprod(&betas_for_alpha_bar(1000));
    let ts: Vec<usize> = (0..b).map(|_| rng.below(1000)).collect();
    let sa: Vec<f32> = ts.iter().map(|&t| ac[t].sqrt()).collect();
    let sb: Vec<f32> = ts.iter().map(|&t| (1.0 - ac[t]).sqrt()).collect();
    let sa = Tensor::from_vec(sa, (b, 1), &Device::Cpu)?;
    let sb = Tensor::from_vec(sb, (b, 1), &Device::Cpu)?;
    let noise = generator.randn(x0.shape(), &Device::Cpu)?;
    let xt = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
    let tf: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
    let pred = prior.forward_timesteps(&xt, &tf, text_embeds, Some(hidden), Some(mask))?;
    let cosine = cosine(&pred.detach(), &x0)?;
    Ok(((pred - x0)?.sqr()?.mean_all()?, cosine))
}

/// `clip_mean` / `clip_std` of the image embeddings of examples `0..n` (per dimension).
pub fn embedding_stats(
    clip: &FrozenClip,
    seed: u64,
    n: usize,
    side: usize,
) -> Result<(Tensor, Tensor)> {
    let mut rng = Rng::new(0);
    let mut all = Vec::new();
    for first in (0..n).step_by(64) {
        let b = 64.min(n - first);
        all.push(clip.embed(seed, first as u64, b, side, 0.0, &mut rng)?.3);
    }
    let e = Tensor::cat(&all, 0)?;
    let mean = e.mean_keepdim(0)?;
    let std = (e.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    Ok((mean, std))
}

/// Trains (or resumes) the prior against a frozen CLIP and exports `out_dir/prior/`. With a
/// `pool` of examples the batches are drawn from CLIP's outputs for that many examples, computed
/// once ([`PriorPool`]); with 0 every step embeds fresh examples.
pub fn train_prior(
    opts: &TrainOptions,
    clip: &FrozenClip,
    pool: usize,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    let value = parse_config(SMALL_PRIOR_CONFIG, "prior")?;
    let config: PriorTransformerConfig =
        serde_json::from_value(value.clone()).map_err(|source| Error::Json {
            path: PathBuf::from("(prior config)"),
            source,
        })?;
    // The data statistics are a pure function of the seed, so a resumed run gets the same.
    let (mean, std) = embedding_stats(clip, opts.seed, 1024, opts.image_size)?;
    let pool = match pool {
        0 => None,
        n => Some(clip.pool(opts.seed, n, opts.image_size)?),
    };
    run_loop(
        opts,
        |params: &ParamStore| {
            let prior = PriorTransformer::new(&Weights::trainable(params), &config)?;
            for (name, var) in params.vars() {
                match name.as_str() {
                    "clip_mean" => var.set(&mean)?,
                    "clip_std" => var.set(&std)?,
                    _ => {}
                }
            }
            Ok(prior)
        },
        |prior, step| {
            let mut rng = Rng::new(opts.seed ^ 0x9e10 ^ step.wrapping_mul(0x1000_0001));
            let mut generator = TorchGenerator::new(opts.seed ^ step.wrapping_mul(7919));
            let cond = match &pool {
                Some(p) => p.batch(opts.batch, TEXT_DROPOUT, &mut rng)?,
                None => clip.embed(
                    opts.seed,
                    step * opts.batch as u64,
                    opts.batch,
                    opts.image_size,
                    TEXT_DROPOUT,
                    &mut rng,
                )?,
            };
            prior_loss(prior, &cond, &mean, &std, &mut rng, &mut generator)
        },
        |params| {
            checkpoint::export_component(
                &opts.out_dir.join("prior"),
                &value,
                &params.tensors(),
                "diffusion_pytorch_model.safetensors",
            )
        },
        log,
    )
}

/// Mean cosine similarity of two batches of embeddings, as a scalar tensor.
pub fn cosine(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nb = b.sqr()?.sum(D::Minus1)?.sqrt()?;
    Ok((dot / (na * nb)?)?.mean_all()?)
}

/// The CLIP BPE tokenizer of a vocabulary directory (`vocab.json`, `merges.txt`), 77 tokens.
pub fn clip_tokenizer(dir: &std::path::Path) -> Result<PromptTokenizer> {
    PromptTokenizer::clip_from_files(
        &dir.join("vocab.json"),
        &dir.join("merges.txt"),
        "<|endoftext|>",
        77,
    )
    .map_err(|e| {
        e.within(format!(
            "loading the CLIP vocabulary from {}",
            dir.display()
        ))
    })
}

impl FrozenClip {
    /// The CLIP stage's towers (`clip_run/text_encoder/`, `clip_run/image_encoder/`), frozen,
    /// with the stage's reduced vocabulary (`clip_run/tokenizer/`, see [`clip_tokenizer`]).
    pub fn load(clip_run: &std::path::Path) -> Result<Self> {
        let (d, f32) = (Device::Cpu, candle_core::DType::F32);
        let what = || format!("loading the trained CLIP from {}", clip_run.display());
        Ok(Self {
            text: ClipTextModelWithProjection::load(&clip_run.join("text_encoder"), f32, &d)
                .map_err(|e| e.within(what()))?,
            vision: ClipVisionModelWithProjection::load(&clip_run.join("image_encoder"), f32, &d)
                .map_err(|e| e.within(what()))?,
            tokenizer: clip_tokenizer(&clip_run.join("tokenizer"))?,
        })
    }
}
