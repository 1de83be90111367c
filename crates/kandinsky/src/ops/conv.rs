//! Inference convolution: im2col tiles (built on every core) times the weight matrix, written
//! straight into the NCHW output with the bias folded in. For the packed kernels the im2col rows
//! go straight into the packed operand (no f32 column matrix in between).
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

/// Fills `dst` (`(oy1 − oy0)·wo` values) with im2col row `(ky, kx)` of one channel plane `xc`:
/// the input pixel under that kernel tap for every output pixel of rows `oy0..oy1` (0 outside).
#[allow(clippy::too_many_arguments)]
fn im2col_row(
    xc: &[f32],
    g: &Geometry,
    ky: usize,
    kx: usize,
    oy0: usize,
    oy1: usize,
    dst: &mut [f32],
) {
    // Valid output columns: 0 ≤ ox·s + kx − pad < w.
    let lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(g.wo);
    let hi = if g.w + g.pad > kx {
        ((g.w + g.pad - kx - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    }
    .max(lo);
    for oy in oy0..oy1 {
        let d = &mut dst[(oy - oy0) * g.wo..][..g.wo];
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize {
            d.fill(0.0);
            continue;
        }
        let src = &xc[iy as usize * g.w..][..g.w];
        d[..lo].fill(0.0);
        d[hi..].fill(0.0);
        if hi > lo {
            let ix0 = lo * g.stride + kx - g.pad;
            if g.stride == 1 {
                d[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
            } else {
                for (j, v) in d[lo..hi].iter_mut().enumerate() {
                    *v = src[ix0 + j * g.stride];
                }
            }
        }
    }
}

/// The column operand of one GEMM of a convolution: `(C·k·k) × n`.
enum Cols<'a> {
    /// Already a matrix (a 1×1 stride-1 convolution's image): rows `ld` apart.
    Plain { data: &'a [f32], ld: usize },
    /// Output rows `oy0..oy1` of each image, side by side, to be gathered by im2col.
    Im2col {
        images: Vec<&'a [f32]>,
        oy0: usize,
        oy1: usize,
    },
}

impl Cols<'_> {
    /// Fills `dst` with row `kk` of the column matrix (`n` values).
    fn row(&self, g: &Geometry, kk: usize, dst: &mut [f32]) {
        match self {
            Cols::Plain { data, ld } => dst.copy_from_slice(&data[kk * ld..][..dst.len()]),
            Cols::Im2col { images, oy0, oy1 } => {
                let (ci, tap) = (kk / (g.k * g.k), kk % (g.k * g.k));
                let per = (oy1 - oy0) * g.wo;
                for (img, d) in images.iter().zip(dst.chunks_exact_mut(per)) {
                    let xc = &img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
                    im2col_row(xc, g, tap / g.k, tap % g.k, *oy0, *oy1, d);
                }
            }
        }
    }

    /// The whole column matrix as f32, row-major `(C·k·k) × n` (built on every core).
    fn matrix(&self, g: &Geometry, n: usize) -> Vec<f32> {
        let ckk = g.c * g.k * g.k;
        let mut cols = vec![0f32; ckk * n];
        // One task per input channel (k·k rows): enough tasks, not too small.
        let kk2 = g.k * g.k;
        cols.par_chunks_mut(n * kk2)
            .enumerate()
            .for_each(|(ci, rows)| {
                for (t, row) in rows.chunks_exact_mut(n).enumerate() {
                    self.row(g, ci * kk2 + t, row);
                }
            });
        cols
    }

    /// The column matrix packed as the lanes operand of [`packed::gemm`] (pixels are lanes), built
    /// row pair by row pair on every core without an f32 matrix in between.
    fn packed(&self, g: &Geometry, n: usize, kind: packed::Kind) -> Packed {
        let ckk = g.c * g.k * g.k;
        if let Cols::Plain { data, ld } = self {
            return Packed::pack_as(kind, data, n, ckk, 1, *ld, packed::LANES);
        }
        let per = kind.per_unit();
        let mut p = Packed::zeroed(kind, n, ckk, packed::LANES);
        let kp = p.kp();
        let panels = n.div_ceil(packed::LANES);
        let base = packed::UnitsMut::new(p.units_mut());
        // Each task fills whole units (one or two column rows) of every panel.
        let chunk = kp.div_ceil(8 * threads()).max(1);
        (0..kp.div_ceil(chunk)).into_par_iter().for_each(|t| {
            let mut rows = vec![0f32; per * n];
            for u in t * chunk..((t + 1) * chunk).min(kp) {
                for r in 0..per {
                    let kk = u * per + r;
                    let row = &mut rows[r * n..(r + 1) * n];
                    if kk < ckk {
                        self.row(g, kk, row);
                    } else {
                        row.fill(0.0);
                    }
                }
                for pi in 0..panels {
                    let l0 = pi * packed::LANES;
                    let nl = packed::LANES.min(n - l0);
                    // SAFETY: unit `u` of panel `pi` is written by this task only.
                    let dst = unsafe { base.unit(pi, u, kp) };
                    packed::pack_units(kind, &rows, n, l0, nl, dst);
                }
            }
        });
        p
    }
}

/// `dst (O × n, rows dst_rs apart) += W · cols` for a column operand of `n` columns.
type MatMul<'a> = dyn Fn(&Geometry, &Cols, usize, *mut f32, usize) + Sync + 'a;

/// The convolution around a weight multiply `mm`: bias fill and tiling.
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
    let plane = c * h * w;
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
            let cols = Cols::Plain {
                data: &x[bi * plane..(bi + 1) * plane],
                ld: hw,
            };
            mm(&g, &cols, hw, ob.as_mut_ptr(), hw);
        }
    } else if b * hw <= SMALL_PIXELS {
        let n = b * hw;
        let cols = Cols::Im2col {
            images: (0..b).map(|bi| &x[bi * plane..(bi + 1) * plane]).collect(),
            oy0: 0,
            oy1: g.ho,
        };
        let mut tmp = vec![0f32; o * n];
        fill_bias(&mut tmp, n, n);
        mm(&g, &cols, n, tmp.as_mut_ptr(), n);
        for bi in 0..b {
            for oc in 0..o {
                out[(bi * o + oc) * hw..][..hw].copy_from_slice(&tmp[oc * n + bi * hw..][..hw]);
            }
        }
    } else {
        let rows = (TILE_ELEMS / (ckk * g.wo)).clamp(1, g.ho);
        for bi in 0..b {
            let ob = &mut out[bi * o * hw..(bi + 1) * o * hw];
            let mut oy0 = 0;
            while oy0 < g.ho {
                let oy1 = (oy0 + rows).min(g.ho);
                let n = (oy1 - oy0) * g.wo;
                let tile = &mut ob[oy0 * g.wo..];
                for (oc, &bv) in bias.iter().enumerate() {
                    tile[oc * hw..][..n].fill(bv);
                }
                let cols = Cols::Im2col {
                    images: vec![&x[bi * plane..(bi + 1) * plane]],
                    oy0,
                    oy1,
                };
                mm(&g, &cols, n, tile.as_mut_ptr(), hw);
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
        let mm = |g: &Geometry, cols: &Cols, n: usize, dst: *mut f32, dst_rs: usize| {
            let owned;
            let (data, ld) = match cols {
                Cols::Plain { data, ld } => (*data, *ld),
                Cols::Im2col { .. } => {
                    owned = cols.matrix(g, n);
                    (owned.as_slice(), n)
                }
            };
            let rhs = View {
                ptr: data.as_ptr(),
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
        let mm = |g: &Geometry, cols: &Cols, n: usize, dst: *mut f32, dst_rs: usize| {
            let lanes = cols.packed(g, n, self.weight.kind);
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
