//! Stage (e) / (f): the decoder UNets (text-to-image, 9-channel inpainting and, for 2.2, the depth
//! ControlNet) of both families — ε prediction under
//! Kandinsky 2.1's linear schedule (β from 0.00085 to 0.012 over 1000 steps, what its DDIM and
//! DDPM schedulers use), conditioned like `KandinskyPipeline` (`text_image`: CLIP image
//! embedding, M-CLIP pooled and token embeddings), or for the 2.2 family like
//! `KandinskyV22Pipeline` (`image`: the CLIP image embedding alone). The learned-variance channels, which the
//! default DDIM sampler ignores but diffusers' pipelines require to exist, are trained towards
//! `v = -1` (the posterior variance, DDPM's `fixed_small`), so a `learned_range` DDPM samples like
//! `fixed_small`.

use super::shapes::{Placement, Rng};
use super::threads::{on_threads, try_map_on_threads};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use kandinsky::error::Result;
use kandinsky::models::{UNet2DConditionModel, UNetConditioning};
use kandinsky::pipelines::auto_pipeline::HINT_BLOCK_FACTOR;
use kandinsky::pipelines::decoder::prepare_mask;
use kandinsky::schedulers::{alphas_cumprod, linspace_f32, PredictionType};
use kandinsky::utils::torch_utils::TorchGenerator;
use std::path::{Path, PathBuf};

/// The small 2.1-style UNet for 16×16×4 latents: 3 levels (64, 128, 128 channels), attention at
/// the lower two, `text_image` conditioning from 64-wide CLIP / M-CLIP embeddings. The time
/// embedding is 128 wide instead of diffusers' default 4 × 64: it saves every resnet half its
/// time projection (0.5 M parameters, 1 MB in fp16 per UNet), which five UNets need to fit in
/// the repository's 60 MB.
pub const SMALL_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "addition_embed_type": "text_image",
  "attention_head_dim": 32,
  "block_out_channels": [64, 128, 128],
  "class_embed_type": null,
  "cross_attention_dim": 64,
  "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"],
  "encoder_hid_dim": 64,
  "encoder_hid_dim_type": "text_image_proj",
  "in_channels": 4,
  "layers_per_block": 1,
  "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
  "norm_num_groups": 32,
  "out_channels": 8,
  "resnet_time_scale_shift": "scale_shift",
  "sample_size": 16,
  "time_embedding_dim": 128,
  "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]
}"#;

/// Which Kandinsky a decoder UNet belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    /// Kandinsky 2.1: `text_image` conditioning (CLIP image embedding and M-CLIP's text).
    #[default]
    V21,
    /// Kandinsky 2.2: `image` conditioning (the CLIP image embedding alone).
    V22,
}

/// What a decoder UNet stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UNetKind {
    /// The text-to-image decoder (4 input channels).
    #[default]
    TextToImage,
    /// The inpainting decoder (9: noisy latents, masked image latents, mask).
    Inpaint,
    /// The 2.2 depth ControlNet (`image_hint`: the latents plus 4 channels its hint block computes
    /// from a depth image [`HINT_BLOCK_FACTOR`] times the latent's size: 128 pixels for our
    /// 64-pixel images, whose MoVQ downsamples 4 times).
    DepthControl,
}

/// The small decoder UNet's config (diffusers' `config.json`) for `family`, `kind` and a MoVQ
/// with `latent_channels`: the architecture of [`SMALL_UNET_CONFIG`] with the family's
/// conditioning, the kind's inputs and the latent's channels (twice as many outputs: ε and the
/// learned variance).
pub fn small_unet_config(
    family: Family,
    kind: UNetKind,
    latent_channels: usize,
) -> Result<serde_json::Value> {
    let mut value = super::trainer::parse_config(SMALL_UNET_CONFIG, "unet")?;
    let c = latent_channels;
    if family == Family::V22 {
        value["addition_embed_type"] = if kind == UNetKind::DepthControl {
            "image_hint"
        } else {
            "image"
        }
        .into();
        value["encoder_hid_dim_type"] = "image_proj".into();
    } else if kind == UNetKind::DepthControl {
        return Err(kandinsky::error::Error::InvalidArgument(
            "the depth ControlNet is a Kandinsky 2.2 model (--family 2.2)".into(),
        ));
    }
    // The ControlNet's hint block always yields 4 channels (diffusers' `ImageHintTimeEmbedding`).
    value["in_channels"] = match kind {
        UNetKind::TextToImage => c,
        UNetKind::Inpaint => 2 * c + 1,
        UNetKind::DepthControl => c + 4,
    }
    .into();
    value["out_channels"] = (2 * c).into();
    Ok(value)
}

/// Conditioning of one batch, already with dropout applied: `(image_embeds, text_embeds,
/// encoder_hidden_states)`.
pub type UNetCond = (Tensor, Tensor, Tensor);

/// Per-timestep weights of the ε loss: `min(1/ᾱ_t, cap)` normalised to mean 1 over the 1000
/// training timesteps, or all 1 when `cap` is 0. `1/ᾱ_t = 1 + 1/SNR_t` turns the ε loss into
/// the v-prediction loss (`‖v̂ − v‖² = ‖ε̂ − ε‖² / ᾱ_t`) while the model still predicts ε, as the
/// pipelines expect. Plain ε loss hardly trains the noisiest steps, where an ε error is
/// amplified `√((1−ᾱ)/ᾱ)` times in the predicted image and which decide the global layout and
/// colours; the cap bounds the variance those rare, heavy samples add.
pub fn timestep_weights(alphas_cumprod: &[f32], cap: f64) -> Vec<f32> {
    if cap <= 0.0 {
        return vec![1.0; alphas_cumprod.len()];
    }
    let w: Vec<f64> = alphas_cumprod
        .iter()
        .map(|&a| (1.0 / a as f64).min(cap))
        .collect();
    let mean = w.iter().sum::<f64>() / w.len() as f64;
    w.iter().map(|x| (x / mean) as f32).collect()
}

/// The batch of every decoder training step is split into this many equal row ranges, each run
/// forward and backward on its own thread and the gradients summed. Candle's CPU ops hardly use a
/// second core at this model's size (a step takes as long with `CANDLE_NUM_THREADS=1`), so two
/// halves on two threads nearly halve the step time. The split is part of the recipe, not of the
/// machine, so the trained weights do not depend on the core count.
pub const GRAD_PARTS: usize = 2;

/// The decoder's training timesteps (diffusers' `num_train_timesteps`).
pub const TRAIN_TIMESTEPS: usize = 1000;

/// One drawn training batch: the noisy UNet input, the noise, the timesteps and the conditioning.
pub struct NoisyBatch {
    input: Tensor,
    noise: Tensor,
    /// The clean latents: part of the target when the model predicts x0 or v
    /// ([`NoisyBatch::predicting`]).
    x0: Tensor,
    /// What the model predicts: the noise (ε), the clean latents or the velocity.
    prediction: Prediction,
    ts: Vec<usize>,
    /// Each example's loss weight, [`timestep_weights`] at its timestep.
    weights: Vec<f32>,
    cond: UNetCond,
    /// Per-position loss weights `(B, 1, h, w)` (see [`NoisyBatch::with_loss_weights`]).
    positions: Option<Tensor>,
    /// `√(1 − ᾱ_t)` per example `(B, 1, 1, 1)`: the noise's scale in the input.
    noise_scale: Tensor,
    /// `ᾱ_t` of each example's timestep.
    alphas: Vec<f64>,
    /// The loss weight cap the batch was drawn with ([`timestep_weights`]).
    weight_cap: f64,
    /// The ControlNet's hint `(B, 3, H, W)` (see [`NoisyBatch::with_hint`]).
    hint: Option<Tensor>,
}

impl NoisyBatch {
    /// Noises clean latents `x0 (B, 4, h, w)` at timesteps drawn with `rng` and noise drawn with
    /// `generator`, the ε loss weighted per timestep by [`timestep_weights`] with `weight_cap`;
    /// for inpainting, `extra = (masked image latents, mask)` is concatenated to the noisy input.
    pub fn new(
        x0: &Tensor,
        cond: &UNetCond,
        extra: Option<&Tensor>,
        weight_cap: f64,
        rng: &mut Rng,
        generator: &mut TorchGenerator,
    ) -> Result<Self> {
        Self::below(TRAIN_TIMESTEPS, x0, cond, extra, weight_cap, rng, generator)
    }

