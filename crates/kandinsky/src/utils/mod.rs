//! diffusers `utils/`.

pub mod torch_utils;

/// The FNV-1a (64-bit) offset basis: the state [`fnv1a`] starts from.
pub const FNV1A_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Feeds `bytes` into an FNV-1a (64-bit) hash state (a cheap, stable, dependency-free hash for
/// seeding per-parameter generators and keying caches).
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(state, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Keeps freed large buffers in the process heap instead of returning them to the kernel (glibc
/// only; elsewhere a no-op). Every network step allocates and frees activation-sized buffers
/// (tens of MB); with glibc's defaults each is a fresh `mmap` whose pages fault in, zeroed, on
/// first touch. Measured on the MoVQ decoder at 256 px in bf16: 3.96 s → 2.71 s, same peak RSS
/// (docs/performance.md). Call it once, early, from a binary; it changes process-wide state.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
