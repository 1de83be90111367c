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
    std::fs::write(&cfg, text + "\n").map_err(|e| Error::io(&cfg, e))?;
    write_atomic(&dir.join(weights_file), params)
}

pub(crate) fn write_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| Error::InvalidWeights {
        path: tmp.clone(),
        message: e.to_string(),
    })?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