    /// [`NoisyBatch::new`] with the timesteps drawn from `0..end` only (`end` ≤ 1000): a phase
    /// that trains the low-noise steps, which draw the edges and corners, without the noisy
    /// ones, which decide the layout.
    pub fn below(
        end: usize,
        x0: &Tensor,
        cond: &UNetCond,
        extra: Option<&Tensor>,
        weight_cap: f64,
        rng: &mut Rng,
        generator: &mut TorchGenerator,
    ) -> Result<Self> {
        if end == 0 || end > TRAIN_TIMESTEPS {
            return Err(kandinsky::error::Error::InvalidArgument(format!(
                "training timesteps end at 1 to {TRAIN_TIMESTEPS}, got {end}"
            )));
        }
        let b = x0.dim(0)?;
        let ac = alphas_cumprod(&linspace_f32(0.00085, 0.012, TRAIN_TIMESTEPS));
        let ts: Vec<usize> = (0..b).map(|_| rng.below(end)).collect();
        let col = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
            let v: Vec<f32> = ts.iter().map(|&t| f(t)).collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), &Device::Cpu)?)
        };
        let sa = col(&|t| ac[t].sqrt())?;
        let sb = col(&|t| (1.0 - ac[t]).sqrt())?;
        let noise = generator.randn(x0.shape(), &Device::Cpu)?;
        let xt = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?)?;
        let input = match extra {
            Some(e) => Tensor::cat(&[&xt, e], 1)?,
            None => xt,
        };
        let tw = timestep_weights(&ac, weight_cap);
        let alphas = ts.iter().map(|&t| f64::from(ac[t])).collect();
        Ok(Self {
            input,
            noise,
            x0: x0.clone(),
            prediction: Prediction::Epsilon,
            weights: ts.iter().map(|&t| tw[t]).collect(),
            ts,
            cond: cond.clone(),
            positions: None,
            noise_scale: sb,
            alphas,
            weight_cap,
            hint: None,
        })
    }

    /// Adds a structured part `drift (B, C, h, w)` to the noise, in the input and in the target:
    /// the model learns to call noise whatever in its input departs from the clean latents. For
    /// an inpainting example, whose clean kept latents the model is given, `drift` towards
    /// another scene mimics the sampler's latents wandering off towards what the prompt asks,
    /// and teaches the model to pull the kept area back (diffusers' `KandinskyInpaintPipeline`
    /// never re-imposes the known latents, so nothing else does).
    ///
    /// With `in_image` the drift is of the clean latents instead: the input moves by `√ᾱ·drift`
    /// and the target noise by `√ᾱ/√(1−ᾱ)·drift`, so the model must predict the known latents
    /// whatever the input holds, even at the last, least noisy steps (where a noise-space drift
    /// is tiny). Those rows' loss is then weighted by `min(1, (1−ᾱ)/ᾱ)`, an error of the
    /// predicted image at the least noisy steps, as the targets grow like `1/√(1−ᾱ)` there.
    pub fn with_drift(mut self, drift: Option<&Tensor>, in_image: bool) -> Result<Self> {
        let Some(d) = drift else {
            return Ok(self);
        };
        let c = self.noise.dim(1)?;
        let b = self.ts.len();
        let (shift, target) = if in_image {
            let sa = self.alpha_column(0..b, |a| a.sqrt())?;
            let ratio = self.alpha_column(0..b, |a| (a / (1.0 - a)).sqrt())?;
            // Rows that drift count as image errors at the least noisy steps.
            let moved = d.sqr()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()?;
            let factors: Vec<f32> = self
                .alphas
                .iter()
                .zip(&moved)
                .map(|(&a, &m)| {
                    if m > 0.0 {
                        ((1.0 - a) / a).min(1.0) as f32
                    } else {
                        1.0
                    }
                })
                .collect();
            let f = Tensor::from_vec(factors, (b, 1, 1, 1), &Device::Cpu)?;
            self.positions = Some(match self.positions.take() {
                Some(p) => p.broadcast_mul(&f)?,
                None => f.broadcast_as((b, 1, d.dim(2)?, d.dim(3)?))?.contiguous()?,
            });
            (d.broadcast_mul(&sa)?, d.broadcast_mul(&ratio)?)
        } else {
            (d.broadcast_mul(&self.noise_scale)?, d.clone())
        };
        let channels = self.input.dim(1)?;
        let xt = (self.input.narrow(1, 0, c)? + shift)?;
        self.input = if channels > c {
            Tensor::cat(&[&xt, &self.input.narrow(1, c, channels - c)?], 1)?
        } else {
            xt
        };
        self.noise = (&self.noise + target)?;
        Ok(self)
    }

    /// Weights the loss of an inpainting example's kept area `keep (B, 1, h, w)` (1 = kept)
    /// `kappa` times more, and undoes the timestep weight's cap there: kept positions count as
    /// `kappa · 1/ᾱ_t` (the v-loss, `‖ε̂ − ε‖²/ᾱ_t`, uncapped). At the noisy steps, which fix the layout, the known latents change the best ε
    /// by only `√ᾱ/√(1−ᾱ)` of their size, so the capped ε loss barely asks the model to use them
    /// and it paints the prompt's scene over the kept area.
    pub fn with_kept_weight(self, keep: Option<&Tensor>, kappa: f64) -> Result<Self> {
        let Some(keep) = keep else {
            return Ok(self);
        };
        let cap = self.weight_cap;
        let factors: Vec<f32> = self
            .alphas
            .iter()
            .map(|&a| {
                let inv = 1.0 / a;
                let capped = if cap > 0.0 { inv.min(cap) } else { 1.0 };
                (kappa * inv / capped) as f32
            })
            .collect();
        let b = factors.len();
        let g = Tensor::from_vec(factors, (b, 1, 1, 1), &Device::Cpu)?;
        // 1 where repainted, g_t where kept.
        let scale = (keep.broadcast_mul(&(g - 1.0)?)? + 1.0)?;
        self.with_position_factors(Some(scale))
    }

    /// Weights the loss of the band `(B, 1, h, w)` (1 there; [`PoolBatch::band`]) `kappa` times
    /// more: the latent cells of the user's kept area that the pipelines' `prepare_mask` gives
    /// the model to paint. 2.2's pipeline re-imposes every other kept latent, so the band is all
    /// of the kept area the model decides, and its errors spread through the MoVQ decoder.
    pub fn with_band_weight(self, band: Option<&Tensor>, kappa: f64) -> Result<Self> {
        let scale = band.map(|b| (b * (kappa - 1.0))? + 1.0).transpose()?;
        self.with_position_factors(scale)
    }

    /// Multiplies the per-position loss weights by `factors (B, 1, h, w)` (e.g. [`object_weights`]).
    pub fn with_position_factors(mut self, factors: Option<Tensor>) -> Result<Self> {
        let Some(f) = factors else {
            return Ok(self);
        };
        self.positions = Some(match self.positions.take() {
            Some(p) => (p * f)?,
            None => f,
        });
        Ok(self)
    }

    /// Makes the model predict `prediction`: the noise ε (the default), the clean latents
    /// (`Sample`, diffusers' `prediction_type="sample"`) or the velocity (`VPrediction`), with
    /// the same loss in other units: `‖ε̂ − ε‖² = SNR_t·‖x̂0 − x0‖² = ᾱ_t·‖v̂ − v‖²`, so each
    /// example's error is weighted by its ε weight times `SNR_t = ᾱ/(1−ᾱ)` or `ᾱ_t` and the
    /// timesteps keep their balance. Whatever the drift flags add to the input and to the target
    /// noise leaves the implied clean latents `(x_t − √(1−ᾱ)·ε)/√ᾱ` as they were, so the x0
    /// target is the clean latents and the v target `√ᾱ·ε − √(1−ᾱ)·x0` takes the shifted ε.
    /// An inpainting model that predicts x0 (or v, at the noisy steps) could keep the unmasked
    /// area by copying its known latents to its output, where one that predicts ε must output
    /// `(x_t − √ᾱ·x0)/√(1−ᾱ)`; for the small model's 2.1 inpainting UNet neither kept more of
    /// the input than ε at the same steps (docs/small-model.md, eighteenth session).
    pub fn predicting(mut self, prediction: Prediction) -> Self {
        // Each example's ε weight in the prediction's units.
        let units = |a: f64| match prediction {
            Prediction::Epsilon => 1.0,
            Prediction::Sample => a / (1.0 - a),
            Prediction::VPrediction => a,
        };
        for (w, &a) in self.weights.iter_mut().zip(&self.alphas) {
            *w = (f64::from(*w) * units(a)) as f32;
        }
        self.prediction = prediction;
        self
    }

    /// Gives the UNet a hint `(B, 3, H, W)` in [0, 1] (the 2.2 ControlNet's `hint`).
    pub fn with_hint(mut self, hint: Option<Tensor>) -> Self {
        self.hint = hint;
        self
    }

    /// Weights the ε loss per latent position `(B, 1, h, w)`, e.g. to count only the kept area of
    /// an inpainting example whose conditioning describes another scene.
    pub fn with_loss_weights(mut self, weights: Option<Tensor>) -> Self {
        self.positions = weights;
        self
    }

    /// The weighted ε (or x0 or v, [`NoisyBatch::predicting`]) loss plus the variance-channel target
    /// of the batch's `rows`, scaled by their share of the batch so that the losses (and
    /// gradients) of disjoint row ranges sum to the whole batch's. Returns `(total loss,
    /// unweighted loss of the prediction: ε, x0 or v)`, both so scaled.
    pub fn loss(
        &self,
        unet: &UNet2DConditionModel,
        rows: std::ops::Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let (start, n) = (rows.start, rows.len());
        let ts = &self.ts[rows.clone()];
        let (img, txt, hidden) = &self.cond;
        let (img, txt, hidden) = (
            img.narrow(0, start, n)?,
            txt.narrow(0, start, n)?,
            hidden.narrow(0, start, n)?,
        );
        let hint = self
            .hint
            .as_ref()
            .map(|h| h.narrow(0, start, n))
            .transpose()?;
        // A 2.2 UNet reads the image embedding only and ignores the text.
        let cond = UNetConditioning {
            image_embeds: Some(&img),
            text_embeds: Some(&txt),
            encoder_hidden_states: Some(&hidden),
            hint: hint.as_ref(),
        };
        let tf: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
        let input = self.input.narrow(0, start, n)?;
        let out = unet.forward_timesteps(&input, &tf, &cond)?;
        self.loss_of_output(&out, rows)
    }

    /// `f(ᾱ_t)` of the examples `rows`, as a `(rows, 1, 1, 1)` column to broadcast over them.
    fn alpha_column(&self, rows: std::ops::Range<usize>, f: impl Fn(f64) -> f64) -> Result<Tensor> {
        let n = rows.len();
        let v: Vec<f32> = self.alphas[rows].iter().map(|&a| f(a) as f32).collect();
        Ok(Tensor::from_vec(v, (n, 1, 1, 1), &Device::Cpu)?)
    }

    /// [`NoisyBatch::loss`] of the UNet output `out` of the batch's `rows`.
    fn loss_of_output(
        &self,
        out: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<(Tensor, Tensor)> {
        let (start, n) = (rows.start, rows.len());
        let share = n as f64 / self.ts.len() as f64;
        let c = self.noise.dim(1)?;
        let pred = out.narrow(1, 0, c)?;
        let target = match self.prediction {
            Prediction::Sample => self.x0.narrow(0, start, n)?,
            Prediction::Epsilon => self.noise.narrow(0, start, n)?,
            Prediction::VPrediction => {
                let eps = self.noise.narrow(0, start, n)?;
                let x0 = self.x0.narrow(0, start, n)?;
                let sa = self.alpha_column(rows.clone(), |a| a.sqrt())?;
                let sb = self.alpha_column(rows.clone(), |a| (1.0 - a).sqrt())?;
                (eps.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?)?
            }
        };
        let sq = (pred - target)?.sqr()?;
        let sq = match &self.positions {
            Some(w) => sq.broadcast_mul(&w.narrow(0, start, n)?)?,
            None => sq,
        };
        let per_example = sq.flatten_from(1)?.mean(1)?;
        let eps_loss = (per_example.mean_all()? * share)?;
        let w = Tensor::new(&self.weights[rows], &Device::Cpu)?;
        let weighted = (per_example * w)?.mean_all()?;
        let total = if out.dim(1)? > c {
            let v = out.narrow(1, c, out.dim(1)? - c)?;
            let var_loss = (v + 1.0)?.sqr()?.mean_all()?;
            (weighted + (var_loss * 0.1)?)?
        } else {
            weighted
        };
        Ok(((total * share)?, eps_loss))
    }

    /// The gradients of the whole batch's [`NoisyBatch::loss`] with respect to `vars`, computed
    /// in `parts` row ranges on as many threads and summed in part order (so deterministic), with
    /// the summed total and ε losses.
    pub fn grads(
        &self,
        unet: &UNet2DConditionModel,
        vars: &[(String, candle_core::Var)],
        parts: usize,
    ) -> Result<(GradStore, f32, f32)> {
        let b = self.ts.len();
        let parts = parts.clamp(1, b.max(1));
        let ranges: Vec<_> = (0..parts)
            .map(|p| p * b / parts..(p + 1) * b / parts)
            .collect();
        let mut results = on_threads(parts, |p| -> Result<(GradStore, f32, f32)> {
            let (l, m) = self.loss(unet, ranges[p].clone())?;
            Ok((l.backward()?, l.to_scalar::<f32>()?, m.to_scalar::<f32>()?))
        })
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
        let (mut grads, mut loss, mut metric) = results.remove(0);
        for (g, l, m) in &results {
            loss += l;
            metric += m;
            for (_, var) in vars {
                if let Some(other) = g.get(var.as_tensor()) {
                    let sum = match grads.get(var.as_tensor()) {
                        Some(mine) => (mine + other)?,
                        None => other.clone(),
                    };
                    grads.insert(var.as_tensor(), sum);
                }
            }
        }
        Ok((grads, loss, metric))
    }
}

