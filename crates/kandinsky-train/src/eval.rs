//! `kandinsky eval shapes`: scores images generated for held-out prompts with the deterministic
//! pixel analyser, and measures the Fréchet distance between generated and real images in a CLIP
//! image-embedding space.
// Dense numeric code over small matrices: index loops read like the formulas.
#![allow(clippy::needless_range_loop)]

use super::analyser::{analyse, Score};
use super::shapes::{eval_prompts, Language, Rng, Scene, Size, COLOURS, SHAPES};
use candle_core::{DType, Device, Tensor};
use kandinsky::error::{Error, Result};
use kandinsky::loading::{component_dir, ModelIndex};
use kandinsky::models::VQModel;
use kandinsky::pipelines::auto_pipeline::{DecoderKind, Version, HINT_BLOCK_FACTOR};
use kandinsky::pipelines::decoder::DecoderParams;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::KandinskyV22Pipeline;
use kandinsky::schedulers::{with_class, SchedulerClass, SchedulerConfig};
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::{prepare_image, save_png, to_rgb8, Rgb8};
use std::path::{Path, PathBuf};

/// Accuracy per attribute over a set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    /// Images scored.
    pub n: usize,
    /// Fractions right: background, object colour, shape, position, size.
    pub background: f64,
    /// Object colour.
    pub colour: f64,
    /// Shape.
    pub shape: f64,
    /// Position.
    pub position: f64,
    /// Size.
    pub size: f64,
}

impl Accuracy {
    /// Aggregates per-image scores.
    pub fn from_scores(scores: &[Score]) -> Self {
        let n = scores.len();
        let frac = |f: &dyn Fn(&Score) -> bool| {
            if n == 0 {
                0.0
            } else {
                scores.iter().filter(|s| f(s)).count() as f64 / n as f64
            }
        };
        Self {
            n,
            background: frac(&|s| s.background),
            colour: frac(&|s| s.colour),
            shape: frac(&|s| s.shape),
            position: frac(&|s| s.position),
            size: frac(&|s| s.size),
        }
    }
}

/// Scores `side × side` RGB8 images against the scenes they should show.
pub fn score(images: &[Vec<u8>], scenes: &[super::shapes::Scene], side: usize) -> Accuracy {
    let scores: Vec<Score> = images
        .iter()
        .zip(scenes)
        .map(|(img, s)| analyse(img, side).score(s))
        .collect();
    Accuracy::from_scores(&scores)
}

/// What the analyser read against what the prompt asked, for shape and object colour (the two
/// attributes furthest from their targets), so a miss can be traced to a confusion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confusion {
    /// `shape[size][asked][read]` with sizes small, large and shapes in [`SHAPES`]' order; read
    /// index 3 counts images whose shape could not be read.
    pub shape: [[[usize; 4]; 3]; 2],
    /// `colour[asked][read]` in [`COLOURS`]' order; read index 8 counts unreadable colours.
    pub colour: [[usize; 9]; 8],
}

impl Confusion {
    /// Reads every `side × side` RGB8 image and counts it under its scene.
    pub fn of(images: &[Vec<u8>], scenes: &[Scene], side: usize) -> Self {
        let mut c = Self::default();
        for (img, scene) in images.iter().zip(scenes) {
            let r = analyse(img, side);
            let size = usize::from(scene.size == Size::Large);
            let asked = SHAPES.iter().position(|&x| x == scene.shape).unwrap_or(0);
            let read = r
                .shape
                .and_then(|s| SHAPES.iter().position(|&x| x == s))
                .unwrap_or(3);
            c.shape[size][asked][read] += 1;
            let asked = COLOURS.iter().position(|&x| x == scene.colour).unwrap_or(0);
            let read = r
                .colour
                .and_then(|s| COLOURS.iter().position(|&x| x == s))
                .unwrap_or(8);
            c.colour[asked][read] += 1;
        }
        c
    }
}

