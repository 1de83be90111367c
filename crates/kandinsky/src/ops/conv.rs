//! Inference convolution: im2col tiles (built on every core) times the weight matrix, written
//! straight into the NCHW output with the bias folded in.
//!
//! The weight `(O, C, k, k)` is used in its loaded layout as the `(O, C·k·k)` left operand, so no
//! call re-flattens or transposes it (candle's conv2d copies the whole kernel on every call). A
//! 1×1 stride-1 convolution needs no im2col at all: each image is already the `(C, H·W)` operand.
//! Small maps (deep UNet levels) put every image of the batch into one GEMM so the weight is
//! streamed once; large maps are cut into row tiles so the column matrix stays small.

use super::gemm::{sgemm, threads, View, ViewMut};
use super::packed::{self, Out, Packed};
use super::{contiguous_f32, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use rayon::prelude::*;
use std::sync::Arc;

/// Column-matrix elements per tile (16 MiB).
const TILE_ELEMS: usize = 4 << 20;
/// Below this many output pixels over the whole batch, one GEMM covers the batch.
const SMALL_PIXELS: usize = 1024;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

/// Writes the im2col rows of output rows `oy0..oy1` of one image `x (C, H, W)` into `cols`:
/// row `(c, ky, kx)` starts at `(c·k + ky)·k + kx)·ld`, its pixels from column `col0` on.
fn im2col_tile(
    x: &[f32],
    g: &Geometry,
    oy0: usize,
    oy1: usize,
    cols: &mut [f32],
    ld: usize,
    col0: usize,
) {
    let kk = g.k * g.k;
    let plane = g.h * g.w;
    let per_channel = kk * ld;
    let fill_channel = |ci: usize, chunk: &mut [f32]| {
        let xc = &x[ci * plane..(ci + 1) * plane];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut chunk[(ky * g.k + kx) * ld..][..ld];
                // Valid output columns: 0 ≤ ox·s + kx − pad < w.
                let lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(g.wo);
                let hi = if g.w + g.pad > kx {
                    ((g.w + g.pad - kx - 1) / g.stride + 1).min(g.wo)
                } else {
                    0
                }
                .max(lo);
                for oy in oy0..oy1 {
                    let dst = &mut row[col0 + (oy - oy0) * g.wo..][..g.wo];
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &xc[iy as usize * g.w..][..g.w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if hi > lo {
                        let ix0 = lo * g.stride + kx - g.pad;
                        if g.stride == 1 {
                            dst[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
                        } else {
                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[ix0 + j * g.stride];
                            }
                        }
                    }
                }
            }
        }
    };
    cols[..g.c * per_channel]
        .par_chunks_mut(per_channel)
        .enumerate()
        .for_each(|(ci, chunk)| fill_channel(ci, chunk));
}

/// `dst (O × ncols, rows dst_rs apart) += W · cols`, with `cols` the `(C·k·k) × ncols` column matrix
/// whose rows are `ld` apart.
type MatMul<'a> = dyn Fn(&[f32], usize, usize, *mut f32, usize) + Sync + 'a;

