//! Training checkpoints: parameters (by their diffusers names), optimizer state and step in one
//! safetensors file, written atomically; and the export of the parameters as a diffusers
//! component directory (`config.json` + `diffusion_pytorch_model.safetensors` or `model.safetensors`).

use super::optim::AdamW;
use candle_core::{Device, Tensor};
use kandinsky::error::{Error, Result};
use kandinsky::loading::ParamStore;
use std::collections::HashMap;
use std::path::Path;

const PARAM_PREFIX: &str = "param.";

/// Writes `params` and `opt` to `path` (via a temporary file and a rename).
pub fn save(path: &Path, params: &ParamStore, opt: &AdamW) -> Result<()> {
    let mut all: HashMap<String, Tensor> = opt.state()?;
    for (k, t) in params.tensors() {
        all.insert(format!("{PARAM_PREFIX}{k}"), t);
    }
    write_atomic(path, &all)
}

/// Reads every tensor of a safetensors file.
pub(crate) fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::InvalidWeights {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads a checkpoint: `(parameters by name, everything else)`.
pub fn load(path: &Path) -> Result<(HashMap<String, Tensor>, HashMap<String, Tensor>)> {
    let all = read_all(path)?;
    let (mut params, mut rest) = (HashMap::new(), HashMap::new());
    for (k, t) in all {
        match k.strip_prefix(PARAM_PREFIX) {
            Some(name) => {
                params.insert(name.to_string(), t);
            }
            None => {
                rest.insert(k, t);
            }
        }
    }
    Ok((params, rest))
}

/// Exports parameters as a diffusers component: `config` as `config.json` and the weights as
/// `weights_file`.
pub fn export_component(
    dir: &Path,
    config: &serde_json::Value,
    params: &HashMap<String, Tensor>,
    weights_file: &str,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = dir.join("config.json");
    let text = serde_json::to_string_pretty(config).map_err(|source| Error::Json {
        path: cfg.clone(),
        source,
    })?;
    write_file_atomic(&cfg, (text + "\n").as_bytes())?;
    write_atomic(&dir.join(weights_file), params)
}

/// Writes `tensors` as safetensors to `path` so that a reader (or a run resumed after a kill)
/// finds either the previous file or the complete new one: a temporary file, flushed to disk,
/// then renamed over it.
pub(crate) fn write_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::InvalidWeights {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    commit(&tmp, path)
}

/// [`write_atomic`] for plain bytes.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    commit(&tmp, path)
}

/// Flushes `tmp`, renames it to `path` and flushes the directory entry, so that the rename cannot
/// reach the disk before the data (a power cut would otherwise leave a truncated file).
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Not every file system can sync a directory; the rename itself is done either way.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}