/// Mean and covariance (unbiased) of row vectors.
fn moments(x: &[Vec<f64>]) -> Result<(Vec<f64>, Vec<Vec<f64>>)> {
    let n = x.len();
    if n < 2 {
        return Err(Error::InvalidArgument(
            "the Fréchet distance needs at least 2 samples per set".into(),
        ));
    }
    let d = x[0].len();
    let mut mean = vec![0.0; d];
    for r in x {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![vec![0.0; d]; d];
    for r in x {
        for i in 0..d {
            for j in 0..d {
                cov[i][j] += (r[i] - mean[i]) * (r[j] - mean[j]) / (n - 1) as f64;
            }
        }
    }
    Ok((mean, cov))
}

/// Eigen-decomposition of a symmetric matrix (cyclic Jacobi): `(eigenvalues, eigenvectors as
/// columns)`.
pub fn symmetric_eigen(a: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut a: Vec<Vec<f64>> = a.to_vec();
    let mut v = vec![vec![0.0; n]; n];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum().max(0.0).mul_add(2.0, -1.0)
                    / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, m, k) = (a.len(), b[0].len(), b.len());
    let mut c = vec![vec![0.0; m]; n];
    for i in 0..n {
        for l in 0..k {
            for j in 0..m {
                c[i][j] += a[i][l] * b[l][j];
            }
        }
    }
    c
}

/// The Fréchet distance between Gaussians fitted to two sets of feature vectors:
/// `‖μ₁−μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁^½ Σ₂ Σ₁^½)^½)`.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    let (m1, s1) = moments(a)?;
    let (m2, s2) = moments(b)?;
    let d = m1.len();
    let mean_term: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y).powi(2)).sum();
    let (w, v) = symmetric_eigen(&s1);
    // Σ₁^½ = V diag(√w) Vᵀ
    let mut sqrt1 = vec![vec![0.0; d]; d];
    for i in 0..d {
        for j in 0..d {
            sqrt1[i][j] = (0..d)
                .map(|k| v[i][k] * w[k].max(0.0).sqrt() * v[j][k])
                .sum();
        }
    }
    let m = matmul(&matmul(&sqrt1, &s2), &sqrt1);
    let (wm, _) = symmetric_eigen(&m);
    let tr_sqrt: f64 = wm.iter().map(|x| x.max(0.0).sqrt()).sum();
    let tr1: f64 = (0..d).map(|i| s1[i][i]).sum();
    let tr2: f64 = (0..d).map(|i| s2[i][i]).sum();
    Ok(mean_term + tr1 + tr2 - 2.0 * tr_sqrt)
}

/// Settings of [`eval_shapes`].
#[derive(Debug, Clone)]
pub struct ShapesEval {
    /// The decoder directory (`KandinskyPipeline` or `KandinskyV22Pipeline`).
    pub decoder: PathBuf,
    /// The prior directory.
    pub prior: PathBuf,
    /// Prompts per language (at least 2).
    pub n: usize,
    /// Decoder steps.
    pub steps: usize,
    /// Prior steps (at least 2).
    pub prior_steps: usize,
    /// Decoder guidance.
    pub guidance: f64,
    /// Prior guidance.
    pub prior_guidance: f64,
    /// Seed of the generator (one per language).
    pub seed: u64,
    /// Prompts generated together.
    pub batch: usize,
    /// Condition the decoder on the CLIP embedding of a real render of each scene instead of the
    /// prior's sample (measures the decoder alone).
    pub oracle: bool,
    /// Write every generated image here as `en-000.png`, `ru-000.png`, … (prompt in the PNG).
    pub save: Option<PathBuf>,
    /// The decoder's sampler (`None`: the model directory's own).
    pub scheduler: Option<SchedulerClass>,
    /// Compute dtype of the networks (f32, or bf16 compute).
    pub dtype: DType,
    /// Device of the networks.
    pub device: Device,
}

impl ShapesEval {
    /// The prior's sampler settings, one image per prompt.
    fn prior_params(&self) -> PriorParams {
        PriorParams {
            steps: self.prior_steps,
            guidance_scale: self.prior_guidance,
            num_images_per_prompt: 1,
        }
    }

    /// The decoder's sampler settings at the world's image size.
    fn decoder_params(&self) -> DecoderParams {
        DecoderParams {
            height: SIDE,
            width: SIDE,
            steps: self.steps,
            guidance_scale: self.guidance,
        }
    }

