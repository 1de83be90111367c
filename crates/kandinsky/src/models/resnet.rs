//! diffusers `models/resnet.py`, `upsampling.py`, `downsampling.py`: `ResnetBlock2D` (default and
//! scale-shift time conditioning, in-block nearest up / average-pool down sampling),
//! `ResnetBlockCondNorm2D` (SpatialNorm), and the conv resamplers of the MoVQ autoencoder.

use super::attention_processor::SpatialNorm;
use super::nn::{silu, upsample_nearest_int, Conv2d, GroupNorm, Linear};
use crate::error::{Error, Result};
use crate::loading::Weights;
use candle_core::Tensor;

/// How a resnet applies the time embedding (`resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// `h = norm2(h + proj(temb))`.
    Default,
    /// `h = norm2(h) * (1 + scale) + shift`.
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parses diffusers' `resnet_time_scale_shift` value.
    pub fn parse(key: &str, value: &str) -> Result<Self> {
        match value {
            "default" => Ok(Self::Default),
            "scale_shift" => Ok(Self::ScaleShift),
            other => Err(Error::unsupported(key, other)),
        }
    }
}

/// In-block resampling of a resnet (`up=True` / `down=True`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// No resampling.
    None,
    /// Nearest-neighbour ×2 (`Upsample2D(use_conv=False)`).
    Up,
    /// 2×2 average pooling (`Downsample2D(use_conv=False)`).
    Down,
}

/// Settings shared by the resnets of a block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Channels of the time embedding, `None` for the autoencoder.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups.
    pub groups: usize,
    /// GroupNorm epsilon.
    pub eps: f64,
    /// Time-embedding application.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// `skip_time_act`: no SiLU before `time_emb_proj`.
    pub skip_time_act: bool,
}

/// `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    resample: Resample,
    cfg: ResnetConfig,
}

impl ResnetBlock2D {
    /// Loads a resnet mapping `in_ch` to `out_ch` channels.
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        cfg: ResnetConfig,
        resample: Resample,
    ) -> Result<Self> {
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let mult = match cfg.time_embedding_norm {
                    TimeEmbeddingNorm::Default => 1,
                    TimeEmbeddingNorm::ScaleShift => 2,
                };
                Some(Linear::new(&w.pp("time_emb_proj"), t, mult * out_ch, true)?)
            }
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), cfg.groups, in_ch, cfg.eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(&w.pp("norm2"), cfg.groups, out_ch, cfg.eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::new(&w.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)?)
            } else {
                None
            },
            resample,
            cfg,
        })
    }

    /// Applies the block; `temb (B, T)` is required when the block has a time projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.norm1.forward_act(x, None, true)?;
        let mut x = x.clone();
        match self.resample {
            Resample::None => {}
            Resample::Up => {
                x = upsample_nearest_int(&x, 2)?;
                h = upsample_nearest_int(&h, 2)?;
            }
            Resample::Down => {
                x = x.avg_pool2d(2)?;
                h = h.avg_pool2d(2)?;
            }
        }
        h = self.conv1.forward(&h)?;
        let temb = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = if self.cfg.skip_time_act {
                    t.clone()
                } else {
                    silu(t)?
                };
                Some(proj.forward(&t)?)
            }
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "a time embedding is required by this resnet block".into(),
                ))
            }
            (None, _) => None,
        };
        h = match (self.cfg.time_embedding_norm, temb) {
            (TimeEmbeddingNorm::ScaleShift, Some(t)) => {
                self.norm2.forward_act(&h, Some(&t), true)?
            }
            (TimeEmbeddingNorm::Default, Some(t)) => self.norm2.forward_act(
                &h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?,
                None,
                true,
            )?,
            (_, None) => self.norm2.forward_act(&h, None, true)?,
        };
        h = self.conv2.forward(&h)?;
        if let Some(sc) = &self.conv_shortcut {
            x = sc.forward(&x)?;
        }
        let out = (x + h)?;
        if self.cfg.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.cfg.output_scale_factor)?)
        }
    }
}

/// `ResnetBlockCondNorm2D` with `time_embedding_norm="spatial"`: both norms are SpatialNorms
/// conditioned on the quantised latent `zq`.
#[derive(Debug, Clone)]
pub struct ResnetBlockCondNorm2D {
    norm1: SpatialNorm,
    conv1: Conv2d,
    norm2: SpatialNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlockCondNorm2D {
    /// Loads a block mapping `in_ch` to `out_ch`, conditioned on a `zq_ch`-channel latent.
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        zq_ch: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: SpatialNorm::new(&w.pp("norm1"), in_ch, zq_ch)?,
            conv1: Conv2d::new(&w.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            norm2: SpatialNorm::new(&w.pp("norm2"), out_ch, zq_ch)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::new(&w.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&silu(&self.norm1.forward(x, zq)?)?)?;
        let h = self.conv2.forward(&silu(&self.norm2.forward(&h, zq)?)?)?;
        let x = match &self.conv_shortcut {
            Some(sc) => sc.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

/// `Upsample2D(use_conv=True)`: nearest ×2, then a 3×3 conv (key `conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Loads the conv of a `channels → channels` upsampler.
    pub fn new(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// Applies the upsampler.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest_int(x, 2)?)
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: pad right/bottom by one, then a stride-2 3×3 conv.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    /// Loads the conv of a `channels → channels` downsampler.
    pub fn new(w: &Weights, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&w.pp("conv"), channels, channels, 3, 2, 0)?,
        })
    }

    /// Applies the downsampler.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&x)
    }
}
