//! Model directories in diffusers layout: resolution of paths and hub ids, `model_index.json`,
//! `config.json` files and weights.
//!
//! Mirrors diffusers' `from_pretrained` file lookup (without any network access): a model is a
//! directory with `model_index.json` and one sub-folder per component, each holding a
//! `config.json` and weights.

pub mod cache;
pub mod hub;
mod weights;

pub use weights::{
    check_config_size, first_non_finite, verify_weights, ParamStore, WeightStore, Weights,
    MAX_PARAMETERS,
};

use crate::error::{Error, Result};
use crate::pipelines::auto_pipeline::DecoderKind;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Reads and deserialises a JSON file (a `config.json`, `model_index.json`, ...).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.is_file() {
        return Err(Error::NotFound {
            what: "config file".into(),
            path: path.to_path_buf(),
        });
    }
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > MAX_JSON_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{}: {size} bytes; a config file has at most {MAX_JSON_BYTES}",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(json)?;
    check_config_values(&value).map_err(|m| {
        Error::InvalidArgument(format!(
            "{}: {m}; refused before building anything",
            path.display()
        ))
    })?;
    serde_json::from_value(value).map_err(json)
}

/// The largest config file read (the real ones are a few kB).
pub const MAX_JSON_BYTES: u64 = 16 << 20;

/// Bounds on what a config may declare, checked on its JSON before any model is built from it:
/// numbers of layers, blocks and heads build Rust structures one by one, so a config that
/// declares a billion of them must be refused before, not discovered by running out of memory.
/// No integer exceeds 2^31, no list 65 536 entries, no layer or head count 4096.
pub fn check_config_values(value: &serde_json::Value) -> std::result::Result<(), String> {
    fn walk(key: &str, v: &serde_json::Value) -> std::result::Result<(), String> {
        match v {
            serde_json::Value::Number(n) => {
                let count = key.ends_with("layers")
                    || key.ends_with("layers_per_block")
                    || key.ends_with("attention_heads")
                    || key == "attention_head_dim";
                let limit = if count { 4096.0 } else { 2f64.powi(31) };
                match n.as_f64() {
                    Some(x) if x.abs() > limit => Err(format!(
                        "'{key}' = {n} is beyond any real model (at most {limit})"
                    )),
                    _ => Ok(()),
                }
            }
            serde_json::Value::Array(items) => {
                if items.len() > 65_536 {
                    return Err(format!("'{key}' lists {} entries", items.len()));
                }
                items.iter().try_for_each(|i| walk(key, i))
            }
            serde_json::Value::Object(map) => map.iter().try_for_each(|(k, v)| walk(k, v)),
            _ => Ok(()),
        }
    }
    walk("", value)
}