    /// What a section of `n` scenes per language starts with: the settings checked, the `save`
    /// directory made and the prior loaded.
    fn section_prior(&self, n: usize) -> Result<KandinskyPriorPipeline> {
        check_eval_n("n", n)?;
        if n == 0 || self.steps == 0 || self.prior_steps < 2 {
            return Err(Error::InvalidArgument(
                "n and steps must be at least 1, prior steps at least 2".into(),
            ));
        }
        if let Some(dir) = &self.save {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        KandinskyPriorPipeline::load(&self.prior, self.dtype, &self.device)
            .map_err(|e| e.within(format!("loading the prior from {}", self.prior.display())))
    }
}

/// A decoder of either family (its `model_index.json` class decides), as the evaluation drives it.
pub enum EvalDecoder {
    /// `KandinskyPipeline` / `KandinskyInpaintPipeline`: reads the prompt through M-CLIP too.
    V21(Box<KandinskyPipeline>),
    /// `KandinskyV22Pipeline` / its inpainting and ControlNet variants: the image embedding only.
    V22(Box<KandinskyV22Pipeline>),
}

impl EvalDecoder {
    /// Loads the decoder directory `dir`, its sampler replaced by `scheduler` (built from the
    /// directory's own config as diffusers' `from_config` does) when given.
    pub fn load(
        dir: &Path,
        dtype: DType,
        device: &Device,
        scheduler: Option<SchedulerClass>,
    ) -> Result<Self> {
        let index = ModelIndex::load(dir)?;
        let v22 = matches!(
            DecoderKind::from_class_name(&index.class_name),
            Some((_, Version::V2_2))
        );
        let mut decoder = if v22 {
            Self::V22(Box::new(KandinskyV22Pipeline::load(dir, dtype, device)?))
        } else {
            Self::V21(Box::new(KandinskyPipeline::load(dir, dtype, device)?))
        };
        if let Some(class) = scheduler {
            let own = SchedulerConfig::load(
                &component_dir(dir, "scheduler")?.join("scheduler_config.json"),
            )?;
            let config = with_class(&own, class.class_name())?;
            match &mut decoder {
                Self::V21(d) => d.set_scheduler(config),
                Self::V22(d) => d.set_scheduler(config),
            }
        }
        Ok(decoder)
    }

    /// The MoVQ.
    pub fn movq(&self) -> &VQModel {
        match self {
            Self::V21(d) => d.movq(),
            Self::V22(d) => d.movq(),
        }
    }

    /// Text-to-image from the prior's embeddings: `(B, 3, H, W)` in [-1, 1].
    pub fn generate(
        &self,
        texts: &[String],
        (emb, neg): (&Tensor, &Tensor),
        params: DecoderParams,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        match self {
            Self::V21(d) => d.call(
                texts,
                None,
                emb,
                neg,
                params,
                generator,
                None,
                &mut |_, _| {},
            ),
            Self::V22(d) => d.call(emb, neg, params, generator, None, &mut |_, _| {}),
        }
    }

    /// Inpainting of `image` where `mask` (1 = keep) is 0, as each family's pipeline does it.
    pub fn inpaint(
        &self,
        texts: &[String],
        (image, mask): (&Tensor, &Tensor),
        (emb, neg): (&Tensor, &Tensor),
        params: DecoderParams,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let none = &mut |_, _| {};
        match self {
            Self::V21(d) => d.inpaint(
                texts, None, image, mask, emb, neg, params, generator, None, none,
            ),
            Self::V22(d) => d.inpaint(image, mask, emb, neg, params, generator, None, none),
        }
    }
}

/// The most prompts (or scenes) per language an evaluation takes: the held-out set has under 200
/// scenes, so more only repeats them, and every image is kept in memory until it is scored.
pub const MAX_EVAL_N: usize = 10_000;

/// Refuses an evaluation size `n` (named `what` in the message) above [`MAX_EVAL_N`].
pub fn check_eval_n(what: &str, n: usize) -> Result<()> {
    if n > MAX_EVAL_N {
        return Err(Error::InvalidArgument(format!(
            "{what} must be at most {MAX_EVAL_N} per language, got {n}"
        )));
    }
    Ok(())
}

/// One row of the evaluation table.
#[derive(Debug, Clone)]
pub struct EvalRow {
    /// What was scored ("generated, English", …, "real images (analyser ceiling)").
    pub name: &'static str,
    /// The analyser's accuracy per attribute.
    pub accuracy: Accuracy,
    /// Fréchet distance to the real renders in the model's CLIP image-embedding space.
    pub frechet: Option<f64>,
    /// Mean cosine between the prior's embedding and the real image's.
    pub prior_cosine: Option<f64>,
    /// Mean absolute difference to the real renders, in 1/255 per channel (the MoVQ row).
    pub pixel_error: Option<f64>,
    /// Shape and colour confusions (the generated rows).
    pub confusion: Option<Confusion>,
}

/// Encodes `image` with the MoVQ and decodes the unquantised latent, as the pipelines decode
/// (`force_not_quantize`): HWC RGB8.
pub fn movq_round_trip(movq: &VQModel, image: &Rgb8, device: &Device) -> Result<Vec<u8>> {
    let x = prepare_image(image, image.width, image.height, 1, device)?;
    Ok(to_rgb8(&movq.decode(&movq.encode(&x)?, true)?)?
        .remove(0)
        .data)
}

/// The real renders of the held-out `prompts` in `lang` that `eval shapes` compares with (one
/// render stream per language and seed).
pub fn held_out_renders(prompts: &[(Scene, String)], seed: u64, lang: Language) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(seed ^ lang as u64);
    prompts
        .iter()
        .map(|(sc, _)| sc.render(SIDE, &mut rng))
        .collect()
}

