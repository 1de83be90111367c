//! diffusers `models/autoencoders/vq_model.py`: `VQModel`, the MoVQ autoencoder of Kandinsky.

use super::vae::{Decoder, Encoder, VectorQuantizer};
use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::models::nn::{check_act_fn, Conv2d};
use candle_core::Tensor;
use serde::Deserialize;

/// `movq/config.json`. Field names and defaults are diffusers'; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VQModelConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Encoder block class names.
    pub down_block_types: Vec<String>,
    /// Decoder block class names.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// `act_fn`.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Codebook size.
    pub num_vq_embeddings: usize,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// Codebook vector width; default `latent_channels`.
    pub vq_embed_dim: Option<usize>,
    /// `group` or `spatial` (MoVQ).
    pub norm_type: String,
    /// Attention in the mid blocks.
    pub mid_block_add_attention: bool,
    /// Must be false.
    pub lookup_from_codebook: bool,
}

impl Default for VQModelConfig {
    /// diffusers' `VQModel` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 3,
            num_vq_embeddings: 256,
            norm_num_groups: 32,
            vq_embed_dim: None,
            norm_type: "group".into(),
            mid_block_add_attention: true,
            lookup_from_codebook: false,
        }
    }
}

impl VQModelConfig {
    /// Pixels per latent pixel, `2^(levels - 1)` (diffusers' `movq_scale_factor`).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Reads `config.json` from a component directory.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        crate::loading::read_json(&dir.join("config.json"))
    }
}

/// `VQModel`.
#[derive(Debug, Clone)]
pub struct VQModel {
    encoder: Encoder,
    quant_conv: Conv2d,
    quantize: VectorQuantizer,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    spatial: bool,
    scale_factor: usize,
    latent_channels: usize,
    /// Activation dtype (the weights' compute dtype).
    dtype: candle_core::DType,
}

impl VQModel {
    /// Builds the model, loading every tensor by its diffusers name.
    pub fn new(w: &Weights, c: &VQModelConfig) -> Result<Self> {
        check_act_fn("act_fn", &c.act_fn)?;
        let spatial = match c.norm_type.as_str() {
            "spatial" => true,
            "group" => false,
            other => return Err(Error::unsupported("norm_type", other)),
        };
        if c.lookup_from_codebook {
            return Err(Error::unsupported("lookup_from_codebook", true));
        }
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error::unsupported(
                "down_block_types/up_block_types",
                format!(
                    "{} down and {} up blocks for {} block_out_channels",
                    c.down_block_types.len(),
                    c.up_block_types.len(),
                    n
                ),
            ));
        }
        let vq_dim = c.vq_embed_dim.unwrap_or(c.latent_channels);
        Ok(Self {
            dtype: w.dtype(),
            encoder: Encoder::new(
                &w.pp("encoder"),
                c.in_channels,
                c.latent_channels,
                &c.down_block_types,
                &c.block_out_channels,
                c.layers_per_block,
                c.norm_num_groups,
                c.mid_block_add_attention,
            )?,
            quant_conv: Conv2d::new(&w.pp("quant_conv"), c.latent_channels, vq_dim, 1, 1, 0)?,
            quantize: VectorQuantizer::new(&w.pp("quantize"), c.num_vq_embeddings, vq_dim)?,
            post_quant_conv: Conv2d::new(
                &w.pp("post_quant_conv"),
                vq_dim,
                c.latent_channels,
                1,
                1,
                0,
            )?,
            decoder: Decoder::new(
                &w.pp("decoder"),
                c.latent_channels,
                c.out_channels,
                &c.up_block_types,
                &c.block_out_channels,
                c.layers_per_block,
                c.norm_num_groups,
                spatial,
                c.mid_block_add_attention,
            )?,
            spatial,
            scale_factor: c.scale_factor(),
            latent_channels: c.latent_channels,
        })
    }

    /// Pixels per latent pixel, `2^(levels - 1)` (diffusers' `movq_scale_factor`).
    pub fn scale_factor(&self) -> usize {
        self.scale_factor
    }

    /// Channels of the latent (`config.latent_channels`), the denoised sample's channels.
    pub fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    /// Loads a `movq/` component directory (`config.json` and weights) in `dtype` on `device`.
    pub fn load(
        dir: &std::path::Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let config = VQModelConfig::load(dir)?;
        crate::loading::check_config_size(dir, |w| Self::new(w, &config))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &config)
    }

    /// `encode`: image in [-1, 1] `(B, 3, H, W)` → `quant_conv(encoder(x))` (not quantised).
    ///
    /// Inputs of any float dtype are cast to the model's compute dtype; the output is f32.
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(self.dtype)?;
        Ok(self
            .quant_conv
            .forward(&self.encoder.forward(&x)?)?
            .to_dtype(candle_core::DType::F32)?)
    }

    /// `decode(h, force_not_quantize)`: quantises unless `force_not_quantize` (Kandinsky's
    /// pipelines always force), then `post_quant_conv` and the decoder conditioned on the
    /// (quantised) latent.
    ///
    /// Inputs of any float dtype are cast to the model's compute dtype; the output is f32.
    pub fn decode(&self, h: &Tensor, force_not_quantize: bool) -> Result<Tensor> {
        let h = &h.to_dtype(self.dtype)?;
        let quant = if force_not_quantize {
            h.clone()
        } else {
            self.quantize.quantize(h)?
        };
        let x = self.post_quant_conv.forward(&quant)?;
        Ok(self
            .decoder
            .forward(&x, if self.spatial { Some(&quant) } else { None })?
            .to_dtype(candle_core::DType::F32)?)
    }

    /// The codebook quantiser.
    pub fn quantizer(&self) -> &VectorQuantizer {
        &self.quantize
    }
}
