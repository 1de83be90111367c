//! Weight files of one component and a `VarBuilder`-like view over them.
//!
//! Tensor names are diffusers' state-dict names; no renaming table exists. Every tensor is checked
//! against the shape the configuration implies before it is read, and converted to the requested
//! dtype on load (fp16/bf16 checkpoints are upcast).

use crate::error::{Error, Result};
use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

enum WeightFile {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

/// The weight files of one component directory, indexed by tensor name.
pub struct WeightStore {
    files: Vec<(PathBuf, WeightFile)>,
    /// Tensor name → (file index, stored shape).
    index: HashMap<String, (usize, Vec<usize>)>,
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// `diffusion_pytorch_model.fp16.safetensors` → Some("fp16"); no variant → None.
fn variant_of(name: &str, ext: &str) -> Option<String> {
    let stem = name.strip_suffix(ext)?;
    let stem = stem.strip_suffix(".index.json").unwrap_or(stem);
    // Shards look like `model-00001-of-00002.safetensors`; their variant sits before the shard
    // number in diffusers' naming (`model.fp16-00001-of-00002.safetensors`).
    let base = stem.split('-').next().unwrap_or(stem);
    base.split_once('.').map(|(_, v)| v.to_string())
}

impl WeightStore {
    /// Finds and opens the weights in a component directory. Priority, as diffusers: sharded
    /// safetensors (`*.safetensors.index.json`), then `*.safetensors`, then sharded or single
    /// PyTorch pickles (`*.bin`). Files without a variant win over `*.fp16.*` variants.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                what: "component directory".into(),
                path: dir.to_path_buf(),
            });
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        names.sort();
        for (index_ext, file_ext) in [
            (".safetensors.index.json", ".safetensors"),
            (".bin.index.json", ".bin"),
        ] {
            if let Some(index) = pick_variant(&names, index_ext).into_iter().next() {
                let files = shards_of(&dir.join(index))?;
                return Self::open(&files);
            }
            let singles = pick_variant(&names, file_ext);
            if !singles.is_empty() {
                let files: Vec<PathBuf> = singles.iter().map(|n| dir.join(n)).collect();
                return Self::open(&files);
            }
        }
        Err(Error::NoWeights {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the given weight files (`.safetensors` or PyTorch `.bin`/`.pt`/`.pth`).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            if !path.is_file() {
                return Err(Error::NotFound {
                    what: "weight file".into(),
                    path: path.clone(),
                });
            }
            let invalid = |e: candle_core::Error| Error::InvalidWeights {
                path: path.clone(),
                message: e.to_string(),
            };
            let file_idx = files.len();
            let file = if file_name(path).ends_with(".safetensors") {
                // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on
                // nobody truncating it while the store is alive.
                let st = unsafe { MmapedSafetensors::new(path) }.map_err(invalid)?;
                for (name, view) in st.tensors() {
                    index.insert(name, (file_idx, view.shape().to_vec()));
                }
                WeightFile::Safetensors(st)
            } else {
                let pth = PthTensors::new(path, None).map_err(invalid)?;
                if pth.tensor_infos().is_empty() {
                    return Err(Error::InvalidWeights {
                        path: path.clone(),
                        message: "no tensors found in the pickle".into(),
                    });
                }
                for (name, info) in pth.tensor_infos() {
                    index.insert(
                        name.clone(),
                        (file_idx, info.layout.shape().dims().to_vec()),
                    );
                }
                WeightFile::Pth(pth)
            };
            files.push((path.clone(), file));
        }
        Ok(Self { files, index })
    }