/// The MoVQ's round trips ([`movq_round_trip`]) of `SIDE`-pixel RGB8 renders, and their mean
/// absolute error in 1/255 per channel.
pub fn round_trips_of(
    movq: &VQModel,
    renders: &[Vec<u8>],
    device: &Device,
) -> Result<(Vec<Vec<u8>>, f64)> {
    let mut out = Vec::with_capacity(renders.len());
    let mut error = 0.0;
    for rgb in renders {
        let image = Rgb8 {
            width: SIDE,
            height: SIDE,
            data: rgb.clone(),
        };
        let decoded = movq_round_trip(movq, &image, device)?;
        error += mean_abs_difference(&decoded, rgb);
        out.push(decoded);
    }
    Ok((out, error / renders.len().max(1) as f64))
}

/// `kandinsky eval movq`: the MoVQ's round trip of the held-out renders of `eval shapes` (same
/// prompts, renders and seed), scored by the analyser: the ceiling of any decoder with this
/// MoVQ, in seconds instead of a whole evaluation. One row per language.
pub fn eval_movq(movq: &VQModel, n: usize, seed: u64, device: &Device) -> Result<Vec<EvalRow>> {
    check_eval_n("n", n)?;
    if n == 0 {
        return Err(Error::InvalidArgument("n must be at least 1".into()));
    }
    let mut rows = Vec::new();
    for (lang, name) in [
        (Language::En, "MoVQ round trip, English prompts' renders"),
        (Language::Ru, "MoVQ round trip, Russian prompts' renders"),
    ] {
        let prompts = eval_prompts(lang, n);
        let real = held_out_renders(&prompts, seed, lang);
        let (decoded, error) = round_trips_of(movq, &real, device)?;
        let scenes: Vec<Scene> = prompts.iter().map(|(sc, _)| *sc).collect();
        rows.push(EvalRow {
            name,
            accuracy: score(&decoded, &scenes, SIDE),
            frechet: None,
            prior_cosine: None,
            pixel_error: Some(error),
            confusion: Some(Confusion::of(&decoded, &scenes, SIDE)),
        });
    }
    Ok(rows)
}

/// Mean absolute difference of two equally long RGB8 buffers, in 1/255 per channel.
fn mean_abs_difference(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    sum as f64 / a.len().max(1) as f64
}

/// The image side of the evaluation (the small model's native size).
pub const SIDE: usize = 64;

