//! `torch.nn` layers used by every network: Linear, Conv2d, GroupNorm, LayerNorm, and the
//! activations and resampling helpers diffusers takes from `torch.nn.functional`.
//!
//! Each layer owns its weights (loaded once) and its `forward` takes `&self`, so that faster
//! kernels can later pre-pack weights at load time without changing callers.

use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::ops::packed::{self, Kind, Packed};
use candle_core::{DType, Tensor, D};
use std::sync::Arc;

/// `torch.nn.Linear`: `y = x Wᵀ + b` over the last dimension.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
    /// The bias as the packed kernels take it (packed weights only).
    bias_vec: Option<Arc<Vec<f32>>>,
}

/// A GEMM weight as loaded, or packed once for the kernels of `ops::packed`.
#[derive(Debug, Clone)]
enum Matrix {
    Dense(Tensor),
    Packed {
        packed: Arc<Packed>,
        shape: Vec<usize>,
    },
}

impl Matrix {
    /// Packs `t` (rows × rest) into `panel`-row panels: as bf16 under bf16 compute, as f32 when
    /// `f32_too`; trainable and meta weights stay as they are.
    fn load(w: &Weights, t: Tensor, panel: usize, f32_too: bool) -> Result<Self> {
        let kind = if w.packs_bf16() {
            Kind::Bf16
        } else if f32_too && t.dtype() == DType::F32 && t.device().is_cpu() {
            Kind::F32
        } else {
            return Ok(Self::Dense(t));
        };
        // Meta weights (stride-0 placeholders) have no data to pack.
        if t.is_variable() || t.stride().contains(&0) {
            return Ok(Self::Dense(t));
        }
        let shape = t.dims().to_vec();
        let rows = shape[0];
        let k = t.elem_count() / rows.max(1);
        let packed = Packed::pack_as(kind, &crate::ops::to_f32_vec(&t)?, rows, k, k, 1, panel);
        Ok(Self::Packed {
            packed: Arc::new(packed),
            shape,
        })
    }

    /// The weight as an f32 tensor (unpacked from bf16 for the reference path).
    fn dense(&self, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Packed { packed, shape } => {
                Ok(Tensor::from_vec(packed.unpack(), shape.as_slice(), device)?)
            }
        }
    }
}

