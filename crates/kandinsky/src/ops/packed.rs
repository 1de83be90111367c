//! GEMM on operands packed into panels, in two precisions: **bf16** with f32 accumulation
//! (AVX-512 BF16 `VDPBF16PS`) and **f32** (AVX-512 FMA), each with a portable loop over the same
//! layout for CPUs without those features.
//!
//! Operands are packed into panels of `u32` *units*: a bf16 pair (two consecutive `k`, the unit
//! `VDPBF16PS` multiplies and adds) or one f32. A **lanes** operand in panels of [`LANES`] rows, one vector
//! load per pair of `k`, and a **broadcast** operand in panels of [`COLS`] rows, one broadcast per
//! row and pair. The product `C[l, j] = Σ_k L[l, k]·B[j, k]` is stored with lanes contiguous, so
//! a Linear layer packs its weight as lanes (output features are contiguous in `y`) and a
//! convolution packs its weight as the broadcast operand (pixels are contiguous in NCHW).
//! Weights are packed once at load; activations are rounded to bf16 while packed per call.

use super::simd::has_avx512;
use rayon::prelude::*;

/// Rows of a lanes panel: two 16-lane vectors.
pub const LANES: usize = 32;
/// Rows of a broadcast panel.
pub const COLS: usize = 12;
/// Units of `k` per cache block: a lanes block of 16 KiB stays in L1.
const KC: usize = 128;

/// The element type of a packed operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// bf16 pairs (two `k` per unit), f32 accumulation.
    Bf16,
    /// f32 (one `k` per unit).
    F32,
}

impl Kind {
    /// Values of `k` per `u32` unit.
    pub fn per_unit(self) -> usize {
        match self {
            Self::Bf16 => 2,
            Self::F32 => 1,
        }
    }
}

