//! Weight files of one component and a `VarBuilder`-like view over them.
//!
//! Tensor names are diffusers' state-dict names; no renaming table exists. Every tensor is checked
//! against the shape the configuration implies before it is read, and converted to the requested
//! dtype on load (fp16/bf16 checkpoints are upcast).

use crate::error::{Error, Result};
use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

enum WeightFile {
    Safetensors(StreamedSafetensors),
    Pth(PthTensors),
}

/// A safetensors file read tensor by tensor with positioned reads: no mapping, so the only
/// resident copy of a tensor is the one being converted (a mapped file's pages would count in
/// the process's RSS next to the converted model until the mapping is dropped).
struct StreamedSafetensors {
    file: std::fs::File,
    /// Name → (dtype, shape, absolute byte range).
    tensors: HashMap<String, (DType, Vec<usize>, std::ops::Range<u64>)>,
}

impl StreamedSafetensors {
    fn open(path: &Path) -> std::result::Result<Self, String> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| "file too small for a safetensors header".to_string())?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > size {
            return Err(format!("invalid header length {n} for a {size}-byte file"));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&header).map_err(|e| format!("invalid header: {e}"))?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let bad = || format!("invalid header entry for '{name}'");
            let dtype = match info["dtype"].as_str().ok_or_else(bad)? {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                "F64" => DType::F64,
                "I64" => DType::I64,
                "U32" => DType::U32,
                "U8" => DType::U8,
                other => return Err(format!("tensor '{name}': unsupported dtype {other}")),
            };
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                .collect::<std::result::Result<_, _>>()?;
            let offs = info["data_offsets"].as_array().ok_or_else(bad)?;
            let (a, b) = match offs.as_slice() {
                [a, b] => (a.as_u64().ok_or_else(bad)?, b.as_u64().ok_or_else(bad)?),
                _ => return Err(bad()),
            };
            // Checked: a hostile header may declare sizes whose product overflows.
            let want = shape
                .iter()
                .try_fold(dtype.size_in_bytes() as u64, |acc, &d| {
                    acc.checked_mul(d as u64)
                });
            let end = data_start.checked_add(b);
            if b < a || Some(b - a) != want || end.is_none_or(|e| e > size) {
                return Err(format!(
                    "tensor '{name}': data range {a}..{b} does not hold {shape:?} {dtype:?} in a {size}-byte file"
                ));
            }
            tensors.insert(name, (dtype, shape, data_start + a..data_start + b));
        }
        // Tensors may not share bytes (the format forbids it; a file that does is corrupt).
        let mut ranges: Vec<(&std::ops::Range<u64>, &String)> =
            tensors.iter().map(|(n, (_, _, r))| (r, n)).collect();
        ranges.sort_by_key(|(r, _)| (r.start, r.end));
        for pair in ranges.windows(2) {
            let ((a, na), (b, nb)) = (pair[0], pair[1]);
            if b.start < a.end && !a.is_empty() && !b.is_empty() {
                return Err(format!(
                    "tensors '{na}' and '{nb}' overlap (bytes {}..{} and {}..{})",
                    a.start, a.end, b.start, b.end
                ));
            }
        }
        Ok(Self { file, tensors })
    }

    fn load(&self, name: &str, device: &Device) -> std::result::Result<Tensor, String> {
        use std::os::unix::fs::FileExt;
        let (dtype, shape, range) = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("no tensor '{name}'"))?;
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        self.file
            .read_exact_at(&mut bytes, range.start)
            .map_err(|e| e.to_string())?;
        if let Some(i) = first_non_finite(&bytes, *dtype) {
            return Err(non_finite_message(i));
        }
        Tensor::from_raw_buffer(&bytes, *dtype, shape, device).map_err(|e| e.to_string())
    }
}

/// The index of the first NaN or infinity among little-endian values of `dtype` (none for integer
/// types). Weights are checked as they are read: no network works with them, and a NaN would
/// only surface as a black image after the whole run.
pub fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<usize> {
    fn scan<const N: usize>(bytes: &[u8], exponent: u64) -> Option<usize> {
        let bad = |c: &[u8]| {
            let mut v = [0u8; 8];
            v[..N].copy_from_slice(c);
            u64::from_le_bytes(v) & exponent == exponent
        };
        // Blocks keep the common (all finite) case a branch-free, vectorisable reduction.
        const BLOCK: usize = 4096;
        for (b, block) in bytes.chunks(BLOCK * N).enumerate() {
            if block.chunks_exact(N).fold(false, |any, c| any | bad(c)) {
                let i = block.chunks_exact(N).position(bad)?;
                return Some(b * BLOCK + i);
            }
        }
        None
    }
    match dtype {
        DType::F32 => scan::<4>(bytes, 0x7f80_0000),
        DType::F16 => scan::<2>(bytes, 0x7c00),
        DType::BF16 => scan::<2>(bytes, 0x7f80),
        DType::F64 => scan::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => None,
    }
}

