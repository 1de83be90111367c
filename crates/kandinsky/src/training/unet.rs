//! Stage (e) / (f): the decoder UNet (and its 9-channel inpainting variant) — ε prediction under
//! Kandinsky 2.1's linear schedule (β from 0.00085 to 0.012 over 1000 steps, what its DDIM and
//! DDPM schedulers use), conditioned like `KandinskyPipeline` (`text_image`: CLIP image
//! embedding, M-CLIP pooled and token embeddings). The learned-variance channels, which the
//! default DDIM sampler ignores but diffusers' pipelines require to exist, are trained towards
//! `v = -1` (the posterior variance, DDPM's `fixed_small`), so a `learned_range` DDPM samples like
//! `fixed_small`.

use super::shapes::Rng;
use crate::error::Result;
use crate::models::{UNet2DConditionModel, UNetConditioning};
use crate::schedulers::{alphas_cumprod, linspace_f32};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{Device, Tensor};

/// The small 2.1-style UNet for 16×16×4 latents: 3 levels (64, 128, 128 channels), attention at
/// the lower two, `text_image` conditioning from 64-wide CLIP / M-CLIP embeddings.
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
  "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]
}"#;

/// Conditioning of one batch, already with dropout applied: `(image_embeds, text_embeds,
/// encoder_hidden_states)`.
pub type UNetCond = (Tensor, Tensor, Tensor);

/// The ε loss (plus the variance-channel target) of one batch of clean latents `x0 (B, 4, h, w)`;
/// for inpainting, `extra = (masked image latents, mask)` is concatenated to the noisy input.
/// Returns `(total loss, ε loss)`.
pub fn unet_loss(
    unet: &UNet2DConditionModel,
    x0: &Tensor,
    cond: &UNetCond,
    extra: Option<&Tensor>,
    rng: &mut Rng,
    generator: &mut TorchGenerator,
) -> Result<(Tensor, Tensor)> {
    let (b, c, _, _) = x0.dims4()?;
    let ac = alphas_cumprod(&linspace_f32(0.00085, 0.012, 1000));
    let ts: Vec<usize> = (0..b).map(|_| rng.below(1000)).collect();
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
    let (img, txt, hidden) = cond;
    let cond = UNetConditioning {
        image_embeds: Some(img),
        text_embeds: Some(txt),
        encoder_hidden_states: Some(hidden),
        hint: None,
    };
    let tf: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
    let out = unet.forward_timesteps(&input, &tf, &cond)?;
    let eps = out.narrow(1, 0, c)?;
    let eps_loss = (eps - noise)?.sqr()?.mean_all()?;
    let total = if out.dim(1)? > c {
        let v = out.narrow(1, c, out.dim(1)? - c)?;
        let var_loss = (v + 1.0)?.sqr()?.mean_all()?;
        (&eps_loss + (var_loss * 0.1)?)?
    } else {
        eps_loss.clone()
    };
    Ok((total, eps_loss))
}

/// The frozen models the decoder learns from: the MoVQ (latents), CLIP's vision tower (image
/// embeddings) and M-CLIP with its tokenizer (text conditioning).
pub struct DecoderTeachers {
    /// The trained MoVQ.
    pub movq: crate::models::VQModel,
    /// CLIP's vision tower.
    pub vision: crate::models::clip::ClipVisionModelWithProjection,
    /// M-CLIP.
    pub mclip: crate::pipelines::kandinsky::text_encoder::MultilingualClip,
    /// M-CLIP's tokenizer.
    pub tokenizer: crate::tokenization::PromptTokenizer,
}

/// Fraction of examples whose conditioning is replaced by the pipelines' unconditional one (the
/// zero-image CLIP embedding and M-CLIP of `""`), so classifier-free guidance works.
pub const COND_DROPOUT: f32 = 0.1;

impl DecoderTeachers {
    /// Latents `(B, 4, h, w)`, conditioning (with dropout from `rng`) and, for inpainting, the
    /// extra inputs `(masked latents, keep-mask)` of random rectangles, for examples
    /// `first..first + batch`.
    pub fn batch(
        &self,
        seed: u64,
        first: u64,
        batch: usize,
        side: usize,
        inpaint: bool,
        rng: &mut Rng,
    ) -> Result<(Tensor, UNetCond, Option<Tensor>)> {
        // Render once; the MoVQ and CLIP views are two normalisations of the same pixels.
        let examples = super::shapes::training_examples(seed, first, batch, side);
        let images = super::movq::image_tensor(&examples, side)?;
        let pixels = super::clip::clip_pixels(&examples, side)?;
        let captions: Vec<String> = examples.into_iter().map(|e| e.caption).collect();
        let x0 = self.movq.encode(&images)?.detach();
        let drop: Vec<bool> = (0..batch).map(|_| rng.unit() < COND_DROPOUT).collect();
        let captions: Vec<String> = captions
            .into_iter()
            .zip(&drop)
            .map(|(c, d)| if *d { String::new() } else { c })
            .collect();
        // The pipelines' unconditional image embedding (cached by the vision tower).
        let zero_embed = self.vision.zero_image_embeds()?;
        let img = self.vision.forward(&pixels)?.image_embeds;
        let rows: Vec<Tensor> = (0..batch)
            .map(|i| {
                if drop[i] {
                    Ok(zero_embed.clone())
                } else {
                    img.narrow(0, i, 1)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        let img = Tensor::cat(&rows, 0)?.detach();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let tok = self.tokenizer.encode(&refs, &Device::Cpu)?;
        let (txt, hidden) = self.mclip.forward(&tok.input_ids, &tok.attention_mask)?;
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
            let mask = Tensor::from_vec(keep, (batch, 1, h, w), &Device::Cpu)?;
            let masked = x0.broadcast_mul(&mask)?;
            Some(Tensor::cat(&[masked, mask], 1)?)
        } else {
            None
        };
        Ok((x0, (img, txt.detach(), hidden.detach()), extra))
    }
}

/// Trains (or resumes) the decoder UNet (`in_channels` 4) or the inpainting UNet (9) and exports
/// `out_dir/unet/`.
pub fn train_unet(
    opts: &super::trainer::TrainOptions,
    teachers: &DecoderTeachers,
    inpaint: bool,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<super::trainer::TrainReport> {
    let mut value = super::trainer::parse_config(SMALL_UNET_CONFIG, "unet")?;
    if inpaint {
        value["in_channels"] = 9.into();
    }
    let config: crate::models::UNet2DConditionConfig = serde_json::from_value(value.clone())
        .map_err(|source| crate::error::Error::Json {
            path: std::path::PathBuf::from("(unet config)"),
            source,
        })?;
    super::trainer::run_loop(
        opts,
        |params| UNet2DConditionModel::new(&crate::loading::Weights::trainable(params), &config),
        |unet, step| {
            let mut rng = Rng::new(opts.seed ^ 0x0e7 ^ step.wrapping_mul(0x1000_0001));
            let mut generator = TorchGenerator::new(opts.seed ^ step.wrapping_mul(104_729));
            let (x0, cond, extra) = teachers.batch(
                opts.seed,
                step * opts.batch as u64,
                opts.batch,
                opts.image_size,
                inpaint,
                &mut rng,
            )?;
            unet_loss(unet, &x0, &cond, extra.as_ref(), &mut rng, &mut generator)
        },
        |params| {
            super::checkpoint::export_component(
                &opts.out_dir.join("unet"),
                &value,
                &params.tensors(),
                "diffusion_pytorch_model.safetensors",
            )
        },
        log,
    )
}