/// Whether the CPU runs `VDPBF16PS` (and the portable path is not forced).
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32` → bf16 bits, rounding to nearest even.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u32 {
    pair_bits(x, 0.0)
}

/// bf16 bits → `f32`.
#[inline(always)]
pub fn bf16_to_f32(h: u32) -> f32 {
    f32::from_bits(h << 16)
}

/// Two f32 → one `u32` of bf16 bits, `lo` in the low half, each rounded to nearest even (no
/// NaN special case: written for the vectoriser).
#[inline(always)]
fn pair_bits(lo: f32, hi: f32) -> u32 {
    let (a, b) = (lo.to_bits(), hi.to_bits());
    let ra = a.wrapping_add(0x7fff + ((a >> 16) & 1)) >> 16;
    let rb = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    ra | rb
}

/// Fills one f32 panel: `nr` rows from `r0`, every `k`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_panel_f32_impl(
    src: &[f32],
    dst: &mut [u32],
    r0: usize,
    nr: usize,
    rs: usize,
    ks: usize,
    panel: usize,
) {
    for (kk, d) in dst.chunks_exact_mut(panel).enumerate() {
        let d = &mut d[..nr];
        if rs == 1 {
            for (v, &a) in d.iter_mut().zip(&src[r0 + kk * ks..][..nr]) {
                *v = a.to_bits();
            }
        } else {
            for (l, v) in d.iter_mut().enumerate() {
                *v = src[(r0 + l) * rs + kk * ks].to_bits();
            }
        }
    }
}

/// Fills one panel: `nr` rows from `r0`, every pair of `k`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_panel_impl(
    src: &[f32],
    dst: &mut [u32],
    r0: usize,
    nr: usize,
    k: usize,
    rs: usize,
    ks: usize,
    panel: usize,
) {
    for (pi, d) in dst.chunks_exact_mut(panel).enumerate() {
        let k0 = 2 * pi;
        let d = &mut d[..nr];
        if k0 + 1 < k && rs == 1 {
            // Rows contiguous (a column matrix): two input rows make the panel's pairs.
            let lo = &src[r0 + k0 * ks..][..nr];
            let hi = &src[r0 + (k0 + 1) * ks..][..nr];
            for ((v, &a), &b) in d.iter_mut().zip(lo).zip(hi) {
                *v = pair_bits(a, b);
            }
        } else if k0 + 1 < k && ks == 1 {
            for (l, v) in d.iter_mut().enumerate() {
                let base = (r0 + l) * rs + k0;
                *v = pair_bits(src[base], src[base + 1]);
            }
        } else {
            for (l, v) in d.iter_mut().enumerate() {
                let base = (r0 + l) * rs + k0 * ks;
                let hi = if k0 + 1 < k { src[base + ks] } else { 0.0 };
                *v = pair_bits(src[base], hi);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_panel_any(
    kind: Kind,
    src: &[f32],
    dst: &mut [u32],
    r0: usize,
    nr: usize,
    k: usize,
    rs: usize,
    ks: usize,
    panel: usize,
) {
    match kind {
        Kind::Bf16 => pack_panel_impl(src, dst, r0, nr, k, rs, ks, panel),
        Kind::F32 => pack_panel_f32_impl(src, dst, r0, nr, rs, ks, panel),
    }
}

#[allow(clippy::too_many_arguments)]
fn pack_panel(
    kind: Kind,
    src: &[f32],
    dst: &mut [u32],
    r0: usize,
    nr: usize,
    k: usize,
    rs: usize,
    ks: usize,
    panel: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
        #[allow(clippy::too_many_arguments)]
        fn fast(
            kind: Kind,
            src: &[f32],
            dst: &mut [u32],
            r0: usize,
            nr: usize,
            k: usize,
            rs: usize,
            ks: usize,
            panel: usize,
        ) {
            pack_panel_any(kind, src, dst, r0, nr, k, rs, ks, panel)
        }
        if has_avx512() {
            // SAFETY: the CPU features were detected at run time.
            return unsafe { fast(kind, src, dst, r0, nr, k, rs, ks, panel) };
        }
    }
    pack_panel_any(kind, src, dst, r0, nr, k, rs, ks, panel)
}

/// A matrix of `rows × k` packed in panels of `panel` rows (zero-padded to whole panels and, for
/// bf16, to an even `k`).
#[derive(Debug, Clone)]
pub struct Packed {
    /// Logical rows.
    pub rows: usize,
    /// Logical depth.
    pub k: usize,
    /// Rows per panel ([`LANES`] or [`COLS`]).
    pub panel: usize,
    /// Element type.
    pub kind: Kind,
    data: Vec<u32>,
}

impl Packed {
    /// Units of `k` per row.
    pub fn kp(&self) -> usize {
        self.k.div_ceil(self.kind.per_unit())
    }

    /// Packs element `(r, kk)` = `src[r·rs + kk·ks]` for `r < rows`, `kk < k`, as bf16 pairs.
    pub fn pack(src: &[f32], rows: usize, k: usize, rs: usize, ks: usize, panel: usize) -> Self {
        Self::pack_as(Kind::Bf16, src, rows, k, rs, ks, panel)
    }

    /// [`pack`](Self::pack) in the given element type.
    pub fn pack_as(
        kind: Kind,
        src: &[f32],
        rows: usize,
        k: usize,
        rs: usize,
        ks: usize,
        panel: usize,
    ) -> Self {
        let kp = k.div_ceil(kind.per_unit());
        let panels = rows.div_ceil(panel);
        let mut data = vec![0u32; panels * kp * panel];
        data.par_chunks_mut(kp * panel)
            .enumerate()
            .for_each(|(p, dst)| {
                let r0 = p * panel;
                let nr = panel.min(rows - r0);
                pack_panel(kind, src, dst, r0, nr, k, rs, ks, panel);
            });
        Self {
            rows,
            k,
            panel,
            kind,
            data,
        }
    }

    /// A zero matrix of this shape, to be filled unit by unit ([`units_mut`](Self::units_mut)).
    pub fn zeroed(kind: Kind, rows: usize, k: usize, panel: usize) -> Self {
        let kp = k.div_ceil(kind.per_unit());
        Self {
            rows,
            k,
            panel,
            kind,
            data: vec![0u32; rows.div_ceil(panel) * kp * panel],
        }
    }

    /// The packed units: panel `p`, unit `u` is `[(p·kp + u)·panel ..][..panel]`.
    pub fn units_mut(&mut self) -> &mut [u32] {
        &mut self.data
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The f32 values back (bf16-rounded for bf16), row-major `rows × k`.
    pub fn unpack(&self) -> Vec<f32> {
        let kp = self.kp();
        let per = self.kind.per_unit();
        let mut out = vec![0f32; self.rows * self.k];
        for r in 0..self.rows {
            let (p, l) = (r / self.panel, r % self.panel);
            for kk in 0..self.k {
                let v = self.data[(p * kp + kk / per) * self.panel + l];
                out[r * self.k + kk] = match self.kind {
                    Kind::F32 => f32::from_bits(v),
                    Kind::Bf16 if kk % 2 == 0 => bf16_to_f32(v & 0xffff),
                    Kind::Bf16 => bf16_to_f32(v >> 16),
                };
            }
        }
        out
    }

    fn panel_ptr(&self, p: usize, pair: usize) -> *const u32 {
        self.data[(p * self.kp() + pair) * self.panel..].as_ptr()
    }
}

/// Shared write access to the units of a lanes operand being filled by several tasks.
#[derive(Clone, Copy)]
pub(crate) struct UnitsMut {
    ptr: *mut u32,
    len: usize,
}
// SAFETY: tasks write disjoint units.
unsafe impl Send for UnitsMut {}
unsafe impl Sync for UnitsMut {}

impl UnitsMut {
    pub(crate) fn new(units: &mut [u32]) -> Self {
        Self {
            ptr: units.as_mut_ptr(),
            len: units.len(),
        }
    }

    /// Unit `u` of lanes panel `p` (`kp` units per panel).
    ///
    /// # Safety
    /// No other task may access the same unit at the same time, and the units must outlive the
    /// returned slice.
    pub(crate) unsafe fn unit<'a>(self, p: usize, u: usize, kp: usize) -> &'a mut [u32] {
        let off = (p * kp + u) * LANES;
        assert!(off + LANES <= self.len);
        // SAFETY: in bounds (checked); exclusivity and lifetime are the caller's.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), LANES) }
    }
}

/// One unit of `nl` lanes from rows of `n` values: `rows[l0..]` (and, for bf16, the pair's second
/// row at `rows[n + l0..]`).
pub(crate) fn pack_units(
    kind: Kind,
    rows: &[f32],
    n: usize,
    l0: usize,
    nl: usize,
    dst: &mut [u32],
) {
    match kind {
        Kind::Bf16 => {
            let (lo, hi) = (&rows[l0..l0 + nl], &rows[n + l0..n + l0 + nl]);
            for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair_bits(a, b);
            }
        }
        Kind::F32 => {
            for (d, &a) in dst.iter_mut().zip(&rows[l0..l0 + nl]) {
                *d = a.to_bits();
            }
        }
    }
}

/// Output `C[l, j]` at `ptr + l + j·js`.
#[derive(Clone, Copy)]
pub struct Out {
    /// First element.
    pub ptr: *mut f32,
    /// Stride between columns (broadcast rows).
    pub js: usize,
}
impl Out {
    fn at(self, offset: usize) -> *mut f32 {
        self.ptr.wrapping_add(offset)
    }
}

// SAFETY: tasks write disjoint tiles.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `C (lanes.rows × bcast.rows) [+]= L · Bᵀ` with `threads` threads; when `accumulate` is false C is
/// overwritten.
///
/// # Safety
/// `out` must be valid for every `(l, j)` with `l < lanes.rows`, `j < bcast.rows`.
pub unsafe fn gemm(lanes: &Packed, bcast: &Packed, out: Out, accumulate: bool, threads: usize) {
    assert_eq!(lanes.panel, LANES);
    assert_eq!(bcast.panel, COLS);
    assert_eq!(lanes.k, bcast.k);
    assert_eq!(lanes.kind, bcast.kind);
    let kind = lanes.kind;
    let kp = lanes.kp();
    let lp = lanes.rows.div_ceil(LANES);
    let bp = bcast.rows.div_ceil(COLS);
    // Enough tasks to balance the threads: split lane panels first, then broadcast panels.
    let want = 4 * threads.max(1);
    let lchunk = lp.div_ceil(want).max(1);
    let lchunks = lp.div_ceil(lchunk);
    let bchunks = (want / lchunks).clamp(1, bp);
    let bchunk = bp.div_ceil(bchunks);
    let bchunks = bp.div_ceil(bchunk);
    let fast = match kind {
        Kind::Bf16 => has_avx512_bf16(),
        Kind::F32 => has_avx512(),
    };
    let task = |t: usize| {
        let (li, bi) = (t / bchunks, t % bchunks);
        let lr = li * lchunk..((li + 1) * lchunk).min(lp);
        let br = bi * bchunk..((bi + 1) * bchunk).min(bp);
        let mut k0 = 0;
        while k0 < kp {
            let kn = KC.min(kp - k0);
            let acc = accumulate || k0 > 0;
            for l in lr.clone() {
                let nl = LANES.min(lanes.rows - l * LANES);
                for b in br.clone() {
                    let nb = COLS.min(bcast.rows - b * COLS);
                    let c = out.at(l * LANES + b * COLS * out.js);
                    let (a, bb) = (lanes.panel_ptr(l, k0), bcast.panel_ptr(b, k0));
                    // SAFETY: the panels hold `kn` pairs from `k0`; the tile is inside `out`.
                    unsafe {
                        #[cfg(target_arch = "x86_64")]
                        if fast {
                            match kind {
                                Kind::Bf16 => kernel_avx512(kn, a, bb, c, out.js, acc, nl, nb),
                                Kind::F32 => kernel_f32_avx512(kn, a, bb, c, out.js, acc, nl, nb),
                            }
                            continue;
                        }
                        match kind {
                            Kind::Bf16 => kernel_portable(kn, a, bb, c, out.js, acc, nl, nb),
                            Kind::F32 => kernel_f32_portable(kn, a, bb, c, out.js, acc, nl, nb),
                        }
                    }
                }
            }
            k0 += kn;
        }
    };
    if threads > 1 {
        (0..lchunks * bchunks).into_par_iter().for_each(task);
    } else {
        (0..lchunks * bchunks).for_each(task);
    }
}

/// One `LANES × COLS` tile over `kn` pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_avx512(
    kn: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; COLS];
    for p in 0..kn {
        // SAFETY: pair `p` of both panels is in bounds (caller).
        unsafe {
            let l0: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.add(p * LANES).cast()));
            let l1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(a.add(p * LANES + 16).cast()));
            let bp = b.add(p * COLS);
            for (j, accj) in acc.iter_mut().enumerate() {
                let bj: __m512bh = std::mem::transmute(_mm512_set1_epi32(*bp.add(j) as i32));
                accj[0] = _mm512_dpbf16_ps(accj[0], l0, bj);
                accj[1] = _mm512_dpbf16_ps(accj[1], l1, bj);
            }
        }
    }
    // SAFETY: the tile is inside the output (caller).
    unsafe { store_tile_avx512(&acc, c, js, accumulate, nl, nb) }
}

/// Masks of the valid lanes of the two vectors of a tile.
#[cfg(target_arch = "x86_64")]
fn lane_masks(nl: usize) -> (u16, u16) {
    let m0 = if nl >= 16 { 0xffff } else { (1u16 << nl) - 1 };
    let m1 = if nl >= 32 {
        0xffff
    } else if nl > 16 {
        (1u16 << (nl - 16)) - 1
    } else {
        0
    };
    (m0, m1)
}

/// Writes (or adds) the valid `nl × nb` corner of an accumulated tile, columns `js` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn store_tile_avx512(
    acc: &[[std::arch::x86_64::__m512; 2]; COLS],
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    use std::arch::x86_64::*;
    let (m0, m1) = lane_masks(nl);
    for (j, accj) in acc.iter().enumerate().take(nb) {
        // SAFETY: masked to the valid lanes of column j (caller: the tile is in bounds).
        unsafe {
            let cj = c.add(j * js);
            let (mut v0, mut v1) = (accj[0], accj[1]);
            if accumulate {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cj));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cj.add(16)));
            }
            _mm512_mask_storeu_ps(cj, m0, v0);
            _mm512_mask_storeu_ps(cj.add(16), m1, v1);
        }
    }
}

/// [`store_tile_avx512`] for the portable kernels' scalar tiles.
unsafe fn store_tile(
    acc: &[[f32; LANES]; COLS],
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    for (j, accj) in acc.iter().enumerate().take(nb) {
        for (l, v) in accj.iter().enumerate().take(nl) {
            // SAFETY: (l, j) is a valid output element (caller).
            unsafe {
                let p = c.add(l + j * js);
                *p = if accumulate { *p + v } else { *v };
            }
        }
    }
}

/// One f32 `LANES × COLS` tile over `kn` values of `k` (FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_f32_avx512(
    kn: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; COLS];
    let (a, b) = (a.cast::<f32>(), b.cast::<f32>());
    for p in 0..kn {
        // SAFETY: unit `p` of both panels is in bounds (caller).
        unsafe {
            let l0 = _mm512_loadu_ps(a.add(p * LANES));
            let l1 = _mm512_loadu_ps(a.add(p * LANES + 16));
            let bp = b.add(p * COLS);
            for (j, accj) in acc.iter_mut().enumerate() {
                let bj = _mm512_set1_ps(*bp.add(j));
                accj[0] = _mm512_fmadd_ps(l0, bj, accj[0]);
                accj[1] = _mm512_fmadd_ps(l1, bj, accj[1]);
            }
        }
    }
    // SAFETY: the tile is inside the output (caller).
    unsafe { store_tile_avx512(&acc, c, js, accumulate, nl, nb) }
}

/// The f32 tile without AVX-512.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_f32_portable(
    kn: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    let mut acc = [[0f32; LANES]; COLS];
    for p in 0..kn {
        // SAFETY: unit `p` of both panels is in bounds (caller).
        let (ap, bp) = unsafe {
            (
                std::slice::from_raw_parts(a.add(p * LANES).cast::<f32>(), LANES),
                std::slice::from_raw_parts(b.add(p * COLS).cast::<f32>(), COLS),
            )
        };
        for (accj, &bv) in acc.iter_mut().zip(bp) {
            for (x, &av) in accj.iter_mut().zip(ap) {
                *x += av * bv;
            }
        }
    }
    // SAFETY: the tile is inside the output (caller).
    unsafe { store_tile(&acc, c, js, accumulate, nl, nb) }
}

/// The same tile without AVX-512 BF16: bf16 products summed in f32 per pair, as the instruction
/// does.
#[allow(clippy::too_many_arguments)]
unsafe fn kernel_portable(
    kn: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    js: usize,
    accumulate: bool,
    nl: usize,
    nb: usize,
) {
    let mut acc = [[0f32; LANES]; COLS];
    for p in 0..kn {
        // SAFETY: pair `p` of both panels is in bounds (caller).
        let (ap, bp) = unsafe {
            (
                std::slice::from_raw_parts(a.add(p * LANES), LANES),
                std::slice::from_raw_parts(b.add(p * COLS), COLS),
            )
        };
        for (accj, &bv) in acc.iter_mut().zip(bp) {
            let (b0, b1) = (bf16_to_f32(bv & 0xffff), bf16_to_f32(bv >> 16));
            for (x, &av) in accj.iter_mut().zip(ap) {
                *x += bf16_to_f32(av & 0xffff) * b0 + bf16_to_f32(av >> 16) * b1;
            }
        }
    }
    // SAFETY: the tile is inside the output (caller).
    unsafe { store_tile(&acc, c, js, accumulate, nl, nb) }
}
