//! diffusers `models/attention_processor.py`: the `Attention` module as the Kandinsky networks
//! configure it — `AttnAddedKVProcessor` (UNet: one softmax over the projected conditioning
//! tokens followed by the spatial tokens) and `AttnProcessor` (MoVQ: single-head spatial
//! self-attention with GroupNorm or SpatialNorm) — and `SpatialNorm`.

use super::nn::{attention_merged, interpolate_nearest, Conv2d, GroupNorm, Linear};
use crate::error::{Error, Result};
use crate::loading::Weights;
use candle_core::Tensor;

/// `SpatialNorm`: `GroupNorm(32, eps 1e-6)(f) * conv_y(zq') + conv_b(zq')` with `zq'` the latent
/// resized (nearest) to `f`'s size.
#[derive(Debug, Clone)]
pub struct SpatialNorm {
    norm_layer: GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

impl SpatialNorm {
    /// Loads a SpatialNorm over `f_ch` channels conditioned on a `zq_ch`-channel latent.
    pub fn new(w: &Weights, f_ch: usize, zq_ch: usize) -> Result<Self> {
        Ok(Self {
            norm_layer: GroupNorm::new(&w.pp("norm_layer"), 32, f_ch, 1e-6)?,
            conv_y: Conv2d::new(&w.pp("conv_y"), zq_ch, f_ch, 1, 1, 0)?,
            conv_b: Conv2d::new(&w.pp("conv_b"), zq_ch, f_ch, 1, 1, 0)?,
        })
    }

    /// Normalises `f` conditioned on `zq`.
    pub fn forward(&self, f: &Tensor, zq: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = f.dims4()?;
        let zq = interpolate_nearest(zq, h, w)?;
        let n = self.norm_layer.forward(f)?;
        Ok(n.mul(&self.conv_y.forward(&zq)?)?
            .add(&self.conv_b.forward(&zq)?)?)
    }
}

/// Splits `(B, N, heads·d)` into `(B, heads, N, d)`.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    Ok(x.reshape((b, n, heads, c / heads))?.transpose(1, 2)?)
}

/// `(B, C, H, W)` → `(B, H·W, C)`.
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?)
}

/// `(B, H·W, C)` → `(B, C, H, W)`.
fn from_tokens(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    Ok(x.transpose(1, 2)?.reshape((b, c, h, w))?)
}