    /// Names and stored shapes of every tensor, sorted by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.index
            .iter()
            .map(|(k, (_, s))| (k.clone(), s.clone()))
            .collect()
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Loads one tensor, checking its shape and converting it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (file_idx, found) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self.files_list(),
        })?;
        let (path, file) = &self.files[*file_idx];
        if found.as_slice() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: found.clone(),
                file: path.clone(),
            });
        }
        let invalid = |e: candle_core::Error| Error::InvalidWeights {
            path: path.clone(),
            message: format!("tensor '{name}': {e}"),
        };
        let t = match file {
            WeightFile::Safetensors(st) => st.load(name, device).map_err(invalid)?,
            WeightFile::Pth(pth) => pth
                .get(name)
                .map_err(invalid)?
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: path.display().to_string(),
                })?
                .to_device(device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// Among files ending in `ext`, those without a variant, else those of the first variant.
fn pick_variant(names: &[String], ext: &str) -> Vec<String> {
    let matching: Vec<&String> = names.iter().filter(|n| n.ends_with(ext)).collect();
    let plain: Vec<String> = matching
        .iter()
        .filter(|n| variant_of(n, ext).is_none())
        .map(|n| n.to_string())
        .collect();
    if !plain.is_empty() {
        return plain;
    }
    let Some(first) = matching.first().and_then(|n| variant_of(n, ext)) else {
        return Vec::new();
    };
    matching
        .into_iter()
        .filter(|n| variant_of(n, ext).as_deref() == Some(first.as_str()))
        .cloned()
        .collect()
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn shards_of(index_path: &Path) -> Result<Vec<PathBuf>> {
    let index: ShardIndex = super::read_json(index_path)?;
    let dir = index_path.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<&String> = index.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    Ok(shards.into_iter().map(|s| dir.join(s)).collect())
}

/// (name, shape) of every tensor requested in meta mode.
type Recording = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

#[derive(Clone)]
enum Source {
    Store(Arc<WeightStore>),
    /// Records requested names and shapes; returns zero-stride views so nothing is allocated.
    Meta(Recording),
    /// Random values, for benchmarks of real-size models without their weights.
    Random,
}

/// A view of a weight source under a name prefix, handed to module constructors (like candle's
/// `VarBuilder`, but with typed errors, shape checks that name the file, and a meta mode).
#[derive(Clone)]
pub struct Weights {
    source: Source,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Weights read from a store, converted to `dtype` on `device`.
    pub fn from_store(store: WeightStore, dtype: DType, device: &Device) -> Self {
        Self {
            source: Source::Store(Arc::new(store)),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// Opens the weights of a component directory (see [`WeightStore::from_dir`]).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_store(WeightStore::from_dir(dir)?, dtype, device))
    }

    /// A source that allocates nothing and records every requested tensor name and shape: builds
    /// a real-size model's structure to compare with diffusers' state dict.
    pub fn meta(dtype: DType) -> Self {
        Self {
            source: Source::Meta(Arc::new(Mutex::new(Vec::new()))),
            prefix: String::new(),
            dtype,
            device: Device::Cpu,
        }
    }

    /// Random weights (N(0, 1/fan_in) matrices, unit norm scales, zero biases).
    pub fn random(dtype: DType, device: &Device) -> Self {
        Self {
            source: Source::Random,
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// In meta mode, the (name, shape) of every tensor requested so far, in request order.
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        match &self.source {
            Source::Meta(m) => m.lock().map(|v| v.clone()).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The same source under `prefix.name`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            prefix,
            ..self.clone()
        }
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// The tensor `prefix.name`, which must have `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let full = self.full_name(name);
        match &self.source {
            Source::Store(store) => store.load(&full, shape.dims(), self.dtype, &self.device),
            Source::Meta(rec) => {
                if let Ok(mut v) = rec.lock() {
                    v.push((full, shape.dims().to_vec()));
                }
                Ok(Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape)?)
            }
            Source::Random => {
                let dims = shape.dims();
                let t = if dims.len() >= 2 {
                    let fan_in: usize = dims[1..].iter().product();
                    let std = 1.0 / (fan_in as f64).sqrt();
                    Tensor::randn(0f32, std as f32, shape, &self.device)?
                } else if name.ends_with("bias") {
                    Tensor::zeros(shape, DType::F32, &self.device)?
                } else {
                    Tensor::ones(shape, DType::F32, &self.device)?
                };
                Ok(t.to_dtype(self.dtype)?)
            }
        }
    }

    /// True when this view builds real-size structure only (see [`Weights::meta`]).
    pub fn is_meta(&self) -> bool {
        matches!(self.source, Source::Meta(_))
    }
}

#[cfg(test)]
mod tests {
    use super::variant_of;

    #[test]
    fn variants_are_recognised() {
        let v = |n| variant_of(n, ".safetensors");
        assert_eq!(v("diffusion_pytorch_model.safetensors"), None);
        assert_eq!(
            v("diffusion_pytorch_model.fp16.safetensors").as_deref(),
            Some("fp16")
        );
        assert_eq!(v("model-00001-of-00002.safetensors"), None);
        assert_eq!(
            v("model.fp16-00001-of-00002.safetensors").as_deref(),
            Some("fp16")
        );
    }
}
