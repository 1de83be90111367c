//! Fuzz targets: every parser of untrusted bytes, as a function that must return (an error is
//! fine) without panicking, hanging or allocating beyond what its input justifies. `fuzz/` runs
//! them under libFuzzer (cargo-fuzz, nightly); `tests/replay.rs` replays the kept corpora and
//! crashers on stable in CI, then a short run of random mutations of them.

use candle_core::{DType, Device};
use kandinsky::loading::{read_json, read_tensor, WeightStore};
use kandinsky::tokenization::PromptTokenizer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A target: bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and of `corpus/<name>/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("pickle", pickle),
    ("configs", configs),
    ("images", images),
    ("prompts", prompts),
    ("tokenizer_files", tokenizer_files),
    ("requests", requests),
    ("latents", latents),
];

/// A scratch directory of this process and thread.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kandinsky-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Writes `data` to `name` in the scratch directory; the path.
fn file(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("scratch file");
    path
}

/// Opens weight files and loads every tensor they declare.
fn open_and_load(path: &Path) {
    if let Ok(store) = WeightStore::open(&[path.to_path_buf()]) {
        for (name, shape) in store.shapes() {
            let _ = store.load(&name, &shape, DType::F32, &Device::Cpu);
        }
    }
}

/// A `.safetensors` weight file.
pub fn safetensors(data: &[u8]) {
    open_and_load(&file("model.safetensors", data));
}

/// A PyTorch `.bin` (a zip holding a pickle).
pub fn pickle(data: &[u8]) {
    open_and_load(&file("model.bin", data));
}

/// Every `config.json` we read, and `model_index.json`: parsed, and models built from the configs
/// on meta weights (names and shapes only), as loading does before reading any weight.
pub fn configs(data: &[u8]) {
    use kandinsky::models::clip::{ClipTextConfig, ClipVisionConfig};
    use kandinsky::models::transformers::prior_transformer::{
        PriorTransformer, PriorTransformerConfig,
    };
    use kandinsky::models::{UNet2DConditionConfig, UNet2DConditionModel, VQModel, VQModelConfig};
    let path = file("config.json", data);
    let dir = path.parent().expect("a directory");
    use kandinsky::loading::check_config_size as check;
    if let Ok(c) = read_json::<UNet2DConditionConfig>(&path) {
        let _ = check(dir, |w| UNet2DConditionModel::new(w, &c));
    }
    if let Ok(c) = read_json::<VQModelConfig>(&path) {
        let _ = check(dir, |w| VQModel::new(w, &c));
    }
    if let Ok(c) = read_json::<PriorTransformerConfig>(&path) {
        let _ = check(dir, |w| PriorTransformer::new(w, &c));
    }
    let _ = read_json::<ClipTextConfig>(&path);
    let _ = read_json::<ClipVisionConfig>(&path);
    if let Ok(c) = kandinsky::schedulers::SchedulerConfig::from_json(&String::from_utf8_lossy(data))
    {
        let _ = kandinsky::schedulers::betas(&c);
    }
    std::fs::rename(&path, dir.join("model_index.json")).expect("rename");
    let _ = kandinsky::loading::ModelIndex::load(dir);
}

/// PNG and JPEG images and masks (the library's decoder with its size checks).
pub fn images(data: &[u8]) {
    if let Ok(img) = kandinsky::vae_image_processor::decode_image(data) {
        let _ = kandinsky_server::images::to_rgb8(&img);
        let _ = kandinsky_server::images::to_mask(&img);
    }
}

/// The small model's tokenizers, loaded once.
fn tokenizers() -> &'static (PromptTokenizer, PromptTokenizer) {
    static T: OnceLock<(PromptTokenizer, PromptTokenizer)> = OnceLock::new();
    T.get_or_init(|| {
        let small = Path::new(kandinsky::loading::SMALL_MODEL);
        (
            PromptTokenizer::clip_from_dir(&small.join("prior/tokenizer")).expect("CLIP tokenizer"),
            PromptTokenizer::xlm_roberta_from_dir(&small.join("decoder/tokenizer"))
                .expect("XLM-R tokenizer"),
        )
    })
}

/// Prompts: any UTF-8 (invalid bytes replaced), any length, through both tokenizers.
pub fn prompts(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (clip, xlmr) = tokenizers();
    let _ = clip.encode(&[&text, ""], &Device::Cpu);
    let _ = xlmr.encode(&[&text], &Device::Cpu);
}

/// Tokenizer files: `tokenizer.json` (with a fixed `tokenizer_config.json`).
pub fn tokenizer_files(data: &[u8]) {
    let dir = scratch().join("tokenizer");
    std::fs::create_dir_all(&dir).expect("scratch");
    std::fs::write(dir.join("tokenizer.json"), data).expect("scratch");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 77, "pad_token": "<pad>"}"#,
    )
    .expect("scratch");
    if let Ok(t) = PromptTokenizer::xlm_roberta_from_dir(&dir) {
        let _ = t.encode(&["a red circle"], &Device::Cpu);
    }
    if let Ok(t) = PromptTokenizer::clip_from_dir(&dir) {
        let _ = t.encode(&["a red circle"], &Device::Cpu);
    }
}

/// The server's JSON requests and the base64 images in them: the native request type, and the
/// A1111 body as its handler first reads it (a JSON object) with its image fields. (The checks
/// that need a loaded model run in the server tests, not here.)
pub fn requests(data: &[u8]) {
    use kandinsky_server::api::GenerateRequest;
    use kandinsky_server::images::decode_image;
    if let Ok(r) = serde_json::from_slice::<GenerateRequest>(data) {
        for image in [&r.image, &r.mask, &r.hint].into_iter().flatten() {
            let _ = decode_image(image, "image");
        }
    }
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(data) {
        let images = map.get("init_images").and_then(|v| v.as_array());
        for v in images.into_iter().flatten().chain(map.get("mask")) {
            if let Some(text) = v.as_str() {
                let _ = decode_image(text, "init_images");
            }
        }
    }
}

/// A latents file (`--latents`): safetensors read with candle's reader.
pub fn latents(data: &[u8]) {
    let _ = read_tensor(&file("latents.safetensors", data), &Device::Cpu);
}
