//! Scaled dot-product attention by blocks of queries: each task takes one (image, head, block of
//! query rows), computes that block's scores in a buffer that stays in L2, applies a vectorised
//! softmax and multiplies by V straight into the merged-heads output. The full `(N, M)` score
//! matrix of a head is never materialised (the UNet's 32×32 level would need 100 MB of it).

use super::gemm::{sgemm, View, ViewMut};
use super::{f32_data, simd, Result};
use candle_core::{CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

/// Bytes of scores per task (half the 1 MiB L2 of this project's machines).
const SCORE_BYTES: usize = 512 << 10;

/// `softmax(q·kᵀ·scale)·v` for `q (B, H, N, d)`, `k`/`v (B, H, M, d)` (any strides with the last
/// one 1) → `(B, N, H·d)`.
pub(crate) struct AttentionOp {
    pub scale: f32,
    pub mask: Option<Mask>,
}

/// An additive mask `(B or 1, H or 1, N or 1, M)`, row-major.
pub(crate) struct Mask {
    pub data: Vec<f32>,
    pub batches: usize,
    pub heads: usize,
    pub rows: usize,
}

impl Mask {
    /// Row `n` of the mask of (image, head), `m` values.
    fn row(&self, bi: usize, hi: usize, n: usize, m: usize) -> &[f32] {
        let plane = (if self.batches == 1 { 0 } else { bi }) * self.heads
            + if self.heads == 1 { 0 } else { hi };
        let r = if self.rows == 1 { 0 } else { n };
        &self.data[(plane * self.rows + r) * m..][..m]
    }
}

/// Element strides of a 4-D view whose last stride is 1.
fn strides4(l: &Layout, what: &str) -> Result<[usize; 3]> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        candle_core::bail!("attention: {what} must be 4-D with a unit last stride");
    }
    Ok([s[0], s[1], s[2]])
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attention-blocked"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, h, n, d) = ql.shape().dims4()?;
        let (kb, kh, m, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || vl.dims() != kl.dims() || m == 0 {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?}",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        let (q, k, v) = (f32_data(qs)?, f32_data(ks)?, f32_data(vs)?);
        let (sq, sk, sv) = (strides4(ql, "q")?, strides4(kl, "k")?, strides4(vl, "v")?);
        let (oq, ok, ov) = (ql.start_offset(), kl.start_offset(), vl.start_offset());
        if let Some(mk) = &self.mask {
            if mk.data.len() != mk.batches * mk.heads * mk.rows * m
                || (mk.batches != 1 && mk.batches != b)
                || (mk.heads != 1 && mk.heads != h)
                || (mk.rows != 1 && mk.rows != n)
            {
                candle_core::bail!(
                    "attention: the mask does not broadcast to ({b}, {h}, {n}, {m})"
                );
            }
        }
        let qb = (SCORE_BYTES / (4 * m)).clamp(8, 256).min(n.max(1));
        let blocks = n.div_ceil(qb);
        let mut out = vec![0f32; b * n * h * d];
        let dst_all = ViewMut {
            ptr: out.as_mut_ptr(),
            rs: (h * d) as isize,
            cs: 1,
        };
        let scale = self.scale;
        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let n0 = blk * qb;
            let rows = qb.min(n - n0);
            let mut scores = vec![0f32; rows * m];
            let qv = View {
                ptr: q[oq + bi * sq[0] + hi * sq[1] + n0 * sq[2]..].as_ptr(),
                rs: sq[2] as isize,
                cs: 1,
            };
            let kt = View {
                ptr: k[ok + bi * sk[0] + hi * sk[1]..].as_ptr(),
                rs: 1,
                cs: sk[2] as isize,
            };
            let sv_ = View {
                ptr: v[ov + bi * sv[0] + hi * sv[1]..].as_ptr(),
                rs: sv[2] as isize,
                cs: 1,
            };
            let sc = ViewMut {
                ptr: scores.as_mut_ptr(),
                rs: m as isize,
                cs: 1,
            };
            // SAFETY: `scores` is (rows, m); q rows n0.. of head hi, k and v all m rows, and the
            // output block (rows n0.., columns hi·d..) is written by this task only.
            unsafe {
                sgemm(rows, m, d, sc, false, qv, kt, scale, 1);
            }
            if let Some(mk) = &self.mask {
                for (r, row) in scores.chunks_exact_mut(m).enumerate() {
                    for (s, a) in row.iter_mut().zip(mk.row(bi, hi, n0 + r, m)) {
                        *s += a;
                    }
                }
            }
            simd::softmax_rows(&mut scores, m);
            let probs = View {
                ptr: scores.as_ptr(),
                rs: m as isize,
                cs: 1,
            };
            let dst = dst_all.offset((bi * n + n0) * h * d + hi * d);
            // SAFETY: as above.
            unsafe { sgemm(rows, d, m, dst, false, probs, sv_, 1.0, 1) };
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, h * d))))
    }
}