impl Linear {
    /// Loads `weight [out, in]` and, when `bias`, `bias [out]`.
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = Matrix::load(w, w.get((out_dim, in_dim), "weight")?, packed::LANES, true)?;
        let bias = if bias {
            Some(w.get(out_dim, "bias")?)
        } else {
            None
        };
        let bias_vec = match (&weight, &bias) {
            (Matrix::Packed { .. }, Some(b)) => Some(Arc::new(crate::ops::to_f32_vec(b)?)),
            _ => None,
        };
        Ok(Self {
            weight,
            bias,
            bias_vec,
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Matrix::Packed { packed, .. } = &self.weight {
            if crate::ops::applies(x) {
                return Ok(crate::ops::linear_packed(
                    x,
                    packed,
                    self.bias_vec.as_ref(),
                )?);
            }
        }
        let weight = self.weight.dense(x.device())?;
        // Flatten to one 2-D GEMM: candle's batched matmul gives wrong results for a strided
        // (transposed) input against a broadcast weight, which `candle_nn::Linear` produces for
        // token views of feature maps with batch > 1.
        let mut dims = x.dims().to_vec();
        let k = dims.pop().unwrap_or(1);
        let y = x.contiguous()?.reshape(((), k))?.matmul(&weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        dims.push(y.dim(1)?);
        Ok(y.reshape(dims)?)
    }
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding and a bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Matrix,
    bias: Tensor,
    kernel: usize,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Loads `weight [out, in, k, k]` and `bias [out]`.
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = w.get((out_ch, in_ch, kernel, kernel), "weight")?;
        Ok(Self {
            weight: Matrix::load(w, weight, packed::COLS, false)?,
            bias: w.get(out_ch, "bias")?,
            kernel,
            padding,
            stride,
        })
    }

    /// Applies the convolution to `x (B, C, H, W)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Matrix::Packed { packed, .. } = &self.weight {
            if crate::ops::applies(x) {
                return Ok(crate::ops::conv2d_packed(
                    x,
                    packed,
                    &self.bias,
                    self.kernel,
                    self.stride,
                    self.padding,
                )?);
            }
        }
        let weight = self.weight.dense(x.device())?;
        // Training (gradients tracked, f32 on CPU): im2col + GEMM, whose backward is fast.
        if (x.track_op() || weight.track_op()) && x.dtype() == DType::F32 && x.device().is_cpu() {
            return Ok(crate::ops::im2col::conv2d_gemm(
                x,
                &weight,
                &self.bias,
                self.stride,
                self.padding,
            )?);
        }
        if crate::ops::applies(x) {
            return Ok(crate::ops::conv2d(
                x,
                &weight,
                &self.bias,
                self.stride,
                self.padding,
            )?);
        }
        let y = x.conv2d(&weight, self.padding, self.stride, 1, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

/// `torch.nn.GroupNorm` with affine parameters; statistics in f32 whatever the input dtype.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// `(2, C)`: γ then β, the fused kernel's operand.
    gamma_beta: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight [C]` and `bias [C]`; `channels` must be divisible by `groups`.
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::unsupported(
                "norm_num_groups",
                format!("{groups} groups for {channels} channels"),
            ));
        }
        let weight = w.get(channels, "weight")?;
        let bias = w.get(channels, "bias")?;
        Ok(Self {
            gamma_beta: gamma_beta(&weight, &bias)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// Normalises `x (B, C, ...)` over each group of channels and all spatial positions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, None, false)
    }

    /// [`forward`](Self::forward), then `·(1 + scale) + shift` when `scale_shift (B, 2C)` (scale
    /// then shift) is given, then SiLU when `silu`: one fused kernel on the inference path.
    pub fn forward_act(
        &self,
        x: &Tensor,
        scale_shift: Option<&Tensor>,
        silu_after: bool,
    ) -> Result<Tensor> {
        if crate::ops::applies(x) && self.gamma_beta.dtype() == DType::F32 {
            return Ok(crate::ops::group_norm(
                x,
                &self.gamma_beta,
                self.groups,
                self.eps,
                scale_shift,
                silu_after,
            )?);
        }
        let tracked = scale_shift.is_some_and(|s| s.track_op());
        if training_kernel_applies(x, &self.weight, tracked) {
            return Ok(crate::ops::group_norm_train(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                scale_shift,
                silu_after,
            )?);
        }
        let mut y = self.reference(x)?;
        if let Some(ss) = scale_shift {
            let c = ss.dim(1)? / 2;
            let mut shape = vec![ss.dim(0)?, c];
            shape.extend(std::iter::repeat_n(1, x.rank() - 2));
            let scale = ss.narrow(1, 0, c)?.reshape(shape.as_slice())?;
            let shift = ss.narrow(1, c, c)?.reshape(shape.as_slice())?;
            y = y.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
        }
        if silu_after {
            y = silu(&y)?;
        }
        Ok(y)
    }

    fn reference(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xg = x.reshape((b, self.groups, ()))?.to_dtype(DType::F32)?;
        let n = xg.dim(2)? as f64;
        let mean = (xg.sum_keepdim(2)? / n)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(2)? / n)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut pshape = vec![1, c];
        pshape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let xn = xn.reshape(dims)?.to_dtype(dtype)?;
        Ok(xn
            .broadcast_mul(&self.weight.reshape(pshape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(pshape.as_slice())?)?)
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with affine parameters; statistics in f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    /// `(2, D)`: γ then β, the fused kernel's operand.
    gamma_beta: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight [dim]` and `bias [dim]`.
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.get(dim, "weight")?;
        let bias = w.get(dim, "bias")?;
        Ok(Self {
            gamma_beta: gamma_beta(&weight, &bias)?,
            weight,
            bias,
            eps,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if crate::ops::applies(x) && self.gamma_beta.dtype() == DType::F32 {
            return Ok(crate::ops::layer_norm(x, &self.gamma_beta, self.eps)?);
        }
        if training_kernel_applies(x, &self.weight, false) {
            return Ok(crate::ops::layer_norm_train(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// Whether a norm layer takes its training kernel (`ops::group_norm_train`,
/// `ops::layer_norm_train`): a gradient is tracked through `x`, `weight` or another input
/// (`other_tracked`), everything is f32 on the CPU, and the reference path is not forced.
fn training_kernel_applies(x: &Tensor, weight: &Tensor, other_tracked: bool) -> bool {
    (x.track_op() || weight.track_op() || other_tracked)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.device().is_cpu()
        && !crate::ops::forced_reference()
}

/// `[γ; β]` as one `(2, C)` tensor.
fn gamma_beta(weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    // Meta weights (stride-0 placeholders) stay unmaterialised, so that building a model from a
    // config alone allocates nothing however large the config says it is.
    if weight.stride().contains(&0) && bias.stride().contains(&0) {
        return Ok(weight.unsqueeze(0)?.broadcast_as((2, weight.dim(0)?))?);
    }
    Ok(Tensor::stack(&[weight, bias], 0)?)
}

/// SiLU, `x·σ(x)`.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if crate::ops::applies(x) {
        return Ok(crate::ops::silu(x)?);
    }
    Ok(candle_nn::ops::silu(x)?)
}

/// GELU, erf form.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if crate::ops::applies(x) {
        return Ok(crate::ops::gelu(x)?);
    }
    Ok(x.gelu_erf()?)
}

/// `x·σ(1.702·x)` (CLIP's `quick_gelu`).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if crate::ops::applies(x) {
        return Ok(crate::ops::quick_gelu(x)?);
    }
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// The activation named by a config's `act_fn`; only the values Kandinsky uses are accepted.
pub fn check_act_fn(key: &str, act_fn: &str) -> Result<()> {
    match act_fn {
        "silu" | "swish" => Ok(()),
        other => Err(Error::unsupported(key, other)),
    }
}

/// `F.interpolate(x, size=(h, w), mode="nearest")`: source index `floor(dst · in/out)`.
pub fn interpolate_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    if h.is_multiple_of(ih) && w.is_multiple_of(iw) && h / ih == w / iw {
        return upsample_nearest_int(x, h / ih);
    }
    let idx = |i: usize, o: usize| -> Result<Tensor> {
        let scale = i as f32 / o as f32;
        let v: Vec<u32> = (0..o)
            .map(|d| ((d as f32 * scale).floor() as usize).min(i - 1) as u32)
            .collect();
        Ok(Tensor::from_vec(v, o, x.device())?)
    };
    let x = x.index_select(&idx(ih, h)?, 2)?;
    Ok(x.index_select(&idx(iw, w)?, 3)?)
}

/// Nearest-neighbour upsampling by an integer factor (`F.interpolate(scale_factor=f)`).
pub fn upsample_nearest_int(x: &Tensor, f: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, f, w, f))?
        .reshape((b, c, h * f, w * f))?)
}

/// Multi-head scaled dot-product attention: `q (B, H, N, d)`, `k`/`v (B, H, M, d)`, softmax in
/// f32 (diffusers' `upcast_softmax`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_masked(q, k, v, scale, None)
}

/// [`attention`] with the heads merged: `(B, N, H·d)`, the layout the output projection takes.
pub fn attention_merged(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if crate::ops::applies(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        return Ok(crate::ops::attention(q, k, v, scale)?);
    }
    let (b, h, n, d) = q.dims4()?;
    let o = attention(q, k, v, scale)?;
    Ok(o.transpose(1, 2)?.reshape((b, n, h * d))?)
}

/// [`attention`] with an additive mask broadcastable to `(B, H, N, M)`.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    if crate::ops::applies(q)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && mask.is_none_or(|m| m.rank() == 4)
    {
        let o = crate::ops::attention_masked(q, k, v, scale, mask)?;
        return Ok(o.reshape((b, n, h, d))?.transpose(1, 2)?);
    }
    let dtype = q.dtype();
    let mut scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let scores = scores.to_dtype(DType::F32)?;
    // candle's fused softmax has no backward: when gradients are tracked (training), use the
    // composed one.
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    }
    .to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}
