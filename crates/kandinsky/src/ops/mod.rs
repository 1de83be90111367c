//! Our own CPU kernels as candle custom ops, where candle is slow. Each has a plain-candle
//! reference (the layer code in `models::nn` that runs when the kernel does not apply) and tests
//! that compare the two.
//!
//! The inference kernels apply to f32 CPU tensors that track no gradient: they have no backward,
//! so training takes the reference path, except for the training kernels with a hand-written
//! backward (`im2col`'s GEMM convolution, [`group_norm_train`] and [`layer_norm_train`]).
//! [`with_reference`] forces the reference path on the calling thread.

pub mod attention;
pub mod conv;
mod gemm;
pub mod im2col;
pub mod norm;
pub mod packed;
pub mod simd;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::cell::Cell;
use std::sync::Arc;

pub(crate) use candle_core::Result;

thread_local! {
    static REFERENCE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every layer on its plain-candle reference path (on this thread).
pub fn with_reference<T>(f: impl FnOnce() -> T) -> T {
    let before = REFERENCE.with(|r| r.replace(true));
    let out = f();
    REFERENCE.with(|r| r.set(before));
    out
}

/// Whether [`with_reference`] forces the reference path on this thread.
pub fn forced_reference() -> bool {
    REFERENCE.with(|r| r.get())
}

/// Whether the inference kernels may run on `x`: f32, on the CPU, no gradient tracked, and the
/// reference path not forced.
pub fn applies(x: &Tensor) -> bool {
    x.dtype() == candle_core::DType::F32
        && x.device().is_cpu()
        && !x.track_op()
        && !REFERENCE.with(|r| r.get())
}

/// The f32 data of a storage (any layout).
fn f32_data(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(d) => Ok(d),
        _ => candle_core::bail!("kernel: f32 storage expected"),
    }
}

/// The f32 data of a contiguous layout.
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let d = f32_data(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("kernel: {what} must be contiguous"),
    }
}

/// `conv2d(x, weight) + bias`, `x (B, C, H, W)`, `weight (O, C, k, k)`, `bias (O)`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &conv::Conv2dOp { stride, pad },
    )
}

/// GroupNorm of `x (B, C, ...)` with `gamma_beta (2, C)`, then `·(1 + scale) + shift` when
/// `scale_shift (B, 2C)` is given, then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    gamma_beta: &Tensor,
    groups: usize,
    eps: f64,
    scale_shift: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let op = norm::GroupNormOp {
        groups,
        eps: eps as f32,
        silu,
    };
    let x = x.contiguous()?;
    match scale_shift {
        Some(ss) => x.apply_op3_no_bwd(gamma_beta, &ss.contiguous()?, &op),
        None => x.apply_op2_no_bwd(gamma_beta, &op),
    }
}