/// `Attention` with `added_kv_proj_dim` and `AttnAddedKVProcessor` (the UNet's SimpleCrossAttn
/// attention). Keys and values are `[add_k_proj(ctx); to_k(x)]`: conditioning tokens first.
#[derive(Debug, Clone)]
pub struct AddedKvAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Option<Linear>,
    to_v: Option<Linear>,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl AddedKvAttention {
    /// Loads the attention of a block with `channels` channels, heads of `head_dim`, conditioning
    /// tokens of width `added_kv_dim`, GroupNorm of `groups` groups (eps 1e-5, diffusers'
    /// `Attention` default), and `to_k`/`to_v` unless `only_cross_attention`.
    pub fn new(
        w: &Weights,
        channels: usize,
        head_dim: usize,
        added_kv_dim: usize,
        groups: usize,
        only_cross_attention: bool,
    ) -> Result<Self> {
        if head_dim == 0 || !channels.is_multiple_of(head_dim) {
            return Err(Error::unsupported(
                "attention_head_dim",
                format!("{head_dim} (does not divide {channels} channels)"),
            ));
        }
        let (to_k, to_v) = if only_cross_attention {
            (None, None)
        } else {
            (
                Some(Linear::new(&w.pp("to_k"), channels, channels, true)?),
                Some(Linear::new(&w.pp("to_v"), channels, channels, true)?),
            )
        };
        Ok(Self {
            group_norm: GroupNorm::new(&w.pp("group_norm"), groups, channels, 1e-5)?,
            to_q: Linear::new(&w.pp("to_q"), channels, channels, true)?,
            to_k,
            to_v,
            add_k_proj: Linear::new(&w.pp("add_k_proj"), added_kv_dim, channels, true)?,
            add_v_proj: Linear::new(&w.pp("add_v_proj"), added_kv_dim, channels, true)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), channels, channels, true)?,
            heads: channels / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `x (B, C, H, W)`, `ctx (B, L, added_kv_dim)` → `(B, C, H, W)` (residual included).
    pub fn forward(&self, x: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = to_tokens(&self.group_norm.forward(x)?)?;
        let q = split_heads(&self.to_q.forward(&s)?, self.heads)?;
        let kc = split_heads(&self.add_k_proj.forward(ctx)?, self.heads)?;
        let vc = split_heads(&self.add_v_proj.forward(ctx)?, self.heads)?;
        let (k, v) = match (&self.to_k, &self.to_v) {
            (Some(to_k), Some(to_v)) => {
                let ks = split_heads(&to_k.forward(&s)?, self.heads)?;
                let vs = split_heads(&to_v.forward(&s)?, self.heads)?;
                (Tensor::cat(&[kc, ks], 2)?, Tensor::cat(&[vc, vs], 2)?)
            }
            _ => (kc, vc),
        };
        let o = attention_merged(&q, &k, &v, self.scale)?;
        let o = self.to_out.forward(&o)?;
        Ok((from_tokens(&o, h, w)? + x)?)
    }
}

/// The normalisation in front of a MoVQ attention.
#[derive(Debug, Clone)]
enum VaeAttnNorm {
    Group(GroupNorm),
    Spatial(SpatialNorm),
}

/// `Attention` with `AttnProcessor` as the MoVQ encoder (GroupNorm) and decoder (SpatialNorm)
/// use it: self-attention over spatial tokens, residual added, divided by
/// `rescale_output_factor`.
#[derive(Debug, Clone)]
pub struct VaeAttention {
    norm: VaeAttnNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    rescale_output_factor: f64,
}

impl VaeAttention {
    /// Loads an attention over `channels` with heads of `head_dim`; `spatial_norm_dim` selects a
    /// SpatialNorm conditioned on that many latent channels, otherwise a GroupNorm of `groups`
    /// groups with `eps`.
    pub fn new(
        w: &Weights,
        channels: usize,
        head_dim: usize,
        groups: usize,
        eps: f64,
        spatial_norm_dim: Option<usize>,
        rescale_output_factor: f64,
    ) -> Result<Self> {
        if head_dim == 0 || !channels.is_multiple_of(head_dim) {
            return Err(Error::unsupported(
                "attention_head_dim",
                format!("{head_dim} (does not divide {channels} channels)"),
            ));
        }
        let norm = match spatial_norm_dim {
            Some(zq) => {
                VaeAttnNorm::Spatial(SpatialNorm::new(&w.pp("spatial_norm"), channels, zq)?)
            }
            None => VaeAttnNorm::Group(GroupNorm::new(&w.pp("group_norm"), groups, channels, eps)?),
        };
        Ok(Self {
            norm,
            to_q: Linear::new(&w.pp("to_q"), channels, channels, true)?,
            to_k: Linear::new(&w.pp("to_k"), channels, channels, true)?,
            to_v: Linear::new(&w.pp("to_v"), channels, channels, true)?,
            to_out: Linear::new(&w.pp("to_out").pp(0), channels, channels, true)?,
            heads: channels / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            rescale_output_factor,
        })
    }

    /// `x (B, C, H, W)`; `zq` is required with a SpatialNorm.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let s = match (&self.norm, zq) {
            (VaeAttnNorm::Group(n), _) => n.forward(x)?,
            (VaeAttnNorm::Spatial(n), Some(zq)) => n.forward(x, zq)?,
            (VaeAttnNorm::Spatial(_), None) => {
                return Err(Error::InvalidArgument(
                    "spatially normalised attention needs the latent".into(),
                ))
            }
        };
        let s = to_tokens(&s)?;
        let q = split_heads(&self.to_q.forward(&s)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&s)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&s)?, self.heads)?;
        let o = attention_merged(&q, &k, &v, self.scale)?;
        let o = from_tokens(&self.to_out.forward(&o)?, h, w)?;
        let out = (o + x)?;
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.rescale_output_factor)?)
        }
    }
}
