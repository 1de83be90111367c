//! A CPU random generator bit-compatible with `torch.Generator("cpu")`, and diffusers'
//! `randn_tensor`: the same seed gives the same noise as diffusers, so images can be reproduced
//! across the two implementations.
//!
//! torch draws `randn` of 16 or more f32 elements by filling the tensor with uniforms and applying
//! Box–Muller to blocks of 16 (with the AVX2 `log256_ps`/`sincos256_ps` polynomials on x86, which
//! are reproduced here operation by operation); smaller tensors take f64 Box–Muller pairs one value
//! at a time, caching the second value of each pair in the generator.

use crate::error::Result;
use candle_core::{Device, Shape, Tensor};

/// The 32-bit Mersenne Twister as torch's `at::mt19937`.
#[derive(Debug, Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// `torch.Generator("cpu")` after `manual_seed(seed)`.
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    /// Uniform f32 in [0, 1) from 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// Uniform f64 in [0, 1) from 53 random bits of two draws.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        let v = (hi << 32) | lo;
        (v & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// torch's scalar `normal_distribution<double>` (used for tensors under 16 elements).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, generator=self)` as a flat vector.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for i in (0..n - 15).step_by(16) {
            normal_fill_16(&mut data[i..i + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail);
        }
        data
    }

    /// diffusers' `randn_tensor(shape, generator)`: one `torch.randn` call of the whole shape.
    pub fn randn(&mut self, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let data = self.randn_vec(shape.elem_count());
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}

/// Box–Muller on 8 (u1, u2) pairs: `data[j]`, `data[j + 8]` ← `r cos θ`, `r sin θ`.
fn normal_fill_16(data: &mut [f32]) {
    let two_pi = (2.0f32 as f64 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0f32 * log256(u1)).sqrt();
        let theta = two_pi * u2;
        let (s, c) = sincos256(theta);
        data[j] = radius * c;
        data[j + 8] = radius * s;
    }
}

/// `a * b + c` fused, as the compiled torch kernel evaluates it (GCC contracts the AVX2
/// multiply/add intrinsics; which product of each sum is fused was established against
/// torch's own output, 49,152 values bit for bit).
#[inline]
fn madd(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// `log256_ps` of torch's `avx_mathfun.h` (Cephes logf) for one lane.
// The constants keep avx_mathfun.h's digits so they can be checked against it.
#[allow(clippy::excessive_precision)]
fn log256(x: f32) -> f32 {
    if x <= 0.0 {
        return f32::NAN;
    }
    let x = x.max(f32::from_bits(0x0080_0000));
    let bits = x.to_bits();
    let imm0 = (bits >> 23) as i32 - 0x7f;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = imm0 as f32 + 1.0;
    let mask = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if mask { x } else { 0.0 };
    x -= 1.0;
    if mask {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let p = [
        7.037_683_6e-2f32,
        -1.151_461_0e-1,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_5e-1,
        -2.499_999_4e-1,
        3.333_333_1e-1,
    ];
    let mut y = p[0];
    for &c in &p[1..] {
        y = madd(y, x, c);
    }
    y *= x;
    // `y * z + e * q1`: the compiler fused the first product (found against torch's output).
    y = madd(y, z, e * -2.121_944_4e-4);
    y = madd(z, -0.5, y);
    x += y;
    madd(e, 0.693_359_4, x)
}

/// `sincos256_ps` of torch's `avx_mathfun.h` (Cephes sinf/cosf) for one lane: `(sin, cos)`.
#[allow(clippy::excessive_precision)]
fn sincos256(x: f32) -> (f32, f32) {
    let sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let y = x * 1.273_239_5f32;
    let mut j = y as i32;
    j = (j + 1) & !1;
    let y = j as f32;
    let swap_sign_sin = ((j & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    x = madd(y, -0.785_156_25, x);
    x = madd(y, -2.418_756_5e-4, x);
    x = madd(y, -3.774_895e-8, x);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_sin ^ swap_sign_sin;
    let z = x * x;
    let mut yc = 2.443_315_7e-5f32;
    yc = madd(yc, z, -1.388_731_6e-3);
    yc = madd(yc, z, 4.166_664_6e-2);
    yc *= z;
    // `yc * z - z * 0.5`, with the first product fused.
    yc = madd(yc, z, -(z * 0.5));
    yc += 1.0;
    let mut ys = -1.951_529_6e-4f32;
    ys = madd(ys, z, 8.332_161e-3);
    ys = madd(ys, z, -1.666_665_5e-1);
    ys *= z;
    ys = madd(ys, x, x);
    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}