fn non_finite_message(index: usize) -> String {
    format!("non-finite value (NaN or infinity) at element {index}: the model cannot work with it")
}

/// The most parameters a model built from a `config.json` may declare; the largest real component
/// (the 2.2 prior's CLIP bigG vision tower) has 1.8 B.
pub const MAX_PARAMETERS: u64 = 20_000_000_000;

/// Builds a model with `build` on meta weights (names and shapes only, nothing allocated) and
/// refuses a config that declares more than [`MAX_PARAMETERS`] parameters: absurd sizes are
/// refused from the config alone, before any weight is read.
pub fn check_config_size<T>(dir: &Path, build: impl FnOnce(&Weights) -> Result<T>) -> Result<()> {
    let meta = Weights::meta(DType::F32);
    build(&meta)?;
    let n: u128 = meta
        .recorded()
        .iter()
        .map(|(_, s)| s.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128)))
        .fold(0u128, u128::saturating_add);
    if n > MAX_PARAMETERS as u128 {
        return Err(Error::InvalidArgument(format!(
            "{}: its config.json declares a model of {n} parameters (at most {MAX_PARAMETERS}); refused before loading",
            dir.display()
        )));
    }
    Ok(())
}

/// Checks a component directory against its config without reading any weight: the model
/// `build` makes from names and shapes only ([`check_config_size`]), then every tensor it needs
/// found in the weight files' headers with its shape. A broken or mismatched checkpoint is found
/// in milliseconds, before any stage runs.
pub fn verify_weights<T>(dir: &Path, build: impl Fn(&Weights) -> Result<T>) -> Result<()> {
    check_config_size(dir, &build)?;
    let meta = Weights::meta(DType::F32);
    build(&meta)?;
    let store = WeightStore::from_dir(dir)?;
    for (name, shape) in meta.recorded() {
        store.check(&name, &shape)?;
    }
    Ok(())
}

/// A PyTorch `.bin` (a zip) whose entries declare more bytes than the file holds is refused
/// before candle reads it: candle allocates what an entry declares (found by fuzzing: a 3 kB file
/// declaring a 4 GB `data.pkl`). Entries are stored, not compressed, in `torch.save` files.
fn check_zip_sizes(path: &Path) -> std::result::Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut archive =
        zip::ZipArchive::new(file).map_err(|e| format!("not a PyTorch zip archive: {e}"))?;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| e.to_string())?;
        if entry.size() > len || entry.compressed_size() > len {
            return Err(format!(
                "zip entry '{}' declares {} bytes in a {len}-byte file",
                entry.name().unwrap_or_default(),
                entry.size()
            ));
        }
    }
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| e.to_string())?;
        let name = entry.name().unwrap_or_default().to_string();
        if name.ends_with("data.pkl") {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).map_err(|e| e.to_string())?;
            check_pickle(&bytes).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(())
}