/// `kandinsky eval shapes`: generates images for held-out prompts in English and Russian with
/// the given sampler settings, scores them with the pixel analyser and measures their Fréchet
/// distance to real renders; the last row is the analyser on the real renders (its ceiling).
/// `progress(name, done, n)` reports after every batch.
pub fn eval_shapes(
    s: &ShapesEval,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<EvalRow>> {
    check_eval_n("n", s.n)?;
    if s.n < 2 || s.batch == 0 || s.steps == 0 || s.prior_steps < 2 {
        return Err(Error::InvalidArgument(
            "n must be at least 2, batch and steps at least 1, prior steps at least 2".into(),
        ));
    }
    if let Some(dir) = &s.save {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: dir.clone(),
            source: e,
        })?;
    }
    let device = s.device.clone();
    let prior = KandinskyPriorPipeline::load(&s.prior, s.dtype, &device)
        .map_err(|e| e.within(format!("loading the prior from {}", s.prior.display())))?;
    let decoder = EvalDecoder::load(&s.decoder, s.dtype, &device, s.scheduler)
        .map_err(|e| e.within(format!("loading the decoder from {}", s.decoder.display())))?;
    let features = |e: &candle_core::Tensor| -> Result<Vec<f64>> {
        Ok(e.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let mut rows = Vec::new();
    let mut all_real: Vec<(Vec<u8>, Scene)> = Vec::new();
    let mut round_trips: Vec<Vec<u8>> = Vec::new();
    let mut round_trip_error = 0.0f64;
    for (lang, name, tag) in [
        (Language::En, "generated, English", "en"),
        (Language::Ru, "generated, Russian", "ru"),
    ] {
        let prompts = eval_prompts(lang, s.n);
        let mut gen = TorchGenerator::new(s.seed);
        let mut images = Vec::new();
        let mut scenes = Vec::new();
        let real = held_out_renders(&prompts, s.seed, lang);
        // The MoVQ's round trip of each real render, decoded as the pipelines decode: what a
        // UNet that produced the real image's latent exactly would give (the decoder's ceiling).
        let (decoded, error) = round_trips_of(decoder.movq(), &real, &device)?;
        round_trip_error += error * real.len() as f64;
        round_trips.extend(decoded);
        // The real renders' CLIP embeddings: the prior's reference, the oracle's conditioning
        // and the Fréchet distance's second set.
        let real_emb = real
            .iter()
            .map(|rgb| prior.embed_image(SIDE, SIDE, rgb))
            .collect::<Result<Vec<_>>>()?;
        let (mut cos_sum, mut cos_n) = (0.0, 0usize);
        for (i, chunk) in prompts.chunks(s.batch).enumerate() {
            let texts: Vec<String> = chunk.iter().map(|(_, t)| t.clone()).collect();
            let params = s.prior_params();
            let (emb, neg) = prior.call(&texts, None, params, &mut gen, None, &mut |_, _| {})?;
            let truth =
                candle_core::Tensor::cat(&real_emb[i * s.batch..i * s.batch + chunk.len()], 0)?;
            let cos = (&emb * &truth)?.sum(1)?
                / (emb.sqr()?.sum(1)?.sqrt()? * truth.sqr()?.sum(1)?.sqrt()?)?;
            cos_sum += cos?.sum_all()?.to_scalar::<f32>()? as f64;
            cos_n += chunk.len();
            let emb = if s.oracle { truth } else { emb };
            let dp = s.decoder_params();
            let out = decoder.generate(&texts, (&emb, &neg), dp, &mut gen)?;
            for (image, text) in to_rgb8(&out)?.into_iter().zip(&texts) {
                if let Some(dir) = &s.save {
                    let path = dir.join(format!("{tag}-{:03}.png", images.len()));
                    save_png(&path, &image, &[("parameters", text)])?;
                }
                images.push(image.data);
            }
            scenes.extend(chunk.iter().map(|(sc, _)| *sc));
            progress(name, ((i + 1) * s.batch).min(s.n), s.n);
        }
        let fa: Vec<Vec<f64>> = images
            .iter()
            .map(|rgb| features(&prior.embed_image(SIDE, SIDE, rgb)?))
            .collect::<Result<_>>()?;
        let fb: Vec<Vec<f64>> = real_emb.iter().map(features).collect::<Result<_>>()?;
        let fd = frechet_distance(&fa, &fb)?;
        rows.push(EvalRow {
            name,
            accuracy: score(&images, &scenes, SIDE),
            frechet: Some(fd),
            prior_cosine: Some(cos_sum / cos_n as f64),
            pixel_error: None,
            confusion: Some(Confusion::of(&images, &scenes, SIDE)),
        });
        all_real.extend(real.into_iter().zip(scenes));
    }
    let (real, scenes): (Vec<Vec<u8>>, Vec<Scene>) = all_real.into_iter().unzip();
    rows.push(EvalRow {
        name: "MoVQ round trip of the real images (decoder ceiling)",
        accuracy: score(&round_trips, &scenes, SIDE),
        frechet: None,
        prior_cosine: None,
        pixel_error: Some(round_trip_error / round_trips.len() as f64),
        confusion: None,
    });
    rows.push(EvalRow {
        name: "real images (analyser ceiling)",
        accuracy: score(&real, &scenes, SIDE),
        frechet: None,
        prior_cosine: None,
        pixel_error: None,
        confusion: None,
    });
    Ok(rows)
}

/// One row of the ControlNet table.
#[derive(Debug, Clone)]
pub struct ControlRow {
    /// "depth ControlNet, English" or "…, Russian".
    pub name: &'static str,
    /// Images.
    pub n: usize,
    /// Fraction of images whose object is where the hint put it.
    pub hint_position: f64,
    /// Fraction whose object is where the prompt (which names another position) put it.
    pub prompt_position: f64,
}

/// The depth ControlNet against a prompt that disagrees with its hint: for each held-out scene, its
/// depth hint ([`Scene::render_depth`], at the size the hint block needs) and the prompt of another
/// held-out scene with the object elsewhere; the analyser reads where the object came out.
/// `controlnet` is a `KandinskyV22ControlnetPipeline` directory; the prior, sampler settings, seed
/// and device come from `s` (and `save`: `control-en-000.png` with its `-hint.png`).
pub fn eval_controlnet(
    s: &ShapesEval,
    controlnet: &Path,
    n: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<ControlRow>> {
    let prior = s.section_prior(n)?;
    let device = s.device.clone();
    let EvalDecoder::V22(decoder) = EvalDecoder::load(controlnet, s.dtype, &device, s.scheduler)
        .map_err(|e| {
            e.within(format!(
                "loading the ControlNet from {}",
                controlnet.display()
            ))
        })?
    else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a Kandinsky 2.2 ControlNet decoder",
            controlnet.display()
        )));
    };
    let hint_side = SIDE / decoder.scale_factor() * HINT_BLOCK_FACTOR;
    let mut rows = Vec::new();
    for (lang, name, tag) in [
        (Language::En, "depth ControlNet, English", "en"),
        (Language::Ru, "depth ControlNet, Russian", "ru"),
    ] {
        let prompts = eval_prompts(lang, n.max(2));
        let mut gen = TorchGenerator::new(s.seed);
        let mut rng = Rng::new(s.seed ^ 0xc0_417 ^ lang as u64);
        let (mut at_hint, mut at_prompt) = (0usize, 0usize);
        for i in 0..n {
            let scene = prompts[i].0;
            // The next held-out scene (by the same offset as inpainting's) with another position.
            let other = (1..prompts.len())
                .map(|k| &prompts[(i + k + prompts.len() / 2) % prompts.len()])
                .find(|(o, _)| o.position != scene.position)
                .unwrap_or(&prompts[(i + 1) % prompts.len()]);
            let depth = Rgb8 {
                width: hint_side,
                height: hint_side,
                data: scene.render_depth(hint_side, &mut rng),
            };
            let hint = kandinsky::vae_image_processor::prepare_hint(
                &depth, hint_side, hint_side, &device,
            )?;
            let texts = [other.1.clone()];
            let params = s.prior_params();
            let (emb, neg) = prior.call(&texts, None, params, &mut gen, None, &mut |_, _| {})?;
            let dp = s.decoder_params();
            let out =
                decoder.controlnet(&hint, None, &emb, &neg, dp, &mut gen, None, &mut |_, _| {})?;
            let got = to_rgb8(&out)?.remove(0);
            let reading = analyse(&got.data, SIDE);
            at_hint += (reading.position == Some(scene.position)) as usize;
            at_prompt += (reading.position == Some(other.0.position)) as usize;
            if let Some(dir) = &s.save {
                let path = dir.join(format!("control-{tag}-{i:03}.png"));
                save_png(&path, &got, &[("parameters", &texts[0])])?;
                save_png(
                    &dir.join(format!("control-{tag}-{i:03}-hint.png")),
                    &depth,
                    &[],
                )?;
            }
            progress(name, i + 1, n);
        }
        rows.push(ControlRow {
            name,
            n,
            hint_position: at_hint as f64 / n as f64,
            prompt_position: at_prompt as f64 / n as f64,
        });
    }
    Ok(rows)
}