/// The Hugging Face hub cache directory, as `huggingface_hub` computes it:
/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub`.
pub fn hf_hub_cache() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// Resolves a model argument to a local directory: an existing directory is used as is; a hub id
/// `org/name` is looked up in the Hugging Face cache (`models--org--name/snapshots/<rev>`, where
/// `<rev>` is what `refs/main` names, or the only snapshot). Nothing is downloaded.
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    resolve_model_dir_in(model, &hf_hub_cache())
}

/// Whether `model` has the form of a hub id, `org/name` (letters, digits, `-`, `_`, `.`).
pub fn is_hub_id(model: &str) -> bool {
    let parts: Vec<&str> = model.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        && !model.starts_with('.')
}

/// [`resolve_model_dir`] with an explicit hub cache directory.
pub fn resolve_model_dir_in(model: &str, cache: &Path) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_hub_id(model) {
        return Err(Error::NotFound {
            what: "model directory".into(),
            path: path.to_path_buf(),
        });
    }
    let parts: Vec<&str> = model.split('/').collect();
    let repo_dir = cache.join(format!("models--{}--{}", parts[0], parts[1]));
    let not_cached = || Error::NotCached {
        repo: model.to_string(),
        cache: cache.to_path_buf(),
    };
    let snapshots = repo_dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut revs: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|_| not_cached())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    if revs.len() == 1 {
        return Ok(revs.remove(0));
    }
    Err(not_cached())
}

/// A named model: the decoder and prior hub ids of a published Kandinsky checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// The preset's name (what `--model` accepts).
    pub name: &'static str,
    /// The decoder repository.
    pub decoder: &'static str,
    /// The prior repository that goes with it.
    pub prior: &'static str,
}

/// The published Kandinsky 2.1 / 2.2 checkpoints by short name (resolved through the HF cache).
pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "kandinsky-2-1",
        decoder: "kandinsky-community/kandinsky-2-1",
        prior: "kandinsky-community/kandinsky-2-1-prior",
    },
    Preset {
        name: "kandinsky-2-1-inpaint",
        decoder: "kandinsky-community/kandinsky-2-1-inpaint",
        prior: "kandinsky-community/kandinsky-2-1-prior",
    },
    Preset {
        name: "kandinsky-2-2",
        decoder: "kandinsky-community/kandinsky-2-2-decoder",
        prior: "kandinsky-community/kandinsky-2-2-prior",
    },
    Preset {
        name: "kandinsky-2-2-inpaint",
        decoder: "kandinsky-community/kandinsky-2-2-decoder-inpaint",
        prior: "kandinsky-community/kandinsky-2-2-prior",
    },
    Preset {
        name: "kandinsky-2-2-controlnet-depth",
        decoder: "kandinsky-community/kandinsky-2-2-controlnet-depth",
        prior: "kandinsky-community/kandinsky-2-2-prior",
    },
];

/// The preset of that name, if any.
pub fn preset(name: &str) -> Option<Preset> {
    PRESETS.iter().copied().find(|p| p.name == name)
}

/// Where our small model lives: `models/small` of this repository (found at build time, so
/// binaries work offline from any directory of the checkout).
pub const SMALL_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/small");

/// A component directory of the small model (`prior`, `decoder`, `decoder-inpaint`), checked to
/// exist.
pub fn small_model_dir(part: &str) -> Result<PathBuf> {
    let dir = Path::new(SMALL_MODEL).join(part);
    if !dir.join("model_index.json").is_file() {
        return Err(Error::NotFound {
            what: "the default model (pass a model and a prior, or restore models/small)".into(),
            path: dir.join("model_index.json"),
        });
    }
    Ok(dir)
}

/// A decoder directory and the prior directory that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineDirs {
    /// The decoder model directory.
    pub decoder: PathBuf,
    /// The prior model directory.
    pub prior: PathBuf,
}

/// The small model's prior and its decoder (`decoder-inpaint` when `inpaint`).
pub fn small_model_dirs(inpaint: bool) -> Result<PipelineDirs> {
    let which = if inpaint {
        DecoderKind::Inpaint
    } else {
        DecoderKind::TextToImage
    };
    small_named_dirs("small", which)
}

/// Our small models' names (what `--model` accepts): `small`, the Kandinsky 2.1 model, and
/// `small-2-2`, its 2.2 sibling; both share `models/small/prior`.
pub const SMALL_MODEL_NAMES: [&str; 2] = ["small", "small-2-2"];

/// The component directory of the small model `name`'s decoder `which`: `decoder`,
/// `decoder-inpaint` for `small`; `decoder-2-2`, `decoder-2-2-inpaint`,
/// `decoder-2-2-controlnet-depth` for `small-2-2`. `None` when `name` is not a small model or
/// has no such decoder (2.1 has no ControlNet).
pub fn small_decoder_part(name: &str, which: DecoderKind) -> Option<&'static str> {
    Some(match (name, which) {
        ("small", DecoderKind::TextToImage) => "decoder",
        ("small", DecoderKind::Inpaint) => "decoder-inpaint",
        ("small-2-2", DecoderKind::TextToImage) => "decoder-2-2",
        ("small-2-2", DecoderKind::Inpaint) => "decoder-2-2-inpaint",
        ("small-2-2", DecoderKind::Controlnet) => "decoder-2-2-controlnet-depth",
        _ => return None,
    })
}

/// The small model `name`'s decoder `which` and the shared prior, checked to exist (`name` one of
/// [`SMALL_MODEL_NAMES`]).
pub fn small_named_dirs(name: &str, which: DecoderKind) -> Result<PipelineDirs> {
    let part = small_decoder_part(name, which).ok_or_else(|| {
        Error::InvalidArgument(if SMALL_MODEL_NAMES.contains(&name) {
            format!("the small model '{name}' has no {which:?} decoder (the depth ControlNet is small-2-2's)")
        } else {
            format!("'{name}' is not a small model ({})", SMALL_MODEL_NAMES.join(", "))
        })
    })?;
    let decoder = Path::new(SMALL_MODEL).join(part);
    if !decoder.join("model_index.json").is_file() {
        return Err(Error::NotFound {
            what: format!("the small model '{name}' (its {which:?} decoder)"),
            path: decoder.join("model_index.json"),
        });
    }
    Ok(PipelineDirs {
        decoder,
        prior: small_model_dir("prior")?,
    })
}

/// `given` resolved as a directory or hub id, or the small model's `part` when it is omitted.
pub fn given_or_small(given: Option<&str>, part: &str) -> Result<PathBuf> {
    match given {
        Some(g) => resolve_model_dir(g),
        None => small_model_dir(part),
    }
}

/// The decoder and prior directories of a model given as a directory, a hub id in the cache or a
/// preset name (whose prior is used when `prior` is `None`); `None` when a directory or hub id
/// comes without a prior.
pub fn resolve_pipeline_dirs(model: &str, prior: Option<&str>) -> Result<Option<PipelineDirs>> {
    resolve_pipeline_dirs_with(model, prior, resolve_model_dir)
}

/// [`resolve_pipeline_dirs`] with another way to turn a directory or hub id into a directory
/// (e.g. one that downloads what the cache lacks).
pub fn resolve_pipeline_dirs_with<E>(
    model: &str,
    prior: Option<&str>,
    mut resolve: impl FnMut(&str) -> std::result::Result<PathBuf, E>,
) -> std::result::Result<Option<PipelineDirs>, E> {
    let named = preset(model).filter(|_| !Path::new(model).is_dir());
    let decoder = named.map_or(model, |p| p.decoder);
    let Some(prior) = prior.or(named.map(|p| p.prior)) else {
        return Ok(None);
    };
    Ok(Some(PipelineDirs {
        decoder: resolve(decoder)?,
        prior: resolve(prior)?,
    }))
}

/// Reads one tensor from a safetensors file (e.g. user-supplied `latents`): the file's only
/// tensor, or the one named `latents`.
pub fn read_tensor(path: &Path, device: &candle_core::Device) -> Result<candle_core::Tensor> {
    if !path.is_file() {
        return Err(Error::NotFound {
            what: "tensor file".into(),
            path: path.to_path_buf(),
        });
    }
    let mut tensors =
        candle_core::safetensors::load(path, device).map_err(|e| Error::InvalidWeights {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if tensors.len() == 1 {
        let t = tensors.into_values().next().expect("one tensor");
        return Ok(t.to_dtype(candle_core::DType::F32)?);
    }
    match tensors.remove("latents") {
        Some(t) => Ok(t.to_dtype(candle_core::DType::F32)?),
        None => Err(Error::InvalidArgument(format!(
            "{} holds {} tensors and none is named 'latents'",
            path.display(),
            tensors.len()
        ))),
    }
}

/// `model_index.json`: the pipeline class and, per component, its `[library, class]`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    /// `_class_name`, e.g. `KandinskyV22Pipeline`.
    pub class_name: String,
    /// Component name → (library, class); components set to `null` are omitted.
    pub components: BTreeMap<String, (String, String)>,
}

impl ModelIndex {
    /// Reads `model_index.json` from a model directory.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("model_index.json");
        let raw: BTreeMap<String, serde_json::Value> = read_json(&path)?;
        let class_name = raw
            .get("_class_name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let mut components = BTreeMap::new();
        for (k, v) in &raw {
            if k.starts_with('_') {
                continue;
            }
            if let Some([lib, class]) = v.as_array().map(|a| a.as_slice()) {
                if let (Some(lib), Some(class)) = (lib.as_str(), class.as_str()) {
                    components.insert(k.clone(), (lib.to_string(), class.to_string()));
                }
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }
}

/// Most directory entries [`check_confined`] walks (a model directory has tens).
const MAX_WALKED_ENTRIES: usize = 100_000;

/// Deepest directory nesting [`check_confined`] walks (diffusers' layout is two levels deep).
const MAX_WALKED_DEPTH: usize = 8;

/// Refuses a model directory in which a symlink leads outside it, so that whoever can write into
/// a served model directory cannot make the server read other files (`/etc/…`, `/dev/zero`).
///
/// The directory may itself be reached through a link (it is resolved first). Links that stay
/// inside are followed and what they lead to is checked too. In a Hugging Face cache snapshot
/// (`models--org--name/snapshots/<rev>/…`) the bound is the repository's cache folder, whose
/// `blobs/` the snapshot's links point into. Dangling links are left to the loader (which reports
/// them as missing when it needs them).
pub fn check_confined(dir: &Path) -> Result<()> {
    let start = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    let root = confinement_root(&start);
    let mut stack = vec![(start, 0usize)];
    let mut walked = 0usize;
    while let Some((d, depth)) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            walked += 1;
            if walked > MAX_WALKED_ENTRIES {
                return Err(Error::InvalidArgument(format!(
                    "{} holds more than {MAX_WALKED_ENTRIES} entries: not a model directory",
                    dir.display()
                )));
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
            let is_dir = if kind.is_symlink() {
                let Ok(target) = path.canonicalize() else {
                    continue;
                };
                if !target.starts_with(&root) {
                    return Err(Error::SymlinkOutside {
                        link: path,
                        target,
                        root,
                    });
                }
                target.is_dir()
            } else {
                kind.is_dir()
            };
            if is_dir {
                if depth >= MAX_WALKED_DEPTH {
                    return Err(Error::InvalidArgument(format!(
                        "{} nests deeper than {MAX_WALKED_DEPTH} directories: not a model directory",
                        dir.display()
                    )));
                }
                stack.push((path, depth + 1));
            }
        }
    }
    Ok(())
}

/// The folder links from `dir` (canonical) may lead into: `dir`, or the repository folder of a
/// Hugging Face cache snapshot.
fn confinement_root(dir: &Path) -> PathBuf {
    let parts: Vec<_> = dir.components().collect();
    for i in 1..parts.len().saturating_sub(1) {
        let repo = parts[i - 1].as_os_str().to_string_lossy();
        if parts[i].as_os_str() == "snapshots" && repo.starts_with("models--") {
            return parts[..i].iter().collect();
        }
    }
    dir.to_path_buf()
}

/// The directory of one component (`unet`, `movq`, ...) of a model directory; an error naming the
/// component when it is absent.
pub fn component_dir(model_dir: &Path, component: &str) -> Result<PathBuf> {
    let dir = model_dir.join(component);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(Error::NotFound {
            what: format!("model component '{component}'"),
            path: dir,
        })
    }
}
