//! diffusers `models/embeddings.py`: timestep sinusoids and the Kandinsky conditioning
//! projections (`TextImageProjection`, `ImageProjection`, `TextImageTimeEmbedding`,
//! `ImageTimeEmbedding`, `ImageHintTimeEmbedding`).

use super::nn::{silu, Conv2d, LayerNorm, Linear};
use crate::error::Result;
use crate::loading::Weights;
use candle_core::Tensor;

/// `get_timestep_embedding` with `max_period` 10000 and scale 1, computed in f32 exactly as torch
/// does (f32 exponent, f32 product, `[sin, cos]` swapped to `[cos, sin]` when `flip_sin_to_cos`).
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_max = -(10000f64.ln() as f32);
    let denom = (half as f64 - downscale_freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((log_max * k as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let t = t as f32;
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                args.iter().map(|a| a.cos()).collect(),
                args.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                args.iter().map(|a| a.sin()).collect(),
                args.iter().map(|a| a.cos()).collect(),
            )
        };
        data.extend(first);
        data.extend(second);
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// `TimestepEmbedding`: `linear_2(act(linear_1(t)))`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// Loads `linear_1 (in → hidden)` and `linear_2 (hidden → out)`.
    pub fn new(w: &Weights, in_dim: usize, hidden: usize, out: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(&w.pp("linear_1"), in_dim, hidden, true)?,
            linear_2: Linear::new(&w.pp("linear_2"), hidden, out, true)?,
        })
    }

    /// Embeds `t (B, in)`.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(t)?)?)
    }
}

/// `TextImageProjection` (Kandinsky 2.1 `encoder_hid_proj`): 10 image tokens followed by the
/// projected text tokens.
#[derive(Debug, Clone)]
pub struct TextImageProjection {
    image_embeds: Linear,
    text_proj: Linear,
    num_image_text_embeds: usize,
}

impl TextImageProjection {
    /// Loads the projection with 10 image tokens.
    pub fn new(
        w: &Weights,
        text_embed_dim: usize,
        image_embed_dim: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let n = 10;
        Ok(Self {
            image_embeds: Linear::new(
                &w.pp("image_embeds"),
                image_embed_dim,
                n * cross_attention_dim,
                true,
            )?,
            text_proj: Linear::new(
                &w.pp("text_proj"),
                text_embed_dim,
                cross_attention_dim,
                true,
            )?,
            num_image_text_embeds: n,
        })
    }

    /// `text (B, L, text_dim)`, `image (B, image_dim)` → `(B, 10 + L, cross_dim)`.
    pub fn forward(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let b = text_embeds.dim(0)?;
        let img = self.image_embeds.forward(image_embeds)?.reshape((
            b,
            self.num_image_text_embeds,
            (),
        ))?;
        let txt = self.text_proj.forward(text_embeds)?;
        Ok(Tensor::cat(&[img, txt], 1)?)
    }
}

/// `ImageProjection` (Kandinsky 2.2 `encoder_hid_proj`): 32 layer-normed image tokens.
#[derive(Debug, Clone)]
pub struct ImageProjection {
    image_embeds: Linear,
    norm: LayerNorm,
    num_image_text_embeds: usize,
}

impl ImageProjection {
    /// Loads the projection with 32 image tokens.
    pub fn new(w: &Weights, image_embed_dim: usize, cross_attention_dim: usize) -> Result<Self> {
        let n = 32;
        Ok(Self {
            image_embeds: Linear::new(
                &w.pp("image_embeds"),
                image_embed_dim,
                n * cross_attention_dim,
                true,
            )?,
            norm: LayerNorm::new(&w.pp("norm"), cross_attention_dim, 1e-5)?,
            num_image_text_embeds: n,
        })
    }

    /// `image (B, image_dim)` → `(B, 32, cross_dim)`.
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let x = self.image_embeds.forward(image_embeds)?.reshape((
            b,
            self.num_image_text_embeds,
            (),
        ))?;
        self.norm.forward(&x)
    }
}

/// `TextImageTimeEmbedding` (2.1 `add_embedding`): `LN(text_proj(text)) + image_proj(image)`.
#[derive(Debug, Clone)]
pub struct TextImageTimeEmbedding {
    text_proj: Linear,
    text_norm: LayerNorm,
    image_proj: Linear,
}

impl TextImageTimeEmbedding {
    /// Loads the embedding.
    pub fn new(w: &Weights, text_dim: usize, image_dim: usize, time_dim: usize) -> Result<Self> {
        Ok(Self {
            text_proj: Linear::new(&w.pp("text_proj"), text_dim, time_dim, true)?,
            text_norm: LayerNorm::new(&w.pp("text_norm"), time_dim, 1e-5)?,
            image_proj: Linear::new(&w.pp("image_proj"), image_dim, time_dim, true)?,
        })
    }

    /// `text (B, text_dim)`, `image (B, image_dim)` → `(B, time_dim)`.
    pub fn forward(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let t = self
            .text_norm
            .forward(&self.text_proj.forward(text_embeds)?)?;
        let i = self.image_proj.forward(image_embeds)?;
        Ok((i + t)?)
    }
}

/// `ImageTimeEmbedding` (2.2 `add_embedding`): `LN(image_proj(image))`; with a hint block it is
/// `ImageHintTimeEmbedding` (2.2 ControlNet), which also maps the pixel-space hint to 4 latent
/// channels.
#[derive(Debug, Clone)]
pub struct ImageTimeEmbedding {
    image_proj: Linear,
    image_norm: LayerNorm,
    input_hint_block: Option<Vec<(Conv2d, bool)>>,
}

impl ImageTimeEmbedding {
    /// Loads the embedding; `with_hint` adds `input_hint_block` (ImageHintTimeEmbedding).
    pub fn new(w: &Weights, image_dim: usize, time_dim: usize, with_hint: bool) -> Result<Self> {
        let input_hint_block = if with_hint {
            let hw = w.pp("input_hint_block");
            // (in, out, stride) of the convs at Sequential indices 0, 2, ..., 14; SiLU between.
            let spec = [
                (3, 16, 1),
                (16, 16, 1),
                (16, 32, 2),
                (32, 32, 1),
                (32, 96, 2),
                (96, 96, 1),
                (96, 256, 2),
                (256, 4, 1),
            ];
            let mut convs = Vec::new();
            for (i, (cin, cout, stride)) in spec.into_iter().enumerate() {
                let conv = Conv2d::new(&hw.pp(2 * i), cin, cout, 3, stride, 1)?;
                convs.push((conv, i + 1 < spec.len()));
            }
            Some(convs)
        } else {
            None
        };
        Ok(Self {
            image_proj: Linear::new(&w.pp("image_proj"), image_dim, time_dim, true)?,
            image_norm: LayerNorm::new(&w.pp("image_norm"), time_dim, 1e-5)?,
            input_hint_block,
        })
    }

    /// `image (B, image_dim)` → `(B, time_dim)`.
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        self.image_norm
            .forward(&self.image_proj.forward(image_embeds)?)
    }

    /// The hint block: `hint (B, 3, H, W)` → `(B, 4, H/8, W/8)`; `None` without a hint block.
    pub fn hint(&self, hint: &Tensor) -> Result<Option<Tensor>> {
        let Some(convs) = &self.input_hint_block else {
            return Ok(None);
        };
        let mut h = hint.clone();
        for (conv, act) in convs {
            h = conv.forward(&h)?;
            if *act {
                h = silu(&h)?;
            }
        }
        Ok(Some(h))
    }
}
