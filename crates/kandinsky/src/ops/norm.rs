//! GroupNorm fused with what follows it in the UNet and MoVQ (the resnet's scale-shift from the
//! time embedding, then SiLU): statistics in one pass over each group, then one read and one
//! write per element. LayerNorm over rows, vectorised the same way.

use super::simd;
use super::{contiguous_f32, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// `(mean, 1/√(var + eps))` of the values normalised together (a group, or a LayerNorm row).
fn norm_stats(src: &[f32], eps: f32) -> (f32, f32) {
    let n = src.len() as f32;
    let mean = simd::sum(src) / n;
    let var = simd::sq_dev(src, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Rows per task of the LayerNorm kernels.
fn rows_per_task(d: usize) -> usize {
    (16384 / d).max(1)
}

/// Runs the backward op `grad_op` on `(x, params, dy)` and splits its flat output into the
/// gradients of `x` and of `params`, shaped like them (the training norms' backward).
fn split_backward(
    x: &candle_core::Tensor,
    params: &candle_core::Tensor,
    dy: &candle_core::Tensor,
    grad_op: &impl CustomOp3,
) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
    let both = x.apply_op3_no_bwd(params, &dy.contiguous()?, grad_op)?;
    let n = x.elem_count();
    let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
    let dp = both
        .narrow(0, n, params.elem_count())?
        .reshape(params.shape())?;
    Ok((Some(dx), Some(dp)))
}

/// `GroupNorm(x)·γ + β`, optionally `·(1 + scale) + shift` per (image, channel), optionally SiLU.
pub(crate) struct GroupNormOp {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

impl GroupNormOp {
    /// `gb` is `(2, C)`: γ then β; `ss`, when given, `(B, 2C)`: scale then shift.
    fn run(
        &self,
        x: &[f32],
        xl: &Layout,
        gb: &[f32],
        ss: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xl.dims();
        if dims.len() < 2 {
            candle_core::bail!("group_norm: input {dims:?} has no channel dimension");
        }
        let (b, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        if self.groups == 0 || !c.is_multiple_of(self.groups) || gb.len() != 2 * c {
            candle_core::bail!("group_norm: {c} channels, {} groups", self.groups);
        }
        if ss.is_some_and(|s| s.len() != b * 2 * c) {
            candle_core::bail!("group_norm: scale-shift must be (B, 2C)");
        }
        let cpg = c / self.groups;
        let group_len = cpg * plane;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let (bi, gi) = (i / self.groups, i % self.groups);
                let (mean, rstd) = norm_stats(src, self.eps);
                for j in 0..cpg {
                    let ch = gi * cpg + j;
                    let (mut a, mut d) = (gb[ch] * rstd, gb[c + ch]);
                    if let Some(ss) = ss {
                        let (scale, shift) = (ss[bi * 2 * c + ch], ss[bi * 2 * c + c + ch]);
                        a *= 1.0 + scale;
                        d = d * (1.0 + scale) + shift;
                    }
                    let range = j * plane..(j + 1) * plane;
                    simd::affine(&src[range.clone()], &mut dst[range], mean, a, d, self.silu);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

impl CustomOp2 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-fused"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "group_norm input")?;
        let gb = contiguous_f32(gs, gl, "group_norm affine")?;
        self.run(x, xl, gb, None)
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-scale-shift"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "group_norm input")?;
        let gb = contiguous_f32(gs, gl, "group_norm affine")?;
        let ss = contiguous_f32(ss, sl, "group_norm scale-shift")?;
        self.run(x, xl, gb, Some(ss))
    }
}

/// LayerNorm over the last dimension: `gb` is `(2, D)`, γ then β.
pub(crate) struct LayerNormOp {
    pub eps: f32,
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "layer_norm input")?;
        let gb = contiguous_f32(gs, gl, "layer_norm affine")?;
        let d = *xl.dims().last().unwrap_or(&0);
        if d == 0 || gb.len() != 2 * d {
            candle_core::bail!("layer_norm: rows of {d}, affine of {}", gb.len());
        }
        let (gamma, beta) = gb.split_at(d);
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(d) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(dst, src)| {
                for (dr, sr) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    let (mean, rstd) = norm_stats(sr, self.eps);
                    simd::layer_affine(sr, dr, mean, rstd, gamma, beta);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// GroupNorm with its affine, scale-shift and SiLU for training: one op with a hand-written
/// backward. Composed from candle ops, the same layer takes about ten passes forward and more
/// backward, and every broadcast of γ, β, scale and shift costs candle a slow strided reduction
/// (a seventh of a UNet training step). The parameters come as one `(2 + 2B, C)` tensor: γ, β,
/// then scale and shift of each image (zeros without a scale-shift), so that their gradients flow
/// back through the ordinary ops that assembled it.
#[derive(Clone, Copy)]
pub(crate) struct GroupNormTrainOp {
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
}

impl GroupNormTrainOp {
    /// Checks the shapes: `(B, C, plane)` and the parameters' `(2 + 2B)·C`.
    fn dims(&self, xl: &Layout, params: usize) -> Result<(usize, usize, usize)> {
        let dims = xl.dims();
        if dims.len() < 2 {
            candle_core::bail!("group_norm: input {dims:?} has no channel dimension");
        }
        let (b, c) = (dims[0], dims[1]);
        let plane: usize = dims[2..].iter().product();
        if self.groups == 0 || !c.is_multiple_of(self.groups) || params != (2 + 2 * b) * c {
            candle_core::bail!(
                "group_norm: {c} channels, {} groups, {params} parameters",
                self.groups
            );
        }
        Ok((b, c, plane))
    }
}

impl CustomOp2 for GroupNormTrainOp {
    fn name(&self) -> &'static str {
        "group-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "group_norm input")?;
        let p = contiguous_f32(ps, pl, "group_norm parameters")?;
        let (_, c, _) = self.dims(xl, p.len())?;
        let op = GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            silu: self.silu,
        };
        op.run(x, xl, &p[..2 * c], Some(&p[2 * c..]))
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        params: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        split_backward(x, params, grad, &GroupNormGradOp(*self))
    }
}

/// The backward of [`GroupNormTrainOp`]: `(x, params, dy)` → the input's gradient then the
/// parameters', flattened into one vector.
struct GroupNormGradOp(GroupNormTrainOp);

impl CustomOp3 for GroupNormGradOp {
    fn name(&self) -> &'static str {
        "group-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.0;
        let x = contiguous_f32(xs, xl, "group_norm input")?;
        let p = contiguous_f32(ps, pl, "group_norm parameters")?;
        let dy = contiguous_f32(gs, gl, "group_norm gradient")?;
        let (b, c, plane) = op.dims(xl, p.len())?;
        let cpg = c / op.groups;
        let group_len = cpg * plane;
        let mut out = vec![0f32; x.len() + p.len()];
        let (dx, dp) = out.split_at_mut(x.len());
        // Per (image, channel): Σ dz·x̂ and Σ dz, summed over the images afterwards.
        let mut sums = vec![(0f32, 0f32); b * c];
        dx.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .zip(dy.par_chunks(group_len))
            .zip(sums.par_chunks_mut(cpg))
            .enumerate()
            .for_each(|(i, (((dst, src), g), sums))| {
                let (bi, gi) = (i / op.groups, i % op.groups);
                let (mean, rstd) = norm_stats(src, op.eps);
                let coef = |ch: usize| {
                    let (scale, shift) = (p[(2 + 2 * bi) * c + ch], p[(3 + 2 * bi) * c + ch]);
                    let a = p[ch] * (1.0 + scale);
                    (a, p[c + ch] * (1.0 + scale) + shift)
                };
                let (mut s1, mut s2) = (0f32, 0f32);
                for (j, sum) in sums.iter_mut().enumerate() {
                    let (a, d) = coef(gi * cpg + j);
                    let r = j * plane..(j + 1) * plane;
                    let (ta, td) = simd::norm_grad(
                        &src[r.clone()],
                        &g[r.clone()],
                        &mut dst[r],
                        (mean, rstd),
                        (a, d),
                        op.silu,
                    );
                    *sum = (ta, td);
                    // Σ dx̂ and Σ dx̂·x̂ over the group, dx̂ = a·dz.
                    s1 += a * td;
                    s2 += a * ta;
                }
                let n = group_len as f32;
                for j in 0..cpg {
                    let (a, _) = coef(gi * cpg + j);
                    let r = j * plane..(j + 1) * plane;
                    simd::norm_dx(
                        &src[r.clone()],
                        &mut dst[r],
                        (mean, rstd),
                        a,
                        (s1 / n, s2 / n),
                    );
                }
            });
        let (dgb, dss) = dp.split_at_mut(2 * c);
        for bi in 0..b {
            for ch in 0..c {
                let (ta, td) = sums[bi * c + ch];
                let scale = p[(2 + 2 * bi) * c + ch];
                dgb[ch] += ta * (1.0 + scale);
                dgb[c + ch] += td * (1.0 + scale);
                dss[2 * bi * c + ch] = ta * p[ch] + td * p[c + ch];
                dss[(2 * bi + 1) * c + ch] = td;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + p.len())))
    }
}

/// LayerNorm over the last dimension for training, `gb (2, D)` (γ then β), with a hand-written
/// backward: composed from candle ops its γ and β gradients are strided reductions over every
/// row, and the statistics take five more passes.
#[derive(Clone, Copy)]
pub(crate) struct LayerNormTrainOp {
    pub eps: f32,
}

impl CustomOp2 for LayerNormTrainOp {
    fn name(&self) -> &'static str {
        "layer-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        LayerNormOp { eps: self.eps }.cpu_fwd(xs, xl, gs, gl)
    }

    fn bwd(
        &self,
        x: &candle_core::Tensor,
        gb: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<(Option<candle_core::Tensor>, Option<candle_core::Tensor>)> {
        split_backward(x, gb, grad, &LayerNormGradOp(*self))
    }
}

/// The backward of [`LayerNormTrainOp`]: `(x, gb, dy)` → the input's gradient then γ's and β's,
/// flattened into one vector.
struct LayerNormGradOp(LayerNormTrainOp);

impl CustomOp3 for LayerNormGradOp {
    fn name(&self) -> &'static str {
        "layer-norm-train-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "layer_norm input")?;
        let gb = contiguous_f32(gs, gl, "layer_norm affine")?;
        let dy = contiguous_f32(ys, yl, "layer_norm gradient")?;
        let d = *xl.dims().last().unwrap_or(&0);
        if d == 0 || gb.len() != 2 * d {
            candle_core::bail!("layer_norm: rows of {d}, affine of {}", gb.len());
        }
        let gamma = &gb[..d];
        let eps = self.0.eps;
        let chunk = rows_per_task(d) * d;
        let mut dx = vec![0f32; x.len()];
        // Each task's partial Σ dy·x̂ and Σ dy per feature, summed in task order afterwards.
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(dy.par_chunks(chunk))
            .map(|((dst, src), g)| {
                let mut acc = vec![0f32; 2 * d];
                for ((dr, sr), gr) in dst
                    .chunks_exact_mut(d)
                    .zip(src.chunks_exact(d))
                    .zip(g.chunks_exact(d))
                {
                    let (mean, rstd) = norm_stats(sr, eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for j in 0..d {
                        let xn = (sr[j] - mean) * rstd;
                        let dxn = gr[j] * gamma[j];
                        acc[j] += gr[j] * xn;
                        acc[d + j] += gr[j];
                        s1 += dxn;
                        s2 += dxn * xn;
                    }
                    let (c1, c2) = (s1 / d as f32, s2 / d as f32);
                    for j in 0..d {
                        let xn = (sr[j] - mean) * rstd;
                        dr[j] = rstd * (gr[j] * gamma[j] - c1 - xn * c2);
                    }
                }
                acc
            })
            .collect();
        let mut out = dx;
        let mut dgb = vec![0f32; 2 * d];
        for p in &partial {
            for (a, v) in dgb.iter_mut().zip(p) {
                *a += v;
            }
        }
        out.extend(dgb);
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * d)))
    }
}