/// Walks a pickle's opcodes without interpreting them: every length it declares must fit in what
/// remains, every opcode must be one of the protocol's. candle's reader allocates a declared
/// length before reading it (found by fuzzing: a 2 kB pickle declaring a 4 GB string).
pub fn check_pickle(p: &[u8]) -> std::result::Result<(), String> {
    let mut i = 0usize;
    let take = |i: &mut usize, n: u64| -> std::result::Result<(), String> {
        let end = (*i as u64).checked_add(n).filter(|&e| e <= p.len() as u64);
        match end {
            Some(e) => {
                *i = e as usize;
                Ok(())
            }
            None => Err(format!("opcode at {} declares {n} bytes past the end", *i)),
        }
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
    while i < p.len() {
        let op = p[i];
        i += 1;
        match op {
            b'.' => return Ok(()),
            b'('
            | b'0'
            | b'1'
            | b'2'
            | b'N'
            | b')'
            | b']'
            | b'}'
            | b'a'
            | b'b'
            | b'e'
            | b'l'
            | b'o'
            | b's'
            | b'u'
            | b't'
            | b'R'
            | b'Q'
            | b'd'
            | 0x81
            | 0x85..=0x89
            | 0x8f
            | 0x90..=0x94
            | 0x97
            | 0x98 => {}
            b'K' | b'h' | b'q' | 0x80 | 0x82 => take(&mut i, 1)?,
            b'M' | 0x83 => take(&mut i, 2)?,
            b'J' | b'j' | b'r' | 0x84 => take(&mut i, 4)?,
            b'G' | 0x95 => take(&mut i, 8)?,
            b'U' | b'C' | 0x8c | 0x8a | b'T' | b'B' | b'X' | 0x8b | 0x8d | 0x8e | 0x96 => {
                let width = match op {
                    b'U' | b'C' | 0x8c | 0x8a => 1,
                    b'T' | b'B' | b'X' | 0x8b => 4,
                    _ => 8,
                };
                let start = i;
                take(&mut i, width)?;
                let n = le(&p[start..i]);
                take(&mut i, n)?;
            }
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' | b'c' | b'i' => {
                let lines = if op == b'c' || op == b'i' { 2 } else { 1 };
                for _ in 0..lines {
                    let nl = p[i..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| format!("opcode at {} has no end of line", i - 1))?;
                    i += nl + 1;
                }
            }
            other => return Err(format!("unknown pickle opcode 0x{other:02x} at {}", i - 1)),
        }
    }
    Err("the pickle has no STOP".into())
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
                let st =
                    StreamedSafetensors::open(path).map_err(|message| Error::InvalidWeights {
                        path: path.clone(),
                        message,
                    })?;
                for (name, (_, shape, _)) in &st.tensors {
                    index.insert(name.clone(), (file_idx, shape.clone()));
                }
                WeightFile::Safetensors(st)
            } else {
                check_zip_sizes(path).map_err(|message| Error::InvalidWeights {
                    path: path.clone(),
                    message,
                })?;
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

    /// The weight files, in the order they were opened.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
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

    /// Checks that `name` is stored with `shape` (from the headers only); its file's index.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<usize> {
        let (file_idx, found) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self.files_list(),
        })?;
        if found.as_slice() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: found.clone(),
                file: self.files[*file_idx].0.clone(),
            });
        }
        Ok(*file_idx)
    }

    /// Loads one tensor, checking its shape and converting it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (path, file) = &self.files[self.check(name, shape)?];
        let invalid = |e: candle_core::Error| Error::InvalidWeights {
            path: path.clone(),
            message: format!("tensor '{name}': {e}"),
        };
        let t = match file {
            WeightFile::Safetensors(st) => {
                st.load(name, device)
                    .map_err(|message| Error::InvalidWeights {
                        path: path.clone(),
                        message: format!("tensor '{name}': {message}"),
                    })?
            }
            WeightFile::Pth(pth) => pth
                .get(name)
                .map_err(invalid)?
                .ok_or_else(|| Error::MissingTensor {
                    name: name.to_string(),
                    files: path.display().to_string(),
                })
                .and_then(|t| {
                    if t.dtype().is_float() {
                        let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                            return Err(Error::InvalidWeights {
                                path: path.clone(),
                                message: format!("tensor '{name}': {}", non_finite_message(i)),
                            });
                        }
                    }
                    Ok(t)
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
    /// Trainable variables, created on first request (see [`ParamStore`]).
    Trainable(ParamStore),
}

/// The trainable parameters of a model under construction: every tensor a module asks for becomes
/// a [`Var`](candle_core::Var) named by its diffusers name, initialised from a checkpoint when one
/// holds it, otherwise deterministically from the seed and the name (so the same seed gives the
/// same model whatever the construction order). A name requested twice is the same variable.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<ParamInner>>,
}

struct ParamInner {
    seed: u64,
    device: Device,
    init: std::collections::HashMap<String, Tensor>,
    vars: std::collections::BTreeMap<String, candle_core::Var>,
}

