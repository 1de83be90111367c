//! Vectorised element-wise maths (exp, SiLU, row softmax) for the inference kernels.
//!
//! Each routine is written once as plain Rust over fixed-width lanes that LLVM vectorises, and
//! compiled twice: for AVX-512 (chosen at run time when the CPU has it) and for the portable
//! baseline. `force_portable` switches the choice off so tests cover the fallback too.

use std::sync::atomic::{AtomicBool, Ordering};

static FORCE_PORTABLE: AtomicBool = AtomicBool::new(false);

/// Makes every kernel take its portable path (tests of the fallback); `false` restores the
/// run-time detection.
pub fn force_portable(on: bool) {
    FORCE_PORTABLE.store(on, Ordering::SeqCst);
}

/// Whether the AVX-512 paths may be used: the CPU has AVX-512 F/BW/VL/DQ and FMA, and the
/// portable path is not forced.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !FORCE_PORTABLE.load(Ordering::Relaxed)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

const LANES: usize = 16;

/// `e^x` to about one ulp: Cody–Waite reduction by ln 2 and a degree-7 Taylor polynomial on
/// |r| ≤ ln2/2 (truncation error below 2⁻²⁴ relative). Results below e^-87.3 flush to 0, above
/// e^88.3 saturate (keeping 2ⁿ a normal float).
#[inline(always)]
fn exp1(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    // `t` = MAGIC + n exactly, so its bits hold n: no float→int conversion (Rust's saturating
    // `as i32` would not vectorise).
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(ni.wrapping_add(127) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// Applies `f` to every element of `x`, in lanes the compiler vectorises.
#[inline(always)]
fn map_lanes(x: &mut [f32], f: impl Fn(f32) -> f32 + Copy) {
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        let c: &mut [f32; LANES] = c.try_into().expect("chunk of LANES");
        for v in c.iter_mut() {
            *v = f(*v);
        }
    }
    for v in chunks.into_remainder() {
        *v = f(*v);
    }
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), with the vectorised exp.
#[inline(always)]
fn erf1(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4_f32;
    p = p * t - 1.453_152;
    p = p * t + 1.421_413_7;
    p = p * t - 0.284_496_74;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp1(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// GELU with the exact (erf) formulation, `x/2·(1 + erf(x/√2))`.
#[inline(always)]
fn gelu1(x: f32) -> f32 {
    0.5 * x * (1.0 + erf1(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x·σ(1.702·x)` (CLIP's `quick_gelu`).
#[inline(always)]
fn quick_gelu1(x: f32) -> f32 {
    x / (1.0 + exp1(-1.702 * x))
}

#[inline(always)]
fn silu1(x: f32) -> f32 {
    x / (1.0 + exp1(-x))
}

/// Largest element (−∞ for an empty row).
#[inline(always)]
fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunk of LANES");
        for (a, v) in acc.iter_mut().zip(c) {
            // A plain compare (not `f32::max`, whose NaN rule blocks vectorisation).
            *a = if *v > *a { *v } else { *a };
        }
    }
    let mut m = acc.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    for v in chunks.remainder() {
        m = m.max(*v);
    }
    m
}

#[inline(always)]
fn softmax_rows_impl(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        let m = max_lanes(row);
        // Two passes over a row that sits in L1: fused, LLVM turns the lanes into gathers.
        map_lanes(row, |v| exp1(v - m));
        let inv = 1.0 / sum_impl(row);
        map_lanes(row, |v| v * inv);
    }
}

/// `y = (x − mean)·a + b` with an optional SiLU, the epilogue of a fused normalisation.
#[inline(always)]
fn affine_impl(src: &[f32], dst: &mut [f32], mean: f32, a: f32, b: f32, silu: bool) {
    if silu {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = silu1((s - mean) * a + b);
        }
    } else {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = (s - mean) * a + b;
        }
    }
}

/// `y = (x − mean)·rstd·γ + β` over one row.
#[inline(always)]
fn layer_affine_impl(src: &[f32], dst: &mut [f32], mean: f32, rstd: f32, g: &[f32], b: &[f32]) {
    for (((d, s), g), b) in dst.iter_mut().zip(src).zip(g).zip(b) {
        *d = (s - mean) * rstd * g + b;
    }
}

/// Sum and sum of squared deviations from `mean` (two passes, as the reference does).
#[inline(always)]
fn sum_impl(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[inline(always)]
fn sq_dev_impl(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            let d = *v - mean;
            *a += d * d;
        }
    }
    acc.iter().sum::<f32>()
        + chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>()
}

/// The first backward pass of a fused normalisation `y = act((x − mean)·rstd·a + b)` over one
/// channel: stores `dz = dy·act′(z)` and returns `(Σ dz·x̂, Σ dz)`, `x̂ = (x − mean)·rstd`.
#[inline(always)]
fn norm_grad_impl(
    x: &[f32],
    dy: &[f32],
    dz: &mut [f32],
    (mean, rstd): (f32, f32),
    (a, b): (f32, f32),
    silu: bool,
) -> (f32, f32) {
    let (mut sa, mut sd) = ([0f32; LANES], [0f32; LANES]);
    let step = |x: f32, dy: f32| -> (f32, f32) {
        let xn = (x - mean) * rstd;
        let g = if silu {
            let z = xn * a + b;
            let s = 1.0 / (1.0 + exp1(-z));
            dy * s * (1.0 + z * (1.0 - s))
        } else {
            dy
        };
        (g, xn)
    };
    let n = x.len() / LANES * LANES;
    for ((xc, yc), dc) in x[..n]
        .chunks_exact(LANES)
        .zip(dy[..n].chunks_exact(LANES))
        .zip(dz[..n].chunks_exact_mut(LANES))
    {
        for l in 0..LANES {
            let (g, xn) = step(xc[l], yc[l]);
            dc[l] = g;
            sa[l] += g * xn;
            sd[l] += g;
        }
    }
    let (mut ta, mut td) = (sa.iter().sum::<f32>(), sd.iter().sum::<f32>());
    for i in n..x.len() {
        let (g, xn) = step(x[i], dy[i]);
        dz[i] = g;
        ta += g * xn;
        td += g;
    }
    (ta, td)
}

/// The last backward pass of a normalisation over one channel: `dz ← rstd·(a·dz − c1 − x̂·c2)`,
/// the input's gradient.
#[inline(always)]
fn norm_dx_impl(x: &[f32], dz: &mut [f32], (mean, rstd): (f32, f32), a: f32, (c1, c2): (f32, f32)) {
    for (d, &x) in dz.iter_mut().zip(x) {
        let xn = (x - mean) * rstd;
        *d = rstd * (a * *d - c1 - xn * c2);
    }
}

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                if has_avx512() {
                    // SAFETY: the CPU features were detected at run time.
                    return unsafe { fast($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

#[inline(always)]
fn exp_impl(x: &mut [f32]) {
    map_lanes(x, exp1)
}

#[inline(always)]
fn silu_impl(x: &mut [f32]) {
    map_lanes(x, silu1)
}

dispatch!(
    /// `x ← e^x` element-wise.
    pub fn exp_inplace(x: &mut [f32]) => exp_impl
);
#[inline(always)]
fn gelu_impl(x: &mut [f32]) {
    map_lanes(x, gelu1)
}

#[inline(always)]
fn quick_gelu_impl(x: &mut [f32]) {
    map_lanes(x, quick_gelu1)
}

dispatch!(
    /// `x ← GELU(x)` (erf form) element-wise.
    pub fn gelu_inplace(x: &mut [f32]) => gelu_impl
);
dispatch!(
    /// `x ← x·σ(1.702·x)` element-wise.
    pub fn quick_gelu_inplace(x: &mut [f32]) => quick_gelu_impl
);
dispatch!(
    /// `x ← x·σ(x)` element-wise.
    pub fn silu_inplace(x: &mut [f32]) => silu_impl
);
dispatch!(
    /// Softmax of every row of a row-major matrix with `cols` columns, in place.
    pub fn softmax_rows(x: &mut [f32], cols: usize) => softmax_rows_impl
);
dispatch!(
    /// `dst = (src − mean)·a + b`, then SiLU when `silu`.
    pub fn affine(src: &[f32], dst: &mut [f32], mean: f32, a: f32, b: f32, silu: bool) => affine_impl
);
dispatch!(
    /// `dst = (src − mean)·rstd·γ + β`.
    pub fn layer_affine(src: &[f32], dst: &mut [f32], mean: f32, rstd: f32, g: &[f32], b: &[f32]) => layer_affine_impl
);
dispatch!(
    /// The first backward pass of `y = act((x − mean)·rstd·a + b)` over one channel: stores
    /// `dz = dy·act′(z)` and returns `(Σ dz·x̂, Σ dz)`.
    pub fn norm_grad(x: &[f32], dy: &[f32], dz: &mut [f32], stats: (f32, f32), coef: (f32, f32), silu: bool) -> (f32, f32) => norm_grad_impl
);
dispatch!(
    /// The input gradient of a normalisation over one channel: `dz ← rstd·(a·dz − c1 − x̂·c2)`.
    pub fn norm_dx(x: &[f32], dz: &mut [f32], stats: (f32, f32), a: f32, c: (f32, f32)) => norm_dx_impl
);
dispatch!(
    /// Sum of the elements.
    pub fn sum(x: &[f32]) -> f32 => sum_impl
);
dispatch!(
    /// Sum of `(x − mean)²`.
    pub fn sq_dev(x: &[f32], mean: f32) -> f32 => sq_dev_impl
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        let xs: Vec<f32> = (-8700..8830).map(|i| i as f32 * 0.01 + 0.003).collect();
        let mut y = xs.clone();
        exp_inplace(&mut y);
        for (x, y) in xs.iter().zip(&y) {
            let r = (*x as f64).exp();
            worst = worst.max(((*y as f64 - r) / r).abs());
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        let mut z = vec![-1e30f32, f32::NEG_INFINITY, -100.0];
        exp_inplace(&mut z);
        assert_eq!(z, vec![0.0, 0.0, 0.0]);
    }
}
