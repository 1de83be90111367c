//! GroupNorm fused with what follows it in the UNet and MoVQ (the resnet's scale-shift from the
//! time embedding, then SiLU): statistics in one pass over each group, then one read and one
//! write per element. LayerNorm over rows, vectorised the same way.

use super::simd;
use super::{contiguous_f32, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape};
use rayon::prelude::*;

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
                let n = group_len as f32;
                let mean = simd::sum(src) / n;
                let var = simd::sq_dev(src, mean) / n;
                let rstd = 1.0 / (var + self.eps).sqrt();
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
        let rows_per_task = (16384 / d).max(1);
        out.par_chunks_mut(rows_per_task * d)
            .zip(x.par_chunks(rows_per_task * d))
            .for_each(|(dst, src)| {
                for (dr, sr) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    let mean = simd::sum(sr) / d as f32;
                    let var = simd::sq_dev(sr, mean) / d as f32;
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    simd::layer_affine(sr, dr, mean, rstd, gamma, beta);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