/// The convolution around a weight multiply `mm`: bias fill, im2col and tiling.
#[allow(clippy::too_many_arguments)]
fn conv_forward(
    x: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    bias: &[f32],
    k: usize,
    stride: usize,
    pad: usize,
    mm: &MatMul,
) -> Result<(CpuStorage, Shape)> {
    let o = bias.len();
    if h + 2 * pad < k || w + 2 * pad < k {
        candle_core::bail!("conv2d: {h}×{w} input smaller than the {k}×{k} kernel");
    }
    let s = stride.max(1);
    let g = Geometry {
        c,
        h,
        w,
        k,
        stride: s,
        pad,
        ho: (h + 2 * pad - k) / s + 1,
        wo: (w + 2 * pad - k) / s + 1,
    };
    let hw = g.ho * g.wo;
    let ckk = c * k * k;
    let mut out = vec![0f32; b * o * hw];
    let fill_bias = |out: &mut [f32], cols: usize, row_stride: usize| {
        for (oc, &bv) in bias.iter().enumerate() {
            out[oc * row_stride..][..cols].fill(bv);
        }
    };
    if k == 1 && s == 1 && pad == 0 {
        for bi in 0..b {
            let ob = &mut out[bi * o * hw..(bi + 1) * o * hw];
            fill_bias(ob, hw, hw);
            mm(
                &x[bi * c * hw..(bi + 1) * c * hw],
                hw,
                hw,
                ob.as_mut_ptr(),
                hw,
            );
        }
    } else if b * hw <= SMALL_PIXELS {
        let n = b * hw;
        let mut cols = vec![0f32; ckk * n];
        for bi in 0..b {
            im2col_tile(&x[bi * c * h * w..], &g, 0, g.ho, &mut cols, n, bi * hw);
        }
        let mut tmp = vec![0f32; o * n];
        fill_bias(&mut tmp, n, n);
        mm(&cols, n, n, tmp.as_mut_ptr(), n);
        for bi in 0..b {
            for oc in 0..o {
                out[(bi * o + oc) * hw..][..hw].copy_from_slice(&tmp[oc * n + bi * hw..][..hw]);
            }
        }
    } else {
        let rows = (TILE_ELEMS / (ckk * g.wo)).clamp(1, g.ho);
        let mut cols = vec![0f32; ckk * rows * g.wo];
        for bi in 0..b {
            let xb = &x[bi * c * h * w..];
            let ob = &mut out[bi * o * hw..(bi + 1) * o * hw];
            let mut oy0 = 0;
            while oy0 < g.ho {
                let oy1 = (oy0 + rows).min(g.ho);
                let n = (oy1 - oy0) * g.wo;
                im2col_tile(xb, &g, oy0, oy1, &mut cols, n, 0);
                let tile = &mut ob[oy0 * g.wo..];
                for (oc, &bv) in bias.iter().enumerate() {
                    tile[oc * hw..][..n].fill(bv);
                }
                mm(&cols[..ckk * n], n, n, tile.as_mut_ptr(), hw);
                oy0 = oy1;
            }
        }
    }
    Ok((CpuStorage::F32(out), Shape::from((b, o, g.ho, g.wo))))
}

/// `conv2d(x, w) + b` (square kernel, symmetric padding, no dilation or groups).
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub pad: usize,
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "conv2d input")?;
        let wt = contiguous_f32(ws, wl, "conv2d weight")?;
        let bias = contiguous_f32(bs, bl, "conv2d bias")?;
        let dims = xl.shape().dims4()?;
        let (o, wc, k, k2) = wl.shape().dims4()?;
        if wc != dims.1 || k != k2 || bias.len() != o {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?}, bias {}",
                xl.dims(),
                wl.dims(),
                bias.len()
            );
        }
        let ckk = wc * k * k;
        let nt = threads();
        let a = View {
            ptr: wt.as_ptr(),
            rs: ckk as isize,
            cs: 1,
        };
        let mm = |cols: &[f32], ld: usize, n: usize, dst: *mut f32, dst_rs: usize| {
            let rhs = View {
                ptr: cols.as_ptr(),
                rs: ld as isize,
                cs: 1,
            };
            let dst = ViewMut {
                ptr: dst,
                rs: dst_rs as isize,
                cs: 1,
            };
            // SAFETY: `conv_forward` hands a (ckk × n) column matrix and an (o × n) output.
            unsafe { sgemm(o, n, ckk, dst, true, a, rhs, 1.0, nt) };
        };
        conv_forward(x, dims, bias, k, self.stride, self.pad, &mm)
    }
}

/// The same convolution with the weight packed (bf16 or f32) as the broadcast operand of
/// [`packed::gemm`], and the columns packed in the same element type per call.
pub(crate) struct Conv2dPackedOp {
    pub weight: Arc<Packed>,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl CustomOp2 for Conv2dPackedOp {
    fn name(&self) -> &'static str {
        "conv2d-packed"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "conv2d input")?;
        let bias = contiguous_f32(bs, bl, "conv2d bias")?;
        let dims = xl.shape().dims4()?;
        let ckk = dims.1 * self.k * self.k;
        if self.weight.k != ckk || self.weight.rows != bias.len() {
            candle_core::bail!(
                "conv2d: input {:?} against a packed {}×{} weight",
                xl.dims(),
                self.weight.rows,
                self.weight.k
            );
        }
        let nt = threads();
        let mm = |cols: &[f32], ld: usize, n: usize, dst: *mut f32, dst_rs: usize| {
            let lanes = Packed::pack_as(self.weight.kind, cols, n, ckk, 1, ld, packed::LANES);
            // SAFETY: the output is (o × n) with rows `dst_rs` apart, lanes (pixels) contiguous.
            unsafe {
                packed::gemm(
                    &lanes,
                    &self.weight,
                    Out {
                        ptr: dst,
                        js: dst_rs,
                    },
                    true,
                    nt,
                )
            };
        };
        conv_forward(x, dims, bias, self.k, self.stride, self.pad, &mm)
    }
}
