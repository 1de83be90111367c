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
