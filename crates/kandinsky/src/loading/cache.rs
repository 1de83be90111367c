//! The on-disk cache of values computed once per model, such as the zero-image embedding (the
//! only use of the 1.8 B-parameter bigG vision tower in a 2.2 text-to-image run).
//!
//! Entries live in `$XDG_CACHE_HOME/kandinsky` (else `~/.cache/kandinsky`), keyed by a hash of
//! the weights' content, so that a changed file is a different key. Hashing gigabytes on every
//! run would cost seconds, so each file's content hash is itself remembered under its path, size
//! and modification time. A cache that cannot be read or written is never an error: the value is
//! computed instead.

use crate::error::{Error, Result};
use crate::utils::{fnv1a, FNV1A_OFFSET};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Bumped when what is cached changes meaning (a different computation of the same key).
const VERSION: u32 = 1;

/// The cache directory: `$XDG_CACHE_HOME/kandinsky`, else `$HOME/.cache/kandinsky`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("kandinsky"))
}

/// FNV-1a over 8-byte words (the tail byte-wise): fast enough for multi-GB weight files, stable
/// across runs and platforms.
fn hash_words(mut h: u64, bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ v).wrapping_mul(0x0100_0000_01b3);
    }
    fnv1a(h, words.remainder())
}

/// The content hash of one file, remembered under (path, size, mtime).
fn file_hash(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let id = format!("{}\n{}\n{mtime}", canonical.display(), meta.len());
    let memo = cache_dir().map(|d| {
        d.join("hashes")
            .join(format!("{:016x}", fnv1a(FNV1A_OFFSET, id.as_bytes())))
    });
    if let Some(m) = &memo {
        if let Ok(s) = std::fs::read_to_string(m) {
            if let Some(h) = s
                .strip_prefix(&format!("{id}\n"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            {
                return Ok(h);
            }
        }
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut h = FNV1A_OFFSET;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        // Reads may end off a word boundary only at the end of the file (the buffer size is a
        // multiple of 8 and `read` of a regular file fills it unless at EOF).
        h = hash_words(h, &buf[..n]);
    }
    if let Some(m) = &memo {
        let _ = write_atomic(m, format!("{id}\n{h:016x}\n").as_bytes());
    }
    Ok(h)
}

/// A key for a value derived from these files (their content, in order) and `what` (the
/// computation and its settings).
pub fn content_key(files: &[PathBuf], what: &str) -> Result<String> {
    let mut h = fnv1a(FNV1A_OFFSET, format!("v{VERSION}\n{what}").as_bytes());
    for f in files {
        h = fnv1a(h, &file_hash(f)?.to_le_bytes());
    }
    Ok(format!("{what}-{h:016x}"))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so that readers never see a
/// half-written entry.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn entry(key: &str) -> Option<PathBuf> {
    Some(cache_dir()?.join(format!("{key}.safetensors")))
}

/// The cached tensor under `key`, if any.
pub fn load_tensor(key: &str, device: &Device) -> Option<Tensor> {
    let path = entry(key)?;
    let mut t = candle_core::safetensors::load(&path, device).ok()?;
    t.remove("value")
}

/// Caches `value` under `key`; returns where (None when there is no cache directory).
pub fn store_tensor(key: &str, value: &Tensor) -> Result<Option<PathBuf>> {
    let Some(path) = entry(key) else {
        return Ok(None);
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("value".to_string(), value.clone())]),
        &tmp,
    )?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok(Some(path))
}
