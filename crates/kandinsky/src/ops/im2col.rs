//! Convolution for training as `im2col` + GEMM. candle derives conv2d's backward through a slow
//! conv-transpose (backward ≈ 6× forward on this CPU); here both gradients are GEMMs
//! (`dW = dYᵀ·cols`, `dcols = dY·W`) plus a `col2im` scatter. Used only when gradients are tracked;
//! inference keeps candle's conv2d.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn out(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.k) / self.stride + 1,
            (self.w + 2 * self.pad - self.k) / self.stride + 1,
        )
    }
}

/// `(B, C, H, W)` → `(C·k·k, B·Ho·Wo)`: row `(c, ky, kx)` holds that input pixel of every receptive
/// field (zero outside the image). This layout keeps the inner loops contiguous along `x`.
struct Im2Col(Geometry);

/// The adjoint of [`Im2Col`]: scatters-adds the columns back to `(B, C, H, W)`.
struct Col2Im {
    g: Geometry,
    b: usize,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => candle_core::bail!("im2col: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("im2col: contiguous input only"),
    }
}

/// For output column `ox`, kernel offset `kx`: the valid `ox` range (input inside the image).
fn valid_range(g: &Geometry, kx: usize, wo: usize, w: usize) -> (usize, usize) {
    // ix = ox·s + kx − pad ∈ [0, w)
    let lo = (g.pad.saturating_sub(kx)).div_ceil(g.stride);
    let hi_excl = if w + g.pad > kx {
        ((w + g.pad - kx - 1) / g.stride + 1).min(wo)
    } else {
        0
    };
    (lo.min(hi_excl), hi_excl)
}

/// Visits every (column-matrix row slice, input row slice) pair of one image plane.
#[allow(clippy::too_many_arguments)]
fn for_each_segment(
    g: &Geometry,
    n_total: usize,
    bi: usize,
    mut f: impl FnMut(usize, usize, usize, usize, usize),
) {
    let (ho, wo) = g.out();
    for ci in 0..g.c {
        for ky in 0..g.k {
            for kx in 0..g.k {
                let krow = (ci * g.k + ky) * g.k + kx;
                let (lo, hi) = valid_range(g, kx, wo, g.w);
                for oy in 0..ho {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize || lo >= hi {
                        continue;
                    }
                    let dst = krow * n_total + (bi * ho + oy) * wo;
                    let src = (bi * g.c + ci) * g.h * g.w + iy as usize * g.w;
                    // ix of ox = lo
                    let ix0 = lo * g.stride + kx - g.pad;
                    f(dst + lo, src + ix0, hi - lo, 0, 0);
                }
            }
        }
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l)?;
        let (b, _, _, _) = l.shape().dims4()?;
        let g = self.0;
        let (ho, wo) = g.out();
        let n = b * ho * wo;
        let rows = g.c * g.k * g.k;
        let mut out = vec![0f32; rows * n];
        for bi in 0..b {
            for_each_segment(&g, n, bi, |dst, src, len, _, _| {
                if g.stride == 1 {
                    out[dst..dst + len].copy_from_slice(&x[src..src + len]);
                } else {
                    for (j, o) in out[dst..dst + len].iter_mut().enumerate() {
                        *o = x[src + j * g.stride];
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let b = arg.dim(0)?;
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&Col2Im { g: self.0, b })?,
        ))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = f32_slice(s, l)?;
        let g = self.g;
        let b = self.b;
        let (ho, wo) = g.out();
        let n = b * ho * wo;
        let mut out = vec![0f32; b * g.c * g.h * g.w];
        for bi in 0..b {
            for_each_segment(&g, n, bi, |dst, src, len, _, _| {
                if g.stride == 1 {
                    for (o, c) in out[src..src + len].iter_mut().zip(&cols[dst..dst + len]) {
                        *o += c;
                    }
                } else {
                    for j in 0..len {
                        out[src + j * g.stride] += cols[dst + j];
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, g.c, g.h, g.w))))
    }
}

/// `conv2d(x, weight) + bias` for `x (B, C, H, W)` and `weight (O, C, k, k)`, as im2col + GEMM,
/// with GEMM gradients. f32 on CPU.
pub fn conv2d_gemm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, k, _) = weight.dims4()?;
    let g = Geometry {
        c,
        h,
        w,
        k,
        stride,
        pad,
    };
    let (ho, wo) = g.out();
    let cols = x.to_dtype(DType::F32)?.contiguous()?.apply_op1(Im2Col(g))?;
    let w2 = weight.reshape((o, c * k * k))?;
    let y = w2.matmul(&cols)?.broadcast_add(&bias.reshape((o, 1))?)?;
    y.reshape((o, b, ho, wo))?
        .permute((1, 0, 2, 3))?
        .contiguous()
}