/// The loss of [`NoisyBatch::loss`] over a whole batch in one piece (see [`NoisyBatch::new`]).
pub fn unet_loss(
    unet: &UNet2DConditionModel,
    x0: &Tensor,
    cond: &UNetCond,
    extra: Option<&Tensor>,
    weight_cap: f64,
    rng: &mut Rng,
    generator: &mut TorchGenerator,
) -> Result<(Tensor, Tensor)> {
    NoisyBatch::new(x0, cond, extra, weight_cap, rng, generator)?.loss(unet, 0..x0.dim(0)?)
}

/// The frozen models the decoder learns from: the MoVQ (latents), CLIP's vision tower (image
/// embeddings) and M-CLIP with its tokenizer (text conditioning).
pub struct DecoderTeachers {
    /// The trained MoVQ.
    pub movq: kandinsky::models::VQModel,
    /// CLIP's vision tower.
    pub vision: kandinsky::models::clip::ClipVisionModelWithProjection,
    /// M-CLIP.
    pub mclip: kandinsky::pipelines::kandinsky::text_encoder::MultilingualClip,
    /// M-CLIP's tokenizer.
    pub tokenizer: kandinsky::tokenization::PromptTokenizer,
}

/// Fraction of examples whose conditioning is replaced by the pipelines' unconditional one (the
/// zero-image CLIP embedding and M-CLIP of `""`), so classifier-free guidance works.
pub const COND_DROPOUT: f32 = 0.1;

/// Examples teachers process at once while building a pool (fixed, so the pool does not depend on
/// how it is built).
const POOL_CHUNK: usize = 64;

impl DecoderTeachers {
    /// Runs the teachers once over training examples `0..size`: their MoVQ latents (unquantised,
    /// as the pipelines encode images for image-to-image and inpainting and decode the UNet's
    /// output), CLIP image embeddings and M-CLIP text conditioning, plus the
    /// pipelines' unconditional inputs. Training then draws from this pool with fresh noise each
    /// step, so the frozen teachers cost nothing per step.
    ///
    /// The chunks are shared out over [`GRAD_PARTS`] threads (each chunk's outputs do not depend
    /// on which thread computed it). `placement` says where the examples' objects are drawn.
    pub fn pool(
        &self,
        seed: u64,
        size: usize,
        side: usize,
        placement: Placement,
    ) -> Result<DecoderPool> {
        let chunk = |first: usize| -> Result<[Tensor; 4]> {
            let n = POOL_CHUNK.min(size - first);
            let examples =
                super::shapes::training_examples_placed(seed, first as u64, n, side, placement);
            let images = super::movq::image_tensor(&examples, side)?;
            let latents = self.movq.encode(&images)?.detach();
            let pixels = super::clip::clip_pixels(&examples, side)?;
            let img = self.vision.forward(&pixels)?.image_embeds.detach();
            let captions: Vec<&str> = examples.iter().map(|e| e.caption.as_str()).collect();
            let (txt, hidden) = self.text(&captions)?;
            Ok([latents, img, txt, hidden])
        };
        let firsts: Vec<usize> = (0..size).step_by(POOL_CHUNK).collect();
        let chunks = try_map_on_threads(GRAD_PARTS, firsts.len(), |i| chunk(firsts[i]))?;
        let (mut latents, mut imgs, mut txts, mut hiddens) = (vec![], vec![], vec![], vec![]);
        for [l, im, t, h] in chunks {
            latents.push(l);
            imgs.push(im);
            txts.push(t);
            hiddens.push(h);
        }
        let (txt, hidden) = self.text(&[""])?;
        Ok(DecoderPool {
            latents: Tensor::cat(&latents, 0)?.contiguous()?,
            image_embeds: Tensor::cat(&imgs, 0)?,
            text_embeds: Tensor::cat(&txts, 0)?,
            hidden: Tensor::cat(&hiddens, 0)?,
            uncond: (self.vision.zero_image_embeds()?.detach(), txt, hidden),
            placement,
        })
    }

    fn text(&self, captions: &[&str]) -> Result<(Tensor, Tensor)> {
        let tok = self.tokenizer.encode(captions, &Device::Cpu)?;
        let (txt, hidden) = self.mclip.forward(&tok.input_ids, &tok.attention_mask)?;
        Ok((txt.detach(), hidden.detach()))
    }
}

/// The teachers' outputs for a fixed set of training examples (see [`DecoderTeachers::pool`]).
pub struct DecoderPool {
    latents: Tensor,
    image_embeds: Tensor,
    text_embeds: Tensor,
    hidden: Tensor,
    uncond: UNetCond,
    placement: Placement,
}

/// Name of the tensor holding a saved pool's key (its bytes as `u8`).
const POOL_KEY: &str = "pool_key";

/// Names of a saved pool's tensors, in the order of [`DecoderPool::tensors`].
const POOL_TENSORS: [&str; 7] = [
    "latents",
    "image_embeds",
    "text_embeds",
    "hidden",
    "uncond_image_embeds",
    "uncond_text_embeds",
    "uncond_hidden",
];

impl DecoderPool {
    fn tensors(&self) -> [&Tensor; 7] {
        [
            &self.latents,
            &self.image_embeds,
            &self.text_embeds,
            &self.hidden,
            &self.uncond.0,
            &self.uncond.1,
            &self.uncond.2,
        ]
    }

    /// Writes the pool to `path` (safetensors, atomically) under `key`, a description of
    /// everything it was built from, so that [`DecoderPool::load`] can tell a stale file.
    pub fn save(&self, path: &std::path::Path, key: &str) -> Result<()> {
        let mut tensors: std::collections::HashMap<String, Tensor> = POOL_TENSORS
            .iter()
            .zip(self.tensors())
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        let bytes = key.as_bytes().to_vec();
        let n = bytes.len();
        tensors.insert(POOL_KEY.into(), Tensor::from_vec(bytes, n, &Device::Cpu)?);
        super::checkpoint::write_atomic(path, &tensors)
    }