/// [`group_norm`] for training, with gradients for `x`, γ, β and the scale-shift: `gamma`,
/// `beta (C)` and `scale_shift (B, 2C)` may be variables or results of other ops.
pub fn group_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    scale_shift: Option<&Tensor>,
    silu: bool,
) -> Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    let ss = match scale_shift {
        Some(ss) => ss.reshape((2 * b, c))?,
        None => Tensor::zeros((2 * b, c), x.dtype(), x.device())?,
    };
    let params = Tensor::cat(&[&gamma.reshape((1, c))?, &beta.reshape((1, c))?, &ss], 0)?;
    x.contiguous()?.apply_op2(
        &params,
        norm::GroupNormTrainOp {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

/// [`layer_norm`] for training, with gradients for `x`, γ and β (`gamma`, `beta (D)`).
pub fn layer_norm_train(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let gb = Tensor::stack(&[gamma, beta], 0)?;
    x.contiguous()?
        .apply_op2(&gb, norm::LayerNormTrainOp { eps: eps as f32 })
}

/// LayerNorm over the last dimension with `gamma_beta (2, D)`.
pub fn layer_norm(x: &Tensor, gamma_beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(gamma_beta, &norm::LayerNormOp { eps: eps as f32 })
}

/// `softmax(q·kᵀ·scale)·v` with heads merged: `q (B, H, N, d)`, `k`/`v (B, H, M, d)` →
/// `(B, N, H·d)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_masked(q, k, v, scale, None)
}

/// [`attention()`] with an additive `mask` of shape `(B or 1, H or 1, N or 1, M)` added to the scaled
/// scores.
pub fn attention_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = match mask {
        Some(m) => {
            let (mb, mh, mn, _) = m.dims4()?;
            Some(attention::Mask {
                data: m
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                batches: mb,
                heads: mh,
                rows: mn,
            })
        }
        None => None,
    };
    let unit = |t: &Tensor| -> Result<Tensor> {
        if t.stride().last() == Some(&1) {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    unit(q)?.apply_op3_no_bwd(
        &unit(k)?,
        &unit(v)?,
        &attention::AttentionOp {
            scale: scale as f32,
            mask,
        },
    )
}

/// `y = x·Wᵀ + b` with `W` packed as lanes (`ops::packed`), `x (…, K)` → `(…, M)`; `x` is packed
/// in the weight's element type per call.
struct LinearPackedOp {
    weight: Arc<packed::Packed>,
    bias: Option<Arc<Vec<f32>>>,
}

impl CustomOp1 for LinearPackedOp {
    fn name(&self) -> &'static str {
        "linear-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "linear input")?;
        let (m, k) = (self.weight.rows, self.weight.k);
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {dims:?} against a packed {m}×{k} weight");
        }
        let rows = x.len() / k;
        let mut out = vec![0f32; rows * m];
        if let Some(b) = &self.bias {
            for r in out.chunks_exact_mut(m) {
                r.copy_from_slice(b);
            }
        }
        let xp = packed::Packed::pack_as(self.weight.kind, x, rows, k, k, 1, packed::COLS);
        let dst = packed::Out {
            ptr: out.as_mut_ptr(),
            js: m,
        };
        // SAFETY: `out` is (rows × m), output features contiguous.
        unsafe { packed::gemm(&self.weight, &xp, dst, self.bias.is_some(), gemm::threads()) };
        *dims.last_mut().expect("checked above") = m;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `x·Wᵀ + b` for a weight packed as [`packed::LANES`] panels (bf16 or f32).
pub fn linear_packed(
    x: &Tensor,
    weight: &Arc<packed::Packed>,
    bias: Option<&Arc<Vec<f32>>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LinearPackedOp {
        weight: weight.clone(),
        bias: bias.cloned(),
    })
}

/// `conv2d(x, W) + bias` for a `k×k` weight packed as [`packed::COLS`] panels of `(C·k·k)`-long
/// rows (bf16 or f32).
pub fn conv2d_packed(
    x: &Tensor,
    weight: &Arc<packed::Packed>,
    bias: &Tensor,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(
        &bias.contiguous()?,
        &conv::Conv2dPackedOp {
            weight: weight.clone(),
            k,
            stride,
            pad,
        },
    )
}

/// The f32 data of a contiguous CPU tensor, copied.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// An element-wise activation, vectorised and spread over the threads.
#[derive(Clone, Copy)]
enum Activation {
    Silu,
    Gelu,
    QuickGelu,
}

impl CustomOp1 for Activation {
    fn name(&self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::Gelu => "gelu-erf",
            Self::QuickGelu => "quick-gelu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let mut v = contiguous_f32(s, l, "activation input")?.to_vec();
        let f = match self {
            Self::Silu => simd::silu_inplace,
            Self::Gelu => simd::gelu_inplace,
            Self::QuickGelu => simd::quick_gelu_inplace,
        };
        v.par_chunks_mut(1 << 14).for_each(f);
        Ok((CpuStorage::F32(v), l.shape().clone()))
    }
}

/// `x·σ(x)`, vectorised.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Activation::Silu)
}

/// GELU, erf form (`torch.nn.functional.gelu`), vectorised.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Activation::Gelu)
}

/// `x·σ(1.702·x)` (CLIP's `quick_gelu`), vectorised.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Activation::QuickGelu)
}
