//! diffusers `models/autoencoders/vae.py`: `Encoder`, `Decoder` (SpatialNorm variant, as MoVQ
//! uses it) and `VectorQuantizer`.

use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::models::attention_processor::SpatialNorm;
use crate::models::nn::{silu, Conv2d, GroupNorm};
use crate::models::resnet::{ResnetConfig, TimeEmbeddingNorm};
use crate::models::unets::unet_2d_blocks::{DecoderUpBlock, EncoderDownBlock, VaeMidBlock};
use candle_core::{DType, Tensor, D};

fn vae_resnet_config(groups: usize) -> ResnetConfig {
    ResnetConfig {
        temb_channels: None,
        groups,
        eps: 1e-6,
        time_embedding_norm: TimeEmbeddingNorm::Default,
        output_scale_factor: 1.0,
        skip_time_act: false,
    }
}

/// The MoVQ encoder: image `(B, 3, H, W)` → latent `(B, latent, H/2^(n-1), W/2^(n-1))`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderDownBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Loads the encoder (`double_z=False`, as VQModel builds it).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        down_block_types: &[String],
        block_out_channels: &[usize],
        layers_per_block: usize,
        groups: usize,
        mid_block_add_attention: bool,
    ) -> Result<Self> {
        let res = vae_resnet_config(groups);
        let n = block_out_channels.len();
        let mut down_blocks = Vec::new();
        let mut out = block_out_channels[0];
        for (i, kind) in down_block_types.iter().enumerate() {
            let input = out;
            out = block_out_channels[i];
            let with_attn = match kind.as_str() {
                "DownEncoderBlock2D" => false,
                "AttnDownEncoderBlock2D" => true,
                other => return Err(Error::unsupported(format!("down_block_types[{i}]"), other)),
            };
            down_blocks.push(EncoderDownBlock::new(
                &w.pp("down_blocks").pp(i),
                layers_per_block,
                input,
                out,
                res,
                with_attn,
                i + 1 < n,
            )?);
        }
        let last = block_out_channels[n - 1];
        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), in_ch, block_out_channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(
                &w.pp("mid_block"),
                last,
                res,
                None,
                mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(&w.pp("conv_norm_out"), groups, last, 1e-6)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), last, out_ch, 3, 1, 1)?,
        })
    }

    /// Encodes an image in [-1, 1].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        h = self.mid_block.forward(&h, None)?;
        self.conv_out
            .forward(&silu(&self.conv_norm_out.forward(&h)?)?)
    }
}

/// The final normalisation of the decoder.
#[derive(Debug, Clone)]
enum NormOut {
    Group(GroupNorm),
    Spatial(SpatialNorm),
}

/// The MoVQ decoder: latent `(B, latent, h, w)` (and the SpatialNorm condition `zq`) → image.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: VaeMidBlock,
    up_blocks: Vec<DecoderUpBlock>,
    conv_norm_out: NormOut,
    conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder; `spatial` selects `norm_type="spatial"` (SpatialNorm conditioned on
    /// the `in_ch`-channel latent).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        up_block_types: &[String],
        block_out_channels: &[usize],
        layers_per_block: usize,
        groups: usize,
        spatial: bool,
        mid_block_add_attention: bool,
    ) -> Result<Self> {
        let res = vae_resnet_config(groups);
        let zq = spatial.then_some(in_ch);
        let n = block_out_channels.len();
        let rev: Vec<usize> = block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out = rev[0];
        for (i, kind) in up_block_types.iter().enumerate() {
            let prev = out;
            out = rev[i];
            let with_attn = match kind.as_str() {
                "UpDecoderBlock2D" => false,
                "AttnUpDecoderBlock2D" => true,
                other => return Err(Error::unsupported(format!("up_block_types[{i}]"), other)),
            };
            up_blocks.push(DecoderUpBlock::new(
                &w.pp("up_blocks").pp(i),
                layers_per_block + 1,
                prev,
                out,
                res,
                zq,
                with_attn,
                i + 1 < n,
            )?);
        }
        let c0 = block_out_channels[0];
        let conv_norm_out = if spatial {
            NormOut::Spatial(SpatialNorm::new(&w.pp("conv_norm_out"), c0, in_ch)?)
        } else {
            NormOut::Group(GroupNorm::new(&w.pp("conv_norm_out"), groups, c0, 1e-6)?)
        };
        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), in_ch, rev[0], 3, 1, 1)?,
            mid_block: VaeMidBlock::new(
                &w.pp("mid_block"),
                rev[0],
                res,
                zq,
                mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out,
            conv_out: Conv2d::new(&w.pp("conv_out"), c0, out_ch, 3, 1, 1)?,
        })
    }

    /// Decodes `z`; `zq` is the SpatialNorm condition (required for the spatial variant).
    pub fn forward(&self, z: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h, zq)?;
        for b in &self.up_blocks {
            h = b.forward(&h, zq)?;
        }
        h = match (&self.conv_norm_out, zq) {
            (NormOut::Group(n), _) => n.forward(&h)?,
            (NormOut::Spatial(n), Some(zq)) => n.forward(&h, zq)?,
            (NormOut::Spatial(_), None) => {
                return Err(Error::InvalidArgument(
                    "the spatial decoder needs the latent".into(),
                ))
            }
        };
        self.conv_out.forward(&silu(&h)?)
    }
}

/// `VectorQuantizer`: nearest codebook entry by L2 distance.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    embedding: Tensor,
}

impl VectorQuantizer {
    /// Loads `embedding.weight (n, dim)`.
    pub fn new(w: &Weights, n: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            embedding: w.pp("embedding").get((n, dim), "weight")?,
        })
    }

    /// Codebook indices `(B·h·w)` of the entries nearest to `z (B, dim, h, w)` (row-major over
    /// b, y, x, as diffusers flattens them).
    pub fn indices(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let zf = z
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?
            .to_dtype(DType::F32)?;
        let e = self.embedding.to_dtype(DType::F32)?;
        // ‖z−e‖² = ‖z‖² − 2 z·e + ‖e‖²; ‖z‖² is constant per row, so argmin needs only the rest.
        let ze = zf.matmul(&e.t()?)?;
        let e2 = e.sqr()?.sum(1)?;
        let d = (ze * -2.0)?.broadcast_add(&e2)?;
        Ok(d.argmin(D::Minus1)?)
    }

    /// The nearest codebook vectors themselves `(B, C, h, w)` (differentiable with respect to the
    /// codebook), for training.
    pub fn lookup(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let idx = self.indices(&z.detach())?;
        Ok(self
            .embedding
            .index_select(&idx, 0)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .to_dtype(z.dtype())?)
    }

    /// Replaces every latent vector by its nearest codebook entry (forward value of diffusers'
    /// `z + (z_q - z).detach()`).
    pub fn quantize(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let idx = self.indices(z)?;
        let zq = self
            .embedding
            .index_select(&idx, 0)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?
            .to_dtype(z.dtype())?;
        Ok((z + (zq - z)?)?)
    }
}