    /// Reads a pool written by [`DecoderPool::save`]: `None` when `path` does not exist or was
    /// saved under another key (built from other teachers or settings). `placement` is the
    /// examples' (which the key must name).
    pub fn load(path: &std::path::Path, key: &str, placement: Placement) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let mut t = super::checkpoint::read_all(path)?;
        match t.get(POOL_KEY) {
            Some(k) if k.to_vec1::<u8>()? == key.as_bytes() => {}
            _ => return Ok(None),
        }
        let mut take = |name: &str| {
            t.remove(name)
                .ok_or_else(|| kandinsky::error::Error::MissingTensor {
                    name: name.to_string(),
                    files: path.display().to_string(),
                })
        };
        let [latents, image_embeds, text_embeds, hidden, ui, ut, uh] = POOL_TENSORS.map(&mut take);
        Ok(Some(Self {
            latents: latents?,
            image_embeds: image_embeds?,
            text_embeds: text_embeds?,
            hidden: hidden?,
            uncond: (ui?, ut?, uh?),
            placement,
        }))
    }

    /// Where the pool's examples have their objects (what their depth hints must match).
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The channels of the pool's latents (the MoVQ's `latent_channels`).
    pub fn latent_channels(&self) -> usize {
        self.latents.dim(1).unwrap_or(4)
    }

    /// Examples in the pool.
    pub fn len(&self) -> usize {
        self.latents.dim(0).unwrap_or(0)
    }

    /// Whether the pool is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A batch drawn from the pool with `rng`: latents `(B, 4, h, w)`, conditioning (with
    /// [`COND_DROPOUT`] of it replaced by the unconditional inputs) and, for inpainting, the extra
    /// inputs `(masked latents, keep-mask)` of random rectangles.
    pub fn batch(
        &self,
        batch: usize,
        inpaint: bool,
        rng: &mut Rng,
    ) -> Result<(Tensor, UNetCond, Option<Tensor>)> {
        let b = self.batch_mismatched(batch, inpaint, 0.0, rng)?;
        Ok((b.x0, b.cond, b.extra))
    }

    /// [`DecoderPool::batch`] where, for inpainting, a `mismatch` fraction of the examples takes
    /// the conditioning of another pool entry, with loss weights `(B, 1, h, w)` that count only
    /// their kept area (normalised to the example's mean): the kept latents must come through
    /// whatever the prompt says, as when a user repaints a region with a new prompt, while the
    /// repainted area has no target. With `mismatch` 0 it draws exactly what `batch` draws.
    pub fn batch_mismatched(
        &self,
        batch: usize,
        inpaint: bool,
        mismatch: f32,
        rng: &mut Rng,
    ) -> Result<PoolBatch> {
        self.batch_with_dropout(batch, inpaint, mismatch, COND_DROPOUT, rng)
    }

    /// [`DecoderPool::batch_mismatched`] with `cond_dropout` of the examples (instead of
    /// [`COND_DROPOUT`]) given the unconditional inputs. It draws the same random numbers
    /// whatever the fraction, so only the dropped rows differ.
    pub fn batch_with_dropout(
        &self,
        batch: usize,
        inpaint: bool,
        mismatch: f32,
        cond_dropout: f32,
        rng: &mut Rng,
    ) -> Result<PoolBatch> {
        if self.is_empty() {
            return Err(kandinsky::error::Error::InvalidArgument(
                "the training pool is empty".into(),
            ));
        }
        let idx: Vec<u32> = (0..batch).map(|_| rng.below(self.len()) as u32).collect();
        let drop: Vec<bool> = (0..batch).map(|_| rng.unit() < cond_dropout).collect();
        let x0 = self
            .latents
            .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu)?, 0)?;
        let mismatched: Vec<bool> = if inpaint && mismatch > 0.0 {
            (0..batch).map(|_| rng.unit() < mismatch).collect()
        } else {
            vec![false; batch]
        };
        let cond_idx: Vec<u32> = idx
            .iter()
            .zip(&mismatched)
            .map(|(&i, &m)| {
                if m {
                    // Another entry (the pool's scenes differ, so its prompt does too).
                    let j = rng.below(self.len() - 1) as u32;
                    j + (j >= i) as u32
                } else {
                    i
                }
            })
            .collect();
        let pick = |pool: &Tensor, uncond: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = cond_idx
                .iter()
                .zip(&drop)
                .map(|(&i, &d)| {
                    if d {
                        Ok(uncond.clone())
                    } else {
                        pool.narrow(0, i as usize, 1)
                    }
                })
                .collect::<candle_core::Result<_>>()?;
            Ok(Tensor::cat(&rows, 0)?)
        };
        let cond = (
            pick(&self.image_embeds, &self.uncond.0)?,
            pick(&self.text_embeds, &self.uncond.1)?,
            pick(&self.hidden, &self.uncond.2)?,
        );
        let extra = if inpaint {
            let (_, _, h, w) = x0.dims4()?;
            let mut keep = vec![1f32; batch * h * w];
            for b in 0..batch {
                // A random rectangle to repaint (0 = repaint in the model's convention).
                let (rh, rw) = (1 + rng.below(h), 1 + rng.below(w));
                let (y0, x0_) = (rng.below(h - rh + 1), rng.below(w - rw + 1));
                for y in y0..y0 + rh {
                    for x in x0_..x0_ + rw {
                        keep[(b * h + y) * w + x] = 0.0;
                    }
                }
            }
            let positions = if mismatched.iter().any(|&m| m) {
                let mut weights = vec![1f32; batch * h * w];
                for (b, _) in mismatched.iter().enumerate().filter(|(_, &m)| m) {
                    let row = &keep[b * h * w..(b + 1) * h * w];
                    let kept: f32 = row.iter().sum();
                    let scale = if kept > 0.0 {
                        (h * w) as f32 / kept
                    } else {
                        0.0
                    };
                    for (o, &k) in weights[b * h * w..(b + 1) * h * w].iter_mut().zip(row) {
                        *o = k * scale;
                    }
                }
                Some(Tensor::from_vec(weights, (batch, 1, h, w), &Device::Cpu)?)
            } else {
                None
            };
            // The model sees the keep-mask as the pipelines prepare it (`prepare_mask`: the
            // repainted area grown by about one latent cell), while the loss above counts the
            // user's whole kept area: the model must continue the kept content into that band.
            let user = Tensor::from_vec(keep, (batch, 1, h, w), &Device::Cpu)?;
            let mask = prepare_mask(&user)?;
            let masked = x0.broadcast_mul(&mask)?;
            let band = (&user - &mask)?;
            (
                Some(Tensor::cat(&[masked, mask], 1)?),
                positions,
                Some(user),
                Some(band),
            )
        } else {
            (None, None, None, None)
        };
        Ok(PoolBatch {
            x0,
            cond,
            extra: extra.0,
            positions: extra.1,
            indices: idx.iter().map(|&i| i as u64).collect(),
            cond_indices: cond_idx.iter().map(|&i| i as u64).collect(),
            keep: extra.2,
            band: extra.3,
            dropped: drop,
        })
    }
}

/// A batch drawn from a [`DecoderPool`].
pub struct PoolBatch {
    /// Clean latents `(B, C, h, w)` (C: the MoVQ's latent channels).
    pub x0: Tensor,
    /// The conditioning, dropout applied.
    pub cond: UNetCond,
    /// For inpainting: `(masked image latents, keep-mask)` concatenated, `(B, 5, h, w)`.
    pub extra: Option<Tensor>,
    /// Per-position loss weights of mismatched inpainting examples.
    pub positions: Option<Tensor>,
    /// Which pool entries (training examples) the rows are.
    pub indices: Vec<u64>,
    /// Which pool entry each row's conditioning describes (its own, or another for mismatched
    /// inpainting examples; dropout not counted).
    pub cond_indices: Vec<u64>,
    /// For inpainting: the user's keep-mask `(B, 1, h, w)` (1 = kept), before the pipelines'
    /// `prepare_mask` grows the repainted area.
    pub keep: Option<Tensor>,
    /// For inpainting: the band `(B, 1, h, w)` the user keeps but `prepare_mask` hides from the
    /// model (1 there): the model paints it, and 2.2's pipeline keeps what it paints there.
    pub band: Option<Tensor>,
    /// Which rows got the unconditional conditioning.
    pub dropped: Vec<bool>,
}

impl DecoderPool {
    /// The structured noise of [`NoisyBatch::with_drift`] for `batch`: `λ · (x0[cond] − x0)` for
    /// each row whose conditioning describes another entry, `λ` uniform in `[0, max]`; zero for
    /// the other rows.
    pub fn drift(&self, batch: &PoolBatch, max: f32, rng: &mut Rng) -> Result<Tensor> {
        self.map_rows(batch, |_, x0, theirs| match theirs {
            None => Ok(x0.zeros_like()?),
            Some(target) => {
                let lambda = f64::from(rng.unit() * max);
                Ok(((target - x0)? * lambda)?)
            }
        })
    }

