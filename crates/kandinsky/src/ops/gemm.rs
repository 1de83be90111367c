//! Thin wrapper over the `gemm` crate (the GEMM candle itself uses) for strided f32 matrices, so
//! that kernels can multiply views in place and write straight into their output layout.

/// A row-major-or-strided matrix view: `ptr[i·rs + j·cs]` is element `(i, j)`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided matrix view.
#[derive(Clone, Copy)]
pub(crate) struct ViewMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

impl ViewMut {
    /// The view starting `elems` elements further on.
    pub fn offset(self, elems: usize) -> Self {
        Self {
            ptr: self.ptr.wrapping_add(elems),
            ..self
        }
    }
}

// SAFETY: views are plain addresses handed to disjoint tasks by the kernels that create them.
unsafe impl Send for ViewMut {}
unsafe impl Sync for ViewMut {}
unsafe impl Send for View {}
unsafe impl Sync for View {}

/// `dst (m×n) = [dst +] scale · a (m×k) · b (k×n)`, on `threads` threads (1: the calling one).
///
/// # Safety
/// Every view must be valid for its extent, and `dst` must not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: ViewMut,
    accumulate: bool,
    a: View,
    b: View,
    scale: f32,
    threads: usize,
) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m, n, k, dst.ptr, dst.cs, dst.rs, accumulate, a.ptr, a.cs, a.rs, b.ptr, b.cs, b.rs,
            1.0, scale, false, false, false, par,
        )
    }
}

/// Threads the kernels may use: rayon's pool (`RAYON_NUM_THREADS`, or every core).
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}
