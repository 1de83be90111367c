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