    /// `f(row, clean latents, the conditioning's entry's latents)` for every row of `batch` in
    /// order, the last `None` for rows conditioned on their own entry; the rows concatenated.
    fn map_rows(
        &self,
        batch: &PoolBatch,
        mut f: impl FnMut(usize, Tensor, Option<Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let rows: Vec<Tensor> = batch
            .indices
            .iter()
            .zip(&batch.cond_indices)
            .enumerate()
            .map(|(r, (&own, &other))| -> Result<Tensor> {
                let x0 = batch.x0.narrow(0, r, 1)?;
                let theirs = (own != other)
                    .then(|| self.latents.narrow(0, other as usize, 1))
                    .transpose()?;
                f(r, x0, theirs)
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Makes every mismatched inpainting row of `batch` (conditioned on another entry) a
    /// composite: its clean latents keep their own entry's in the user's kept area and take the
    /// conditioning's entry's in the repainted one, and its loss counts every position. Without
    /// this the repainted area of those rows has no target, and the model paints shapeless
    /// colour there, which the MoVQ decoder spreads into the kept pixels (its non-locality:
    /// another clean scene's latents in the repainted area move the kept pixels by 3.6/255,
    /// noise there by 7.1, against 2.5 for the round trip). The model's inputs (the kept
    /// latents and the mask) are unchanged.
    pub fn composite(&self, batch: &mut PoolBatch) -> Result<()> {
        let Some(keep) = &batch.keep else {
            return Ok(());
        };
        batch.x0 = self.map_rows(batch, |r, x0, theirs| match theirs {
            None => Ok(x0),
            Some(theirs) => {
                let k = keep.narrow(0, r, 1)?;
                Ok((x0.broadcast_mul(&k)? + theirs.broadcast_mul(&(1.0 - &k)?)?)?)
            }
        })?;
        batch.positions = None;
        Ok(())
    }

    /// Gives `rows` of `batch` the conditioning of other pool entries: `(row, entry)` pairs.
    pub fn swap_conditioning(&self, batch: &mut PoolBatch, rows: &[(usize, usize)]) -> Result<()> {
        let replace = |t: &Tensor, pool: &Tensor| -> Result<Tensor> {
            let mut parts: Vec<Tensor> = (0..t.dim(0)?)
                .map(|r| t.narrow(0, r, 1))
                .collect::<candle_core::Result<_>>()?;
            for &(r, e) in rows {
                parts[r] = pool.narrow(0, e, 1)?;
            }
            Ok(Tensor::cat(&parts, 0)?)
        };
        let (img, txt, hidden) = &batch.cond;
        batch.cond = (
            replace(img, &self.image_embeds)?,
            replace(txt, &self.text_embeds)?,
            replace(hidden, &self.hidden)?,
        );
        Ok(())
    }
}

/// For the ControlNet: pairs each training example of `seed` among `0..n` with the examples
/// showing the same scene with the object elsewhere (same shape, colours and size, another
/// position), so that part of its examples can be conditioned on an embedding whose position
/// only the hint corrects.
pub fn moved_object_partners(seed: u64, n: usize) -> Vec<Vec<usize>> {
    use std::collections::HashMap;
    let scenes: Vec<super::shapes::Scene> = (0..n as u64)
        .map(|i| super::shapes::training_example_scene(seed, i))
        .collect();
    let key = |s: &super::shapes::Scene| (s.shape, s.colour, s.background, s.size);
    let mut by_key: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, s) in scenes.iter().enumerate() {
        by_key.entry(key(s)).or_default().push(i);
    }
    scenes
        .iter()
        .map(|s| {
            by_key[&key(s)]
                .iter()
                .copied()
                .filter(|&j| scenes[j].position != s.position)
                .collect()
        })
        .collect()
}

/// Starting weights for the inpainting UNet from a trained text-to-image UNet directory, as
/// Kandinsky's inpainting model was initialised: every tensor copied, and `conv_in` widened from
/// 4 to 9 input channels with zeros for the masked-image latents and the mask, so training starts
/// from the text-to-image model's behaviour. (An inpainting UNet is taken as it is, to fine-tune
/// it.)
pub fn inpaint_init(
    unet_dir: &std::path::Path,
) -> Result<std::collections::HashMap<String, Tensor>> {
    unet_init(unet_dir, Family::V21, UNetKind::Inpaint)
}

/// Starting weights for a decoder UNet of `family` and `kind` from a trained UNet directory, so
/// that training starts from that model's behaviour:
/// - `conv_in` widened with zeros to the kind's inputs (inpainting: 9; the ControlNet: 8, the
///   hint's 4 channels);
/// - from a 2.1 UNet to a 2.2 one, the text's parameters dropped (`add_embedding.text_*`,
///   `encoder_hid_proj.text_proj`) and the 10 image tokens of `encoder_hid_proj.image_embeds`
///   repeated to the 32 of 2.2's `ImageProjection`; the layer norms 2.2 adds start afresh.
///
/// Everything else (the resnets, attention and time embedding) is copied; parameters the target
/// has and the source lacks (the hint block) are drawn from the stage's seed. From 2.1 to 2.2 the
/// start only approximates the 2.1 model: 2.2's new layer norms rescale what the copied
/// attention and time-embedding weights see.
pub fn unet_init(
    unet_dir: &std::path::Path,
    family: Family,
    kind: UNetKind,
) -> Result<std::collections::HashMap<String, Tensor>> {
    let store = kandinsky::loading::WeightStore::from_dir(unet_dir)?;
    let shapes = store.shapes();
    // The latent's channels: half the source's outputs (ε and the learned variance).
    let latent_channels = shapes
        .iter()
        .find(|(n, _)| n.as_str() == "conv_out.weight")
        .map_or(4, |(_, s)| s[0] / 2);
    let target = small_unet_config(family, kind, latent_channels)?;
    let inputs = target["in_channels"].as_u64().unwrap_or(4) as usize;
    let cross = target["cross_attention_dim"].as_u64().unwrap_or(64) as usize;
    let from_2_1 = shapes
        .iter()
        .any(|(n, _)| n.starts_with("add_embedding.text_proj"));
    if family == Family::V21 && !from_2_1 {
        return Err(kandinsky::error::Error::InvalidArgument(format!(
            "{} is not a Kandinsky 2.1 UNet: a 2.1 UNet starts from a 2.1 one",
            unet_dir.display()
        )));
    }
    let weights =
        kandinsky::loading::Weights::from_store(store, candle_core::DType::F32, &Device::Cpu);
    let mut out = std::collections::HashMap::new();
    for (name, shape) in shapes {
        let text = name.starts_with("add_embedding.text_")
            || name.starts_with("encoder_hid_proj.text_proj");
        if family == Family::V22 && from_2_1 && text {
            continue;
        }
        let t = weights.get(shape.as_slice(), &name)?;
        let t = if name == "conv_in.weight" {
            let (o, i, kh, kw) = t.dims4()?;
            if i > inputs {
                return Err(kandinsky::error::Error::InvalidArgument(format!(
                    "{}: conv_in takes {i} inputs, more than the {inputs} of the UNet to train",
                    unet_dir.display()
                )));
            }
            if inputs > i {
                let zeros = Tensor::zeros((o, inputs - i, kh, kw), t.dtype(), t.device())?;
                Tensor::cat(&[&t, &zeros], 1)?
            } else {
                t
            }
        } else if family == Family::V22
            && from_2_1
            && name.starts_with("encoder_hid_proj.image_embeds")
        {
            // (10·cross, …) token-major → (32·cross, …): token j starts as token j mod 10.
            let tokens = t.dim(0)? / cross;
            let rows: Vec<u32> = (0..32 * cross)
                .map(|r| (((r / cross) % tokens) * cross + r % cross) as u32)
                .collect();
            t.index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?
        } else {
            t
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// What [`train_unet`] trains and how.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct UNetStage {
    /// The family (conditioning).
    pub family: Family,
    /// Text-to-image, inpainting or the depth ControlNet.
    pub kind: UNetKind,
    /// The ε loss's per-timestep weight cap ([`timestep_weights`]; 0: plain ε loss).
    pub weight_cap: f64,
    /// For inpainting: the fraction of examples conditioned on another scene, their loss on the
    /// kept area only ([`DecoderPool::batch_mismatched`]).
    pub mismatch: f32,
    /// For inpainting: the largest share `λ` (drawn uniformly in `[0, drift]`) of the way
    /// towards the conditioning's scene that a mismatched example's noise leans
    /// ([`DecoderPool::drift`], [`NoisyBatch::with_drift`]); 0: plain Gaussian noise.
    pub drift: f32,
    /// The drift moves the clean latents rather than the noise ([`NoisyBatch::with_drift`]).
    pub drift_in_image: bool,
    /// Timesteps are drawn from `0..timesteps` ([`NoisyBatch::below`]); 0 means all 1000.
    pub timesteps: usize,
    /// For inpainting: how much more the kept area's loss counts, its timestep weight uncapped
    /// ([`NoisyBatch::with_kept_weight`]); 0: as the rest of the image.
    pub kept_weight: f64,
    /// For the ControlNet: the fraction of examples conditioned on the same scene with the object
    /// elsewhere ([`moved_object_partners`]), so that the position must come from the hint.
    pub moved: f32,
    /// For inpainting: mismatched examples are composites whose repainted area shows the
    /// conditioning's scene, their loss over every position ([`DecoderPool::composite`]).
    pub composite: bool,
    /// For inpainting: how much more the band's loss counts ([`NoisyBatch::with_band_weight`]);
    /// 0: as the rest of the image.
    pub band_weight: f64,
    /// How much more the loss counts on the object's latent cells and their neighbours than on
    /// the plain background, each example's weights then scaled to a mean of 1
    /// ([`object_weights`]); 0 or 1: every cell alike.
    pub object_weight: f64,
    /// The learning-rate factor of `conv_in`'s inputs beyond the latents (the inpainting UNet's
    /// masked latents and mask, the ControlNet's hint channels), which start at zero while the
    /// rest of the model is trained: 0 or 1 leaves them at the common rate.
    pub new_input_lr: f64,
    /// The fraction of examples given the unconditional inputs; `None`: [`COND_DROPOUT`].
    pub cond_dropout: Option<f32>,
    /// What the model predicts: `Epsilon` (the noise), `Sample` (the clean latents) or
    /// `VPrediction` (the velocity; [`NoisyBatch::predicting`]). The stage writes it into its
    /// `scheduler/` config, which [`crate::assemble`] ships with the model.
    pub prediction: Prediction,
}

/// What a decoder UNet predicts (diffusers' `prediction_type`, as far as training supports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prediction {
    /// The noise ε (`"epsilon"`), as every Kandinsky checkpoint.
    #[default]
    Epsilon,
    /// The clean latents x0 (`"sample"`).
    Sample,
    /// The velocity `v = √ᾱ·ε − √(1−ᾱ)·x0` (`"v_prediction"`): close to ε at the least noisy
    /// steps and to −x0 at the noisiest.
    VPrediction,
}

impl Prediction {
    /// The scheduler config's `prediction_type`.
    pub fn prediction_type(self) -> PredictionType {
        match self {
            Prediction::Epsilon => PredictionType::Epsilon,
            Prediction::Sample => PredictionType::Sample,
            Prediction::VPrediction => PredictionType::VPrediction,
        }
    }
}

/// Loss weights `(B, 1, side, side)` for training examples `indices` of `seed` at the latent's
/// `side` (objects placed as `placement` says): `kappa` on the cells the object covers (any part
/// of them, from its silhouette at that size) and on their eight neighbours, 1 on the rest of the
/// background; each row then scaled to a mean of 1. A small object covers a tenth of the latent, so the plain ε loss hardly asks
/// for its corners, which are what tells a small square from a circle.
pub fn object_weights(
    seed: u64,
    indices: &[u64],
    side: usize,
    placement: Placement,
    kappa: f64,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(indices.len() * side * side);
    for &i in indices {
        let hint = super::shapes::training_depth_hint_placed(seed, i, side, placement);
        let covered: Vec<bool> = (0..side * side)
            .map(|p| hint[3 * p] > super::shapes::DEPTH_FAR)
            .collect();
        let near = |y: usize, x: usize| {
            (y.saturating_sub(1)..(y + 2).min(side)).any(|yy| {
                (x.saturating_sub(1)..(x + 2).min(side)).any(|xx| covered[yy * side + xx])
            })
        };
        let row: Vec<f64> = (0..side * side)
            .map(|p| if near(p / side, p % side) { kappa } else { 1.0 })
            .collect();
        let mean = row.iter().sum::<f64>() / row.len() as f64;
        data.extend(row.iter().map(|w| (w / mean) as f32));
    }
    Ok(Tensor::from_vec(
        data,
        (indices.len(), 1, side, side),
        &Device::Cpu,
    )?)
}

/// The depth hints `(B, 3, H, W)` in [0, 1] of training examples `indices` of `seed` (the pool's
/// entries, their objects placed as `placement` says), `side` pixels wide.
pub fn depth_hints(
    seed: u64,
    indices: &[u64],
    side: usize,
    placement: Placement,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(indices.len() * 3 * side * side);
    for &i in indices {
        let rgb = super::shapes::training_depth_hint_placed(seed, i, side, placement);
        for c in 0..3 {
            data.extend((0..side * side).map(|p| rgb[3 * p + c] as f32 / 255.0));
        }
    }
    Ok(Tensor::from_vec(
        data,
        (indices.len(), 3, side, side),
        &Device::Cpu,
    )?)
}

/// Trains (or resumes) a decoder UNet of `stage`'s family and kind on the teachers' `pool` (built
/// from the training examples of `opts.seed`) and exports `out_dir/unet/`.
pub fn train_unet(
    opts: &super::trainer::TrainOptions,
    pool: &DecoderPool,
    stage: UNetStage,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<super::trainer::TrainReport> {
    let value = small_unet_config(stage.family, stage.kind, pool.latent_channels())?;
    let inpaint = stage.kind == UNetKind::Inpaint;
    let partners = if stage.kind == UNetKind::DepthControl && stage.moved > 0.0 {
        moved_object_partners(opts.seed, pool.len())
    } else {
        Vec::new()
    };
    let config: kandinsky::models::UNet2DConditionConfig = serde_json::from_value(value.clone())
        .map_err(|source| kandinsky::error::Error::Json {
            path: std::path::PathBuf::from("(unet config)"),
            source,
        })?;
    let scaled;
    let opts = if stage.new_input_lr > 0.0 && stage.kind != UNetKind::TextToImage {
        let c = pool.latent_channels();
        let inputs = config.in_channels;
        let factors: Vec<f32> = (0..inputs)
            .map(|i| {
                if i < c {
                    1.0
                } else {
                    stage.new_input_lr as f32
                }
            })
            .collect();
        let mut o = opts.clone();
        o.lr_scales.insert(
            "conv_in.weight".into(),
            Tensor::from_vec(factors, (1, inputs, 1, 1), &Device::Cpu)?,
        );
        scaled = o;
        &scaled
    } else {
        opts
    };
    super::trainer::run_loop_grads(
        opts,
        |params| {
            UNet2DConditionModel::new(&kandinsky::loading::Weights::trainable(params), &config)
        },
        |unet, vars, step| {
            let mut rng = Rng::new(opts.seed ^ 0x0e7 ^ step.wrapping_mul(0x1000_0001));
            let mut generator = TorchGenerator::new(opts.seed ^ step.wrapping_mul(104_729));
            let dropout = stage.cond_dropout.unwrap_or(COND_DROPOUT);
            let mut b =
                pool.batch_with_dropout(opts.batch, inpaint, stage.mismatch, dropout, &mut rng)?;
            if stage.composite {
                pool.composite(&mut b)?;
            }
            if !partners.is_empty() {
                // A stream of its own, so that the rest of the batch is what it was without.
                let mut moves = Rng::new(opts.seed ^ 0x30ed ^ step.wrapping_mul(0x1000_0001));
                let mut swaps = Vec::new();
                for (row, &entry) in b.indices.iter().enumerate() {
                    let others = &partners[entry as usize];
                    if moves.unit() < stage.moved && !b.dropped[row] && !others.is_empty() {
                        swaps.push((row, others[moves.below(others.len())]));
                    }
                }
                pool.swap_conditioning(&mut b, &swaps)?;
            }
            let drift = if stage.drift > 0.0 {
                // A stream of its own, so that the rest of the batch is what it was without.
                let mut lean = Rng::new(opts.seed ^ 0xd71f ^ step.wrapping_mul(0x1000_0001));
                Some(pool.drift(&b, stage.drift, &mut lean)?)
            } else {
                None
            };
            let hint = match stage.kind {
                UNetKind::DepthControl => {
                    let side = b.x0.dim(2)? * HINT_BLOCK_FACTOR;
                    Some(depth_hints(opts.seed, &b.indices, side, pool.placement())?)
                }
                _ => None,
            };
            let end = match stage.timesteps {
                0 => TRAIN_TIMESTEPS,
                t => t,
            };
            NoisyBatch::below(
                end,
                &b.x0,
                &b.cond,
                b.extra.as_ref(),
                stage.weight_cap,
                &mut rng,
                &mut generator,
            )?
            .with_loss_weights(b.positions)
            .with_drift(drift.as_ref(), stage.drift_in_image)?
            .with_kept_weight(
                b.keep.as_ref().filter(|_| stage.kept_weight > 0.0),
                stage.kept_weight,
            )?
            .with_band_weight(
                b.band.as_ref().filter(|_| stage.band_weight > 0.0),
                stage.band_weight,
            )?
            .with_position_factors(if stage.object_weight > 0.0 && stage.object_weight != 1.0 {
                Some(object_weights(
                    opts.seed,
                    &b.indices,
                    b.x0.dim(2)?,
                    pool.placement(),
                    stage.object_weight,
                )?)
            } else {
                None
            })?
            .with_hint(hint)
            .predicting(stage.prediction)
            .grads(unet, vars, GRAD_PARTS)
        },
        |params| {
            super::checkpoint::export_component(
                &opts.out_dir.join("unet"),
                &value,
                &params.tensors(),
                "diffusion_pytorch_model.safetensors",
            )?;
            super::assemble::write_json(
                &opts.out_dir.join(super::assemble::SCHEDULER_CONFIG),
                &super::assemble::decoder_scheduler(&stage.prediction.prediction_type()),
            )
        },
        log,
    )
}

impl DecoderTeachers {
    /// Loads the frozen teachers from the stage outputs: `movq_run/movq/`,
    /// `clip_run/image_encoder/`, `mclip_run/text_encoder/` and `mclip_run/tokenizer/`.
    pub fn load(movq_run: &Path, clip_run: &Path, mclip_run: &Path) -> Result<Self> {
        let (d, f32) = (Device::Cpu, candle_core::DType::F32);
        let [movq, vision, mclip, tokenizer] = Self::dirs(movq_run, clip_run, mclip_run);
        let from =
            |what: &str, dir: &Path| format!("loading the trained {what} from {}", dir.display());
        Ok(Self {
            movq: kandinsky::models::VQModel::load(&movq, f32, &d)
                .map_err(|e| e.within(from("MoVQ", movq_run)))?,
            vision: kandinsky::models::clip::ClipVisionModelWithProjection::load(&vision, f32, &d)
                .map_err(|e| e.within(from("CLIP", clip_run)))?,
            mclip: kandinsky::pipelines::kandinsky::text_encoder::MultilingualClip::load(
                &mclip, f32, &d,
            )
            .map_err(|e| e.within(from("M-CLIP", mclip_run)))?,
            tokenizer: kandinsky::tokenization::PromptTokenizer::xlm_roberta_from_dir(&tokenizer)
                .map_err(|e| e.within(from("M-CLIP tokenizer", mclip_run)))?,
        })
    }

    /// The directories [`DecoderTeachers::load`] reads (what [`cached_pool`] keys the pool by):
    /// the MoVQ, CLIP's vision tower, M-CLIP and its tokenizer.
    pub fn dirs(movq_run: &Path, clip_run: &Path, mclip_run: &Path) -> [PathBuf; 4] {
        [
            movq_run.join("movq"),
            clip_run.join("image_encoder"),
            mclip_run.join("text_encoder"),
            mclip_run.join("tokenizer"),
        ]
    }
}

/// Where [`cached_pool`] got its pool.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoolOrigin {
    /// Read from the cache file.
    Reused,
    /// Computed by the teachers, in this many seconds (and written to the cache file, if any).
    Built(f64),
}

/// The teachers' pool of `size` examples, read from `cache` when that file was written for the
/// same teachers (the files under `teacher_dirs`, hashed), seed, size, image side and
/// placement, otherwise built (and then written to `cache`). Without a cache nothing is hashed.
pub fn cached_pool(
    teachers: &DecoderTeachers,
    teacher_dirs: &[PathBuf],
    (seed, size, side, placement): (u64, usize, usize, Placement),
    cache: Option<&Path>,
) -> Result<(DecoderPool, PoolOrigin)> {
    let keyed = match cache {
        Some(path) => {
            // Free placement adds nothing, so caches written before placements existed still
            // match.
            let placed = match placement {
                Placement::Free => String::new(),
                Placement::Grid(n) => format!(" placed on a {n}x{n} grid"),
            };
            let key = format!(
                "seed {seed} pool {size} side {side}{placed} latents unquantised teachers {}",
                fingerprint(teacher_dirs)?
            );
            let what = || format!("reading the teachers' pool {}", path.display());
            let cached = DecoderPool::load(path, &key, placement).map_err(|e| e.within(what()))?;
            if let Some(pool) = cached {
                return Ok((pool, PoolOrigin::Reused));
            }
            Some((path, key))
        }
        None => None,
    };
    let started = std::time::Instant::now();
    let pool = teachers.pool(seed, size, side, placement)?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some((path, key)) = keyed {
        pool.save(path, &key)
            .map_err(|e| e.within(format!("writing the teachers' pool {}", path.display())))?;
    }
    Ok((pool, PoolOrigin::Built(seconds)))
}

/// FNV-1a (64-bit) over the names and contents of the files in `dirs`, in name order: what the
/// teachers' pool was computed from.
pub fn fingerprint(dirs: &[PathBuf]) -> Result<String> {
    let mut h = kandinsky::utils::FNV1A_OFFSET;
    for dir in dirs {
        let io = |e| kandinsky::Error::Io {
            path: dir.clone(),
            source: e,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            h = kandinsky::utils::fnv1a(h, f.file_name().map_or(&[][..], |n| n.as_encoded_bytes()));
            let bytes = std::fs::read(f).map_err(|e| kandinsky::Error::Io {
                path: f.clone(),
                source: e,
            })?;
            h = kandinsky::utils::fnv1a(h, &bytes);
        }
    }
    Ok(format!("{h:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// A pool of `n` entries whose tensors say which entry they are: latents `i·64 + k`, image
    /// embedding `[2i, 2i + 1]`.
    fn numbered_pool(n: usize) -> DecoderPool {
        let d = Device::Cpu;
        let count = |shape: &[usize]| {
            let len: usize = shape.iter().product();
            Tensor::arange(0f32, len as f32, &d)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        DecoderPool {
            latents: count(&[n, 4, 4, 4]),
            image_embeds: count(&[n, 2]),
            text_embeds: count(&[n, 2]),
            hidden: count(&[n, 3, 2]),
            uncond: (
                Tensor::zeros((1, 2), DType::F32, &d).unwrap(),
                Tensor::zeros((1, 2), DType::F32, &d).unwrap(),
                Tensor::zeros((1, 3, 2), DType::F32, &d).unwrap(),
            ),
            placement: Placement::Free,
        }
    }

    #[test]
    fn cond_dropout_replaces_only_the_drawn_rows_and_keeps_the_rest_of_the_batch() {
        let pool = numbered_pool(6);
        let draw = |dropout: f32| {
            pool.batch_with_dropout(64, false, 0.0, dropout, &mut Rng::new(11))
                .unwrap()
        };
        let default = pool
            .batch_mismatched(64, false, 0.0, &mut Rng::new(11))
            .unwrap();
        let (none, some, all) = (draw(0.0), draw(0.3), draw(1.0));
        assert_eq!(draw(COND_DROPOUT).dropped, default.dropped);
        assert!(none.dropped.iter().all(|d| !d) && all.dropped.iter().all(|&d| d));
        let n = some.dropped.iter().filter(|&&d| d).count();
        assert!((8..=32).contains(&n), "{n} of 64 dropped at 0.3");
        // The same entries whatever the fraction; dropped rows get the zero inputs.
        assert_eq!(none.indices, all.indices);
        let (kept, dropped) = (
            none.cond.0.to_vec2::<f32>().unwrap(),
            some.cond.0.to_vec2::<f32>().unwrap(),
        );
        for (row, &d) in some.dropped.iter().enumerate() {
            let want = if d { vec![0.0, 0.0] } else { kept[row].clone() };
            assert_eq!(dropped[row], want, "row {row}");
        }
    }

    #[test]
    fn moved_object_partners_differ_in_position_only_and_swaps_replace_those_rows() {
        use crate::shapes::training_example_scene;
        let partners = moved_object_partners(4, 400);
        let mut with = 0;
        for (i, others) in partners.iter().enumerate() {
            let a = training_example_scene(4, i as u64);
            with += !others.is_empty() as usize;
            for &j in others {
                let b = training_example_scene(4, j as u64);
                assert_ne!(a.position, b.position);
                assert_eq!(
                    (a.shape, a.colour, a.background, a.size),
                    (b.shape, b.colour, b.background, b.size)
                );
            }
        }
        // 400 examples over ~1,500 scenes: some have a moved partner, not all.
        assert!(with > 0 && with < 400, "{with}");
        let pool = numbered_pool(6);
        let mut b = pool
            .batch_mismatched(4, false, 0.0, &mut Rng::new(9))
            .unwrap();
        let before = b.cond.0.to_vec2::<f32>().unwrap();
        pool.swap_conditioning(&mut b, &[(1, 5), (3, 0)]).unwrap();
        let after = b.cond.0.to_vec2::<f32>().unwrap();
        assert_eq!(after[0], before[0]);
        assert_eq!(after[2], before[2]);
        assert_eq!(after[1], vec![10.0, 11.0]);
        assert_eq!(after[3], vec![0.0, 1.0]);
        assert_eq!(b.cond.2.dims(), &[4, 3, 2]);
    }

    #[test]
    fn predicting_x0_or_v_gives_the_eps_loss_of_the_same_prediction() {
        // An x0 or v prediction and the ε prediction it implies, `x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ`,
        // must get the same loss, with every weighting the inpainting stages stack: a capped timestep
        // weight, drift in the image, per-position weights and the band.
        let d = Device::Cpu;
        let b = 8;
        let x0 = Tensor::randn(0f32, 1.0, (b, 4, 4, 4), &d).unwrap();
        let extra = Tensor::randn(0f32, 1.0, (b, 5, 4, 4), &d).unwrap();
        let cond = (
            Tensor::zeros((b, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((b, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((b, 3, 2), DType::F32, &d).unwrap(),
        );
        let drift = Tensor::randn(0f32, 1.0, (b, 4, 4, 4), &d).unwrap();
        let drift = Tensor::cat(
            &[
                drift.narrow(0, 0, b / 2).unwrap(),
                drift.narrow(0, b / 2, b / 2).unwrap().zeros_like().unwrap(),
            ],
            0,
        )
        .unwrap();
        let positions = Tensor::rand(0.5f32, 2.0, (b, 1, 4, 4), &d).unwrap();
        let band = Tensor::rand(0f32, 1.0, (b, 1, 4, 4), &d)
            .unwrap()
            .ge(0.7)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let draw = |prediction| {
            NoisyBatch::new(
                &x0,
                &cond,
                Some(&extra),
                50.0,
                &mut Rng::new(5),
                &mut TorchGenerator::new(6),
            )
            .unwrap()
            .with_loss_weights(Some(positions.clone()))
            .with_drift(Some(&drift), true)
            .unwrap()
            .with_band_weight(Some(&band), 8.0)
            .unwrap()
            .predicting(prediction)
        };
        let (eps, sample) = (draw(Prediction::Epsilon), draw(Prediction::Sample));
        let ac = alphas_cumprod(&linspace_f32(0.00085, 0.012, 1000));
        let col = |f: &dyn Fn(f32) -> f32| {
            let v: Vec<f32> = eps.ts.iter().map(|&t| f(ac[t])).collect();
            Tensor::from_vec(v, (b, 1, 1, 1), &d).unwrap()
        };
        let eps_hat = Tensor::randn(0f32, 1.0, (b, 8, 4, 4), &d).unwrap();
        let xt = eps.input.narrow(1, 0, 4).unwrap();
        let x0_hat = xt
            .sub(
                &eps_hat
                    .narrow(1, 0, 4)
                    .unwrap()
                    .broadcast_mul(&col(&|a| (1.0 - a).sqrt()))
                    .unwrap(),
            )
            .unwrap()
            .broadcast_div(&col(&|a| a.sqrt()))
            .unwrap();
        let var = eps_hat.narrow(1, 4, 4).unwrap();
        let x0_out = Tensor::cat(&[&x0_hat, &var], 1).unwrap();
        // v̂ = √ᾱ·ε̂ − √(1−ᾱ)·x̂0.
        let v_hat = (eps_hat
            .narrow(1, 0, 4)
            .unwrap()
            .broadcast_mul(&col(&|a| a.sqrt()))
            .unwrap()
            - x0_hat.broadcast_mul(&col(&|a| (1.0 - a).sqrt())).unwrap())
        .unwrap();
        let v_out = Tensor::cat(&[&v_hat, &var], 1).unwrap();
        let velocity = draw(Prediction::VPrediction);
        for (what, batch, out) in [("x0", &sample, &x0_out), ("v", &velocity, &v_out)] {
            for rows in [0..b, 0..b / 2, b / 2..b] {
                let want = eps.loss_of_output(
                    &eps_hat.narrow(0, rows.start, rows.len()).unwrap(),
                    rows.clone(),
                );
                let got = batch.loss_of_output(
                    &out.narrow(0, rows.start, rows.len()).unwrap(),
                    rows.clone(),
                );
                let (want, got) = (
                    want.unwrap().0.to_scalar::<f32>().unwrap(),
                    got.unwrap().0.to_scalar::<f32>().unwrap(),
                );
                assert!(
                    (want - got).abs() <= 1e-4 * want.abs(),
                    "rows {rows:?}: ε loss {want}, {what} loss {got}"
                );
            }
        }
        // A wrong x0 is not excused: the target is the clean latents, whatever the drift.
        let off = sample
            .loss_of_output(&(&x0_out + 0.1).unwrap(), 0..b)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        let right = sample
            .loss_of_output(
                &Tensor::cat(&[&x0, &eps_hat.narrow(1, 4, 4).unwrap()], 1).unwrap(),
                0..b,
            )
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        let var_only = eps
            .loss_of_output(
                &Tensor::cat(&[&eps.noise, &eps_hat.narrow(1, 4, 4).unwrap()], 1).unwrap(),
                0..b,
            )
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (right - var_only).abs() <= 1e-5 * var_only,
            "{right} {var_only}"
        );
        assert!(off > 1.5 * right, "{off} {right}");
    }

    #[test]
    fn drift_moves_the_noisy_latents_and_the_target_together() {
        let d = Device::Cpu;
        let x0 = Tensor::randn(0f32, 1.0, (3, 4, 4, 4), &d).unwrap();
        let extra = Tensor::randn(0f32, 1.0, (3, 5, 4, 4), &d).unwrap();
        let cond = (
            Tensor::zeros((3, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((3, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((3, 3, 2), DType::F32, &d).unwrap(),
        );
        let drift = Tensor::randn(0f32, 1.0, (3, 4, 4, 4), &d).unwrap();
        let draw = || {
            NoisyBatch::new(
                &x0,
                &cond,
                Some(&extra),
                0.0,
                &mut Rng::new(2),
                &mut TorchGenerator::new(3),
            )
            .unwrap()
        };
        let plain = draw();
        let drifted = draw().with_drift(Some(&drift), false).unwrap();
        let ac = alphas_cumprod(&linspace_f32(0.00085, 0.012, 1000));
        let sub = |a: &Tensor, b: &Tensor| (a - b).unwrap();
        for r in 0..3 {
            let sb = (1.0 - ac[plain.ts[r]]).sqrt();
            let moved = sub(&drifted.input.get(r).unwrap(), &plain.input.get(r).unwrap());
            let want = (drift.get(r).unwrap() * f64::from(sb)).unwrap();
            let err = sub(&moved.narrow(0, 0, 4).unwrap(), &want)
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-5, "row {r}: {err}");
            let extra_moved = moved.narrow(0, 4, 5).unwrap().abs().unwrap();
            assert_eq!(
                extra_moved.max_all().unwrap().to_scalar::<f32>().unwrap(),
                0.0
            );
        }
        let target = sub(&drifted.noise, &plain.noise);
        let err = sub(&target, &drift).abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() < 1e-6);
        // In the image: the input moves by √ᾱ·drift, the target by √ᾱ/√(1−ᾱ)·drift, and each
        // drifting row's loss is weighted min(1, (1−ᾱ)/ᾱ); a row without drift keeps weight 1.
        let still = Tensor::cat(
            &[
                drift.narrow(0, 0, 2).unwrap(),
                drift.narrow(0, 2, 1).unwrap().zeros_like().unwrap(),
            ],
            0,
        )
        .unwrap();
        let image = draw().with_drift(Some(&still), true).unwrap();
        let weights = image.positions.as_ref().unwrap();
        for r in 0..3 {
            let a = ac[plain.ts[r]] as f64;
            let d = still.get(r).unwrap();
            let moved = sub(&image.input.get(r).unwrap(), &plain.input.get(r).unwrap());
            let target = sub(&image.noise.get(r).unwrap(), &plain.noise.get(r).unwrap());
            for (got, scale) in [
                (moved.narrow(0, 0, 4).unwrap(), a.sqrt()),
                (target, (a / (1.0 - a)).sqrt()),
            ] {
                let want = (&d * scale).unwrap();
                let err = sub(&got, &want).abs().unwrap().max_all().unwrap();
                let err = err.to_scalar::<f32>().unwrap() as f64;
                assert!(err < 1e-4 * scale.max(1.0), "row {r}: {err}");
            }
            let w = weights.get(r).unwrap().flatten_all().unwrap();
            let want = if r < 2 { ((1.0 - a) / a).min(1.0) } else { 1.0 };
            for v in w.to_vec1::<f32>().unwrap() {
                assert!(
                    (v as f64 - want).abs() < 1e-5,
                    "row {r}: weight {v}, want {want}"
                );
            }
        }
        // No drift: the batch as drawn.
        let same = draw().with_drift(None, true).unwrap();
        let diff = sub(&same.input, &plain.input)
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn the_kept_area_counts_kappa_times_its_uncapped_timestep_weight() {
        let d = Device::Cpu;
        let b = 6;
        let x0 = Tensor::zeros((b, 4, 2, 2), DType::F32, &d).unwrap();
        let cond = (
            Tensor::zeros((b, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((b, 2), DType::F32, &d).unwrap(),
            Tensor::zeros((b, 3, 2), DType::F32, &d).unwrap(),
        );
        // Left column kept, right column repainted; row 0 already weighted (a mismatched row).
        let keep = Tensor::new(&[1f32, 0., 1., 0.], &d)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap()
            .repeat((b, 1, 1, 1))
            .unwrap();
        let prior = Tensor::ones((b, 1, 2, 2), DType::F32, &d).unwrap();
        let prior = Tensor::cat(
            &[
                (prior.narrow(0, 0, 1).unwrap() * 2.0).unwrap(),
                prior.narrow(0, 1, b - 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        let draw = || {
            NoisyBatch::new(
                &x0,
                &cond,
                None,
                50.0,
                &mut Rng::new(11),
                &mut TorchGenerator::new(1),
            )
            .unwrap()
        };
        let batch = draw()
            .with_loss_weights(Some(prior))
            .with_kept_weight(Some(&keep), 3.0)
            .unwrap();
        let ac = alphas_cumprod(&linspace_f32(0.00085, 0.012, 1000));
        let w = batch.positions.unwrap();
        let mut uncapped = 0;
        for r in 0..b {
            let inv = 1.0 / ac[batch.ts[r]] as f64;
            let g = 3.0 * inv / inv.min(50.0);
            uncapped += usize::from(inv > 50.0);
            let base = if r == 0 { 2.0 } else { 1.0 };
            let got = w
                .get(r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = [base * g, base, base * g, base];
            for (a, e) in got.iter().zip(want) {
                assert!(
                    (*a as f64 - e).abs() < 1e-4 * e,
                    "row {r}: {got:?} against {want:?}"
                );
            }
        }
        assert!(uncapped > 0 && uncapped < b, "timesteps {:?}", batch.ts);
        // Without a keep-mask nothing changes.
        let plain = draw().with_kept_weight(None, 3.0).unwrap();
        assert!(plain.positions.is_none());
        // The band's weight multiplies what is there: 5 on the band, 1 elsewhere.
        let band = Tensor::new(&[0f32, 1., 0., 0.], &d)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap()
            .repeat((b, 1, 1, 1))
            .unwrap();
        let w = draw()
            .with_loss_weights(Some(
                (Tensor::ones((b, 1, 2, 2), DType::F32, &d).unwrap() * 2.0).unwrap(),
            ))
            .with_band_weight(Some(&band), 5.0)
            .unwrap()
            .positions
            .unwrap();
        for r in 0..b {
            let got = w
                .get(r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, [2.0, 10.0, 2.0, 2.0], "row {r}");
        }
        assert!(draw()
            .with_band_weight(None, 5.0)
            .unwrap()
            .positions
            .is_none());
    }

    #[test]
    fn composites_take_the_prompts_latents_in_the_repainted_area_and_count_everywhere() {
        let pool = numbered_pool(6);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut b = pool
            .batch_mismatched(32, true, 0.5, &mut Rng::new(9))
            .unwrap();
        let before = flat(&b.x0);
        let extra = flat(b.extra.as_ref().unwrap());
        assert!(b.positions.is_some());
        pool.composite(&mut b).unwrap();
        assert!(b.positions.is_none());
        // The model's inputs are untouched.
        assert_eq!(flat(b.extra.as_ref().unwrap()), extra);
        let (mut mixed, mut own) = (0, 0);
        for r in 0..32 {
            let x = flat(&b.x0.get(r).unwrap());
            let keep = flat(&b.keep.as_ref().unwrap().get(r).unwrap());
            let (i, j) = (b.indices[r] as usize, b.cond_indices[r] as usize);
            for (p, v) in x.iter().enumerate() {
                // Entry e's latents count from 64·e; position p holds channel p / 16, cell p % 16.
                let entry = if i == j || keep[p % 16] == 1.0 { i } else { j };
                assert_eq!(*v, (64 * entry + p) as f32, "row {r}, value {p}");
                if i == j {
                    assert_eq!(*v, before[64 * r + p]);
                }
            }
            if i == j {
                own += 1;
            } else {
                mixed += 1;
            }
        }
        assert!(mixed > 0 && own > 0, "{mixed} composites, {own} own rows");
    }

    #[test]
    fn object_weights_cover_the_object_and_its_neighbours_with_mean_one() {
        let side = 16;
        let indices: Vec<u64> = (0..12).collect();
        let w = object_weights(3, &indices, side, Placement::Free, 4.0).unwrap();
        for (r, &i) in indices.iter().enumerate() {
            let row = w
                .get(r)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let mean = row.iter().sum::<f32>() / row.len() as f32;
            assert!((mean - 1.0).abs() < 1e-5, "row {r}: mean {mean}");
            // Two levels, 4:1, the higher one on every cell the object touches.
            let (lo, hi) = (
                row.iter().cloned().fold(f32::INFINITY, f32::min),
                row.iter().cloned().fold(0.0, f32::max),
            );
            assert!((hi / lo - 4.0).abs() < 1e-4, "row {r}: {lo} .. {hi}");
            let hint = crate::shapes::training_depth_hint(3, i, side);
            let mut on_object = 0;
            for p in 0..side * side {
                if hint[3 * p] > crate::shapes::DEPTH_FAR {
                    assert_eq!(row[p], hi, "row {r}: object cell {p}");
                    on_object += 1;
                }
            }
            let heavy = row.iter().filter(|&&v| v == hi).count();
            assert!(
                on_object > 0 && heavy > on_object && heavy < side * side,
                "row {r}"
            );
        }
    }

    #[test]
    fn mismatched_inpainting_examples_count_only_their_kept_area() {
        let pool = numbered_pool(6);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Without mismatches: exactly what `batch` draws (the recipe's earlier runs).
        let (x0, cond, extra) = pool.batch(8, true, &mut Rng::new(3)).unwrap();
        let PoolBatch {
            x0: x0m,
            cond: condm,
            extra: extram,
            positions: weights,
            ..
        } = pool
            .batch_mismatched(8, true, 0.0, &mut Rng::new(3))
            .unwrap();
        assert_eq!(flat(&x0), flat(&x0m));
        assert_eq!(flat(&cond.0), flat(&condm.0));
        assert_eq!(flat(&extra.unwrap()), flat(&extram.unwrap()));
        assert!(weights.is_none());

        let b = 64;
        let PoolBatch {
            x0,
            cond,
            extra,
            positions: weights,
            indices,
            keep: user_keep,
            band,
            ..
        } = pool
            .batch_mismatched(b, true, 1.0, &mut Rng::new(5))
            .unwrap();
        let (extra, weights) = (extra.unwrap(), weights.unwrap());
        let (mut other, mut dropped) = (0, 0);
        for (r, &index) in indices.iter().enumerate() {
            let entry = flat(&x0.get(r).unwrap())[0] as usize / 64;
            assert_eq!(index, entry as u64);
            let img = flat(&cond.0.get(r).unwrap());
            if img == [0.0, 0.0] {
                dropped += 1;
            } else {
                assert_ne!(
                    img[0] as usize / 2,
                    entry,
                    "row {r} kept its own conditioning"
                );
                other += 1;
            }
            // The loss counts the user's kept area (all but one rectangle), scaled to a mean of 1
            // over the example; the model's keep-mask (the extra input's last channel) is that
            // area as the pipelines prepare it, and the masked latents are zero outside it.
            let w = flat(&weights.get(r).unwrap());
            let user: Vec<f32> = w.iter().map(|&v| f32::from(v > 0.0)).collect();
            let kept: f32 = user.iter().sum();
            assert!(kept < 16.0, "row {r}: nothing to repaint");
            for (k, w) in user.iter().zip(&w) {
                let want = if kept > 0.0 { k * 16.0 / kept } else { 0.0 };
                assert!((w - want).abs() < 1e-5, "row {r}: {w} for keep {k}");
            }
            let holes: Vec<(usize, usize)> = (0..16)
                .filter(|&p| user[p] == 0.0)
                .map(|p| (p / 4, p % 4))
                .collect();
            let (y0, y1) = (
                holes.iter().map(|h| h.0).min(),
                holes.iter().map(|h| h.0).max(),
            );
            let (x0_, x1) = (
                holes.iter().map(|h| h.1).min(),
                holes.iter().map(|h| h.1).max(),
            );
            let area = (y1.unwrap() - y0.unwrap() + 1) * (x1.unwrap() - x0_.unwrap() + 1);
            assert_eq!(
                holes.len(),
                area,
                "row {r}: the repainted area is not a rectangle"
            );
            let user_keep_row = flat(&user_keep.as_ref().unwrap().get(r).unwrap());
            assert_eq!(user_keep_row, user, "row {r}: the batch's keep-mask");
            let user = Tensor::from_vec(user, (1, 1, 4, 4), &Device::Cpu).unwrap();
            let model_keep = flat(&extra.get(r).unwrap().narrow(0, 4, 1).unwrap());
            assert_eq!(model_keep, flat(&prepare_mask(&user).unwrap()), "row {r}");
            // The band: kept by the user, hidden from the model.
            let band_row = flat(&band.as_ref().unwrap().get(r).unwrap());
            let user_row = flat(&user);
            for p in 0..16 {
                let want = f32::from(user_row[p] == 1.0 && model_keep[p] == 0.0);
                assert_eq!(band_row[p], want, "row {r}, band cell {p}");
            }
            let masked = flat(&extra.get(r).unwrap().narrow(0, 0, 4).unwrap());
            let latents = flat(&x0.get(r).unwrap());
            for (i, (m, l)) in masked.iter().zip(&latents).enumerate() {
                assert_eq!(*m, l * model_keep[i % 16], "row {r}, value {i}");
            }
        }
        assert!(
            other > 0 && dropped < b / 2,
            "{other} mismatched, {dropped} dropped"
        );
        // Drift: zero for rows conditioned on their own entry, otherwise a share λ ≤ max of the
        // way to the conditioning's latents.
        let batch = pool
            .batch_mismatched(b, true, 0.5, &mut Rng::new(7))
            .unwrap();
        let drift = pool.drift(&batch, 0.8, &mut Rng::new(1)).unwrap();
        let (mut leaning, mut own) = (0, 0);
        for r in 0..b {
            let d = flat(&drift.get(r).unwrap());
            let (i, j) = (batch.indices[r], batch.cond_indices[r]);
            if i == j {
                assert!(d.iter().all(|&v| v == 0.0), "row {r}");
                own += 1;
                continue;
            }
            // Numbered latents: entry j minus entry i is 64·(j − i) everywhere.
            let gap = 64.0 * (j as f32 - i as f32);
            let lambda = d[0] / gap;
            assert!((0.0..=0.8).contains(&lambda), "row {r}: λ = {lambda}");
            assert!(
                d.iter().all(|&v| (v - lambda * gap).abs() < 1e-3),
                "row {r}"
            );
            leaning += 1;
        }
        assert!(leaning > 0 && own > 0, "{leaning} leaning, {own} own");
        // Text-to-image batches never mismatch.
        let b = pool
            .batch_mismatched(8, false, 1.0, &mut Rng::new(5))
            .unwrap();
        assert!(b.extra.is_none() && b.positions.is_none());
    }
}