impl ParamStore {
    /// An empty store: new parameters are drawn from `seed`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self::with_init(seed, std::collections::HashMap::new(), device)
    }

    /// A store whose parameters start from `init` (e.g. a checkpoint) where it has them.
    pub fn with_init(
        seed: u64,
        init: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(ParamInner {
                seed,
                device: device.clone(),
                init,
                vars: Default::default(),
            })),
        }
    }

    /// Starts the parameter `name` from `value` unless a checkpoint already holds it (a resumed
    /// run keeps its trained value) or it has been created already.
    pub fn init_if_absent(&self, name: &str, value: Tensor) -> Result<()> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| Error::InvalidArgument("parameter store poisoned".into()))?;
        if !g.vars.contains_key(name) {
            g.init.entry(name.to_string()).or_insert(value);
        }
        Ok(())
    }

    /// Every variable created so far, by name.
    pub fn vars(&self) -> Vec<(String, candle_core::Var)> {
        self.inner
            .lock()
            .map(|g| g.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// The current values, by name (what a checkpoint stores).
    pub fn tensors(&self) -> std::collections::HashMap<String, Tensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn get(&self, name: &str, shape: &Shape) -> Result<Tensor> {
        let mut g = self
            .inner
            .lock()
            .map_err(|_| Error::InvalidArgument("parameter store poisoned".into()))?;
        if let Some(v) = g.vars.get(name) {
            if v.dims() != shape.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: shape.dims().to_vec(),
                    found: v.dims().to_vec(),
                    file: PathBuf::from("(parameters)"),
                });
            }
            return Ok(v.as_tensor().clone());
        }
        let value = match g.init.get(name) {
            Some(t) if t.dims() == shape.dims() => t.to_dtype(DType::F32)?.to_device(&g.device)?,
            Some(t) => {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: shape.dims().to_vec(),
                    found: t.dims().to_vec(),
                    file: PathBuf::from("(checkpoint)"),
                })
            }
            None => init_param(g.seed, name, shape, &g.device)?,
        };
        let var = candle_core::Var::from_tensor(&value)?;
        let t = var.as_tensor().clone();
        g.vars.insert(name.to_string(), var);
        Ok(t)
    }
}

/// A fresh parameter: matrices and kernels N(0, 1/fan_in), biases 0, other vectors (norm scales)
/// 1; the normal draws come from a generator seeded by `seed` and the name.
fn init_param(seed: u64, name: &str, shape: &Shape, device: &Device) -> Result<Tensor> {
    let dims = shape.dims();
    let n = shape.elem_count();
    if dims.len() < 2 {
        let v = if name.ends_with("bias") { 0f32 } else { 1f32 };
        return Ok(Tensor::full(v, shape, device)?);
    }
    let fan_in: usize = dims[1..].iter().product();
    let std = 1.0 / (fan_in as f64).sqrt();
    let mut state = seed ^ crate::utils::fnv1a(crate::utils::FNV1A_OFFSET, name.as_bytes());
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut data = Vec::with_capacity(n);
    while data.len() < n {
        // Box–Muller.
        let (u1, u2) = (next().max(1e-300), next());
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        data.push((r * a.cos() * std) as f32);
        if data.len() < n {
            data.push((r * a.sin() * std) as f32);
        }
    }
    Ok(Tensor::from_vec(data, shape.clone(), device)?)
}

/// A view of a weight source under a name prefix, handed to module constructors (like candle's
/// `VarBuilder`, but with typed errors, shape checks that name the file, and a meta mode).
#[derive(Clone)]
pub struct Weights {
    source: Source,
    prefix: String,
    dtype: DType,
    device: Device,
    pack_bf16: bool,
}

/// On the CPU, bf16 compute means f32 activations, norms and softmax with the GEMM and
/// convolution weights held as packed bf16 (`ops::bf16`): tensors are handed out in f32 and the
/// layers pack them. Other dtypes (and other devices) are handed out as asked.
fn compute_dtype(dtype: DType, device: &Device) -> (DType, bool) {
    if dtype == DType::BF16 && device.is_cpu() {
        (DType::F32, true)
    } else {
        (dtype, false)
    }
}

impl Weights {
    /// Weights read from a store, converted to `dtype` on `device`.
    pub fn from_store(store: WeightStore, dtype: DType, device: &Device) -> Self {
        let (dtype, pack_bf16) = compute_dtype(dtype, device);
        Self {
            source: Source::Store(Arc::new(store)),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            pack_bf16,
        }
    }

    /// Whether Linear and Conv2d layers hold their weights as packed bf16 (bf16 compute on the
    /// CPU).
    pub fn packs_bf16(&self) -> bool {
        self.pack_bf16
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
            pack_bf16: false,
        }
    }

    /// Random weights (N(0, 1/fan_in) matrices, unit norm scales, zero biases).
    pub fn random(dtype: DType, device: &Device) -> Self {
        let (dtype, pack_bf16) = compute_dtype(dtype, device);
        Self {
            source: Source::Random,
            prefix: String::new(),
            dtype,
            device: device.clone(),
            pack_bf16,
        }
    }

    /// Trainable parameters from `params` (f32): every requested tensor becomes a variable.
    pub fn trainable(params: &ParamStore) -> Self {
        let device = params
            .inner
            .lock()
            .map(|g| g.device.clone())
            .unwrap_or(Device::Cpu);
        Self {
            source: Source::Trainable(params.clone()),
            prefix: String::new(),
            dtype: DType::F32,
            device,
            pack_bf16: false,
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

    /// The dtype tensors are converted to (f32 under bf16 compute on the CPU).
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
            Source::Trainable(params) => params.get(&full, &shape),
        }
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