/// One row of the inpainting table.
#[derive(Debug, Clone)]
pub struct InpaintRow {
    /// "inpainted, English" or "inpainted, Russian".
    pub name: &'static str,
    /// Images.
    pub n: usize,
    /// Mean absolute change of the kept pixels (outside the mask), in 1/255 per channel.
    pub kept_change: f64,
    /// The largest per-image mean change of the kept pixels, in 1/255.
    pub worst: f64,
    /// The same measure for the MoVQ's round trip of the input ([`movq_round_trip`], decoded
    /// unquantised as the pipeline decodes): the floor a decoder that reproduces the kept
    /// latents exactly would reach.
    pub movq_floor: f64,
    /// The mean change of the kept pixels in the band ([`hidden_band`]) that `prepare_mask`
    /// hands to the model to paint, in 1/255 (per image, then averaged).
    pub band: f64,
    /// The mean change of the other kept pixels, in 1/255 (per image, then averaged).
    pub rest: f64,
}

/// The kept pixels that the inpainting pipelines repaint anyway: diffusers' `prepare_mask` grows
/// the repainted area of the latent mask by about one cell, so the kept pixels of those cells are
/// the model's to paint (2.2's pipeline keeps what it paints there). `repaint` is the user's mask
/// (`side × side` pixels, true = repaint), `scale` the MoVQ's pixels per latent cell; the latent
/// mask is the user's sampled as `F.interpolate(mode="nearest")` samples it.
pub fn hidden_band(repaint: &[bool], side: usize, scale: usize) -> Result<Vec<bool>> {
    use kandinsky::pipelines::decoder::prepare_mask;
    let cells = side / scale;
    let keep: Vec<f32> = (0..cells * cells)
        .map(|i| {
            let (y, x) = (i / cells * scale, i % cells * scale);
            if repaint[y * side + x] {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let keep = Tensor::from_vec(keep, (1, 1, cells, cells), &Device::Cpu)?;
    let prepared = prepare_mask(&keep)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..side * side)
        .map(|p| {
            let (y, x) = (p / side / scale, p % side / scale);
            !repaint[p] && prepared[y * cells + x] == 0.0
        })
        .collect())
}

/// The repainted area (`true`) of the `kind`-th held-out mask: the left, right, top or bottom
/// half, or the centre square.
pub fn repaint_mask(kind: usize, side: usize) -> Vec<bool> {
    let h = side / 2;
    (0..side * side)
        .map(|i| {
            let (y, x) = (i / side, i % side);
            match kind % 5 {
                0 => x < h,
                1 => x >= h,
                2 => y < h,
                3 => y >= h,
                _ => {
                    (side / 4..side - side / 4).contains(&x)
                        && (side / 4..side - side / 4).contains(&y)
                }
            }
        })
        .collect()
}

/// Inpainting as a user runs it, with no compositing after the fact: a real render of a
/// held-out scene, one of five masks ([`repaint_mask`]) and the prompt of another held-out scene
/// (so the prompt asks for something the kept part does not show, as when a user repaints a
/// region). Measures how much the pipeline changes the pixels it should keep.
///
/// `inpaint_decoder` is an inpainting decoder directory (`KandinskyInpaintPipeline` or
/// `KandinskyV22InpaintPipeline`; 2.2's pipeline puts the known latents back after every step,
/// diffusers' own behaviour, which is not compositing of the output),
/// `n` the scenes per language; the prior, sampler settings, seed, device and `save` (inpainted
/// images as `inpaint-en-000.png`, … with their `-input.png` and `-mask.png`) come from `s`.
pub fn eval_inpainting(
    s: &ShapesEval,
    inpaint_decoder: &Path,
    n: usize,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<InpaintRow>> {
    use kandinsky::pipelines::decoder::prepare_mask_and_masked_image;
    let prior = s.section_prior(n)?;
    let device = s.device.clone();
    let decoder =
        EvalDecoder::load(inpaint_decoder, s.dtype, &device, s.scheduler).map_err(|e| {
            e.within(format!(
                "loading the inpainting decoder from {}",
                inpaint_decoder.display()
            ))
        })?;
    // Mean absolute difference of the pixels `p` with `counts(p)`, in 1/255.
    let mean_change = |a: &[u8], b: &[u8], counts: &dyn Fn(usize) -> bool| {
        let (mut diff, mut kept) = (0u64, 0u64);
        for p in (0..a.len() / 3).filter(|&p| counts(p)) {
            for c in 0..3 {
                diff += a[3 * p + c].abs_diff(b[3 * p + c]) as u64;
            }
            kept += 3;
        }
        diff as f64 / kept.max(1) as f64
    };
    let mut rows = Vec::new();
    for (lang, name, tag) in [
        (Language::En, "inpainted, English", "en"),
        (Language::Ru, "inpainted, Russian", "ru"),
    ] {
        let prompts = eval_prompts(lang, n.max(2));
        let mut gen = TorchGenerator::new(s.seed);
        let mut rng = Rng::new(s.seed ^ 0x1a9 ^ lang as u64);
        let (mut sum, mut worst, mut floor) = (0.0f64, 0.0f64, 0.0f64);
        let (mut band_sum, mut rest_sum) = (0.0f64, 0.0f64);
        for i in 0..n {
            let image = Rgb8 {
                width: SIDE,
                height: SIDE,
                data: prompts[i].0.render(SIDE, &mut rng),
            };
            let text = prompts[(i + 1 + prompts.len() / 2) % prompts.len()]
                .1
                .clone();
            let repaint = repaint_mask(i, SIDE);
            let mask = Rgb8 {
                width: SIDE,
                height: SIDE,
                data: repaint
                    .iter()
                    .flat_map(|&r| [if r { 255 } else { 0 }; 3])
                    .collect(),
            };
            let (mask_t, image_t) =
                prepare_mask_and_masked_image(&image, &mask, SIDE, SIDE, &device)?;
            let params = s.prior_params();
            let texts = [text];
            let (emb, neg) = prior.call(&texts, None, params, &mut gen, None, &mut |_, _| {})?;
            let dp = s.decoder_params();
            let out = decoder.inpaint(&texts, (&image_t, &mask_t), (&emb, &neg), dp, &mut gen)?;
            let got = to_rgb8(&out)?.remove(0);
            let band = hidden_band(&repaint, SIDE, decoder.movq().scale_factor())?;
            let kept = |p: usize| !repaint[p];
            let change = mean_change(&got.data, &image.data, &kept);
            band_sum += mean_change(&got.data, &image.data, &|p| band[p]);
            rest_sum += mean_change(&got.data, &image.data, &|p| kept(p) && !band[p]);
            let round_trip = movq_round_trip(decoder.movq(), &image, &device)?;
            floor += mean_change(&round_trip, &image.data, &kept);
            sum += change;
            worst = worst.max(change);
            if let Some(dir) = &s.save {
                let path = dir.join(format!("inpaint-{tag}-{i:03}.png"));
                save_png(&path, &got, &[("parameters", &texts[0])])?;
                let path = dir.join(format!("inpaint-{tag}-{i:03}-input.png"));
                save_png(&path, &image, &[("parameters", &prompts[i].1)])?;
                let path = dir.join(format!("inpaint-{tag}-{i:03}-mask.png"));
                save_png(&path, &mask, &[])?;
            }
            progress(name, i + 1, n);
        }
        rows.push(InpaintRow {
            name,
            n,
            kept_change: sum / n as f64,
            worst,
            movq_floor: floor / n as f64,
            band: band_sum / n as f64,
            rest: rest_sum / n as f64,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_held_out_masks_repaint_halves_and_the_centre() {
        let side = 8;
        let areas: Vec<usize> = (0..5)
            .map(|k| super::repaint_mask(k, side).iter().filter(|&&r| r).count())
            .collect();
        assert_eq!(areas, [32, 32, 32, 32, 16]);
        let left = super::repaint_mask(0, side);
        assert!(left[0] && !left[side - 1]);
        let centre = super::repaint_mask(4, side);
        assert!(centre[3 * side + 3] && !centre[0]);
    }

    #[test]
    fn the_hidden_band_is_the_kept_latent_ring_that_prepare_mask_takes() {
        // 16 pixels, 4 per cell: a 4x4 latent grid.
        let (side, scale) = (16, 4);
        // Left half repainted: prepare_mask clears the right neighbour of every repainted cell,
        // so the kept cells of latent column 2 (pixels 8..12) are the band.
        let band = super::hidden_band(&super::repaint_mask(0, side), side, scale).unwrap();
        for (p, &b) in band.iter().enumerate() {
            assert_eq!(b, (8..12).contains(&(p % side)), "pixel {p}");
        }
        // Centre repainted (cells 1..3 both ways): every kept cell touches it but (3, 0) and
        // (0, 3), the two corners prepare_mask's six neighbours do not reach.
        let band = super::hidden_band(&super::repaint_mask(4, side), side, scale).unwrap();
        let cells: Vec<bool> = (0..16)
            .map(|c| band[(c / 4 * scale) * side + c % 4 * scale])
            .collect();
        let corners_only_kept: Vec<bool> = (0..16)
            .map(|c| {
                let (y, x) = (c / 4, c % 4);
                let repainted = (1..3).contains(&y) && (1..3).contains(&x);
                !repainted && (y, x) != (3, 0) && (y, x) != (0, 3)
            })
            .collect();
        assert_eq!(cells, corners_only_kept);
    }
}
