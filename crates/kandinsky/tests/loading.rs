//! Loading model directories: every supported weight format gives diffusers' output, and every
//! kind of bad input gives a typed, named error instead of a panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, load_io};
use kandinsky::loading::{component_dir, resolve_model_dir_in, ModelIndex, WeightStore};
use kandinsky::models::{UNet2DConditionModel, UNetConditioning};
use kandinsky::Error;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn formats() -> PathBuf {
    fixtures().join("formats")
}

fn run_tiny(dir: &Path) -> Tensor {
    let unet = UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu).unwrap();
    let io = load_io(&formats().join("io.safetensors"));
    let t = io["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
    let cond = UNetConditioning {
        image_embeds: io.get("image_embeds"),
        ..Default::default()
    };
    unet.forward(&io["sample"], t, &cond).unwrap()
}

fn check_format(name: &str, reference: &str) {
    let io = load_io(&formats().join("io.safetensors"));
    assert_close(name, &run_tiny(&formats().join(name)), &io[reference]);
}

#[test]
fn safetensors_file() {
    check_format("safetensors", "out");
}

#[test]
fn pytorch_pickle_bin() {
    check_format("bin", "out");
}

#[test]
fn sharded_safetensors_with_index() {
    check_format("sharded", "out");
}

#[test]
fn fp16_variant_is_upcast() {
    check_format("fp16", "out_fp16");
}

#[test]
fn bf16_variant_is_upcast() {
    check_format("bf16", "out_bf16");
}

/// Copies a fixture component directory into a fresh temporary directory.
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn plain_weights_win_over_variants() {
    let dir = copy_dir(&formats().join("safetensors"));
    std::fs::copy(
        formats().join("fp16/diffusion_pytorch_model.fp16.safetensors"),
        dir.path().join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let io = load_io(&formats().join("io.safetensors"));
    assert_close("plain + fp16 variant", &run_tiny(dir.path()), &io["out"]);
}

fn unet_err(dir: &Path) -> Error {
    UNet2DConditionModel::load(dir, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_directory() {
    let err = unet_err(Path::new("/nonexistent/kandinsky/unet"));
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/kandinsky/unet"),
        "{err}"
    );
}

#[test]
fn missing_config_file() {
    let dir = copy_dir(&formats().join("safetensors"));
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = unet_err(dir.path());
    assert!(
        matches!(err, Error::NotFound { ref what, .. } if what == "config file"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn invalid_config_json() {
    let dir = copy_dir(&formats().join("safetensors"));
    std::fs::write(dir.path().join("config.json"), "{\"in_channels\": \"four\"").unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::Json { .. }), "{err}");
}

#[test]
fn no_weight_files() {
    let dir = copy_dir(&formats().join("safetensors"));
    std::fs::remove_file(dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::NoWeights { .. }), "{err}");
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_dir(&formats().join("safetensors"));
    rewrite_weights(dir.path(), |t| {
        t.remove("mid_block.attentions.0.add_k_proj.weight");
    });
    match unet_err(dir.path()) {
        Error::MissingTensor { name, files } => {
            assert_eq!(name, "mid_block.attentions.0.add_k_proj.weight");
            assert!(
                files.contains("diffusion_pytorch_model.safetensors"),
                "{files}"
            );
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn shape_mismatch_names_tensor_shapes_and_file() {
    let dir = copy_dir(&formats().join("safetensors"));
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "conv_in.weight".into(),
            Tensor::zeros((8, 5, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    match unet_err(dir.path()) {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            file,
        } => {
            assert_eq!(name, "conv_in.weight");
            assert_eq!(expected, vec![8, 4, 3, 3]);
            assert_eq!(found, vec![8, 5, 3, 3]);
            assert!(file.ends_with("diffusion_pytorch_model.safetensors"));
        }
        other => panic!("unexpected error {other}"),
    }
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn unsupported_config_values_are_named() {
    for (key, value, shown) in [
        (
            "resnet_time_scale_shift",
            serde_json::json!("ada_group"),
            "ada_group",
        ),
        ("act_fn", serde_json::json!("gelu"), "gelu"),
        (
            "down_block_types",
            serde_json::json!(["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"]),
            "CrossAttnDownBlock2D",
        ),
        (
            "addition_embed_type",
            serde_json::json!("text_time"),
            "text_time",
        ),
        (
            "layers_per_block",
            serde_json::json!([1, 1, 1]),
            "[1, 1, 1]",
        ),
    ] {
        let dir = copy_dir(&formats().join("safetensors"));
        edit_config(dir.path(), key, value);
        let err = unet_err(dir.path());
        assert!(
            matches!(err, Error::UnsupportedConfig { .. }),
            "{key}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(key.split('_').next().unwrap()) && msg.contains(shown),
            "{key}: {msg}"
        );
    }
}

#[test]
fn unknown_config_keys_are_ignored() {
    let dir = copy_dir(&formats().join("safetensors"));
    edit_config(
        dir.path(),
        "some_future_option",
        serde_json::json!({"a": 1}),
    );
    let io = load_io(&formats().join("io.safetensors"));
    assert_close("unknown key", &run_tiny(dir.path()), &io["out"]);
}

#[test]
fn truncated_safetensors() {
    let dir = copy_dir(&formats().join("safetensors"));
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::InvalidWeights { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("diffusion_pytorch_model.safetensors"),
        "{err}"
    );
}

#[test]
fn corrupt_safetensors_header() {
    let dir = copy_dir(&formats().join("safetensors"));
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(8).take(64) {
        *b = b'#';
    }
    std::fs::write(&path, bytes).unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::InvalidWeights { .. }), "{err}");
}

#[test]
fn corrupt_pytorch_pickle() {
    let dir = copy_dir(&formats().join("bin"));
    std::fs::write(
        dir.path().join("diffusion_pytorch_model.bin"),
        b"not a zip archive",
    )
    .unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::InvalidWeights { .. }), "{err}");
}

#[test]
fn missing_shard() {
    let dir = copy_dir(&formats().join("sharded"));
    std::fs::remove_file(
        dir.path()
            .join("diffusion_pytorch_model-00002-of-00014.safetensors"),
    )
    .unwrap();
    let err = unet_err(dir.path());
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("00002-of-00014"), "{err}");
}

#[test]
fn weight_store_lists_names_and_shapes() {
    let store = WeightStore::from_dir(&formats().join("bin")).unwrap();
    let shapes = store.shapes();
    assert_eq!(shapes["conv_in.weight"], vec![8, 4, 3, 3]);
    let st = WeightStore::from_dir(&formats().join("safetensors")).unwrap();
    assert_eq!(st.shapes(), shapes);
}

/// Builds a Hugging Face hub cache holding `org/tiny` with the tiny UNet as its `unet/`.
fn fake_hub_cache(with_ref: bool) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny");
    let snap = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(
        snap.join("model_index.json"),
        r#"{"_class_name": "KandinskyV22Pipeline", "_diffusers_version": "0.42.1",
            "unet": ["diffusers", "UNet2DConditionModel"], "movq": [null, null]}"#,
    )
    .unwrap();
    let unet = copy_dir(&formats().join("safetensors"));
    std::fs::rename(unet.path(), snap.join("unet")).unwrap();
    if with_ref {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "0123abcd\n").unwrap();
        // A second, older snapshot: refs/main must decide.
        std::fs::create_dir_all(repo.join("snapshots").join("ffff0000")).unwrap();
    }
    cache
}

#[test]
fn hub_id_resolves_through_the_cache() {
    for with_ref in [true, false] {
        let cache = fake_hub_cache(with_ref);
        let dir = resolve_model_dir_in("org/tiny", cache.path()).unwrap();
        assert!(dir.ends_with("snapshots/0123abcd"), "{}", dir.display());
        let index = ModelIndex::load(&dir).unwrap();
        assert_eq!(index.class_name, "KandinskyV22Pipeline");
        assert_eq!(
            index.components["unet"],
            ("diffusers".into(), "UNet2DConditionModel".into())
        );
        assert!(!index.components.contains_key("movq"));
        let unet_dir = component_dir(&dir, "unet").unwrap();
        let io = load_io(&formats().join("io.safetensors"));
        assert_close("hub cache", &run_tiny(&unet_dir), &io["out"]);
        let err = component_dir(&dir, "movq").unwrap_err();
        assert!(err.to_string().contains("'movq'"), "{err}");
    }
}

#[test]
fn uncached_hub_id_is_a_clear_error() {
    let cache = fake_hub_cache(true);
    let err = resolve_model_dir_in("kandinsky-community/kandinsky-2-2-decoder", cache.path())
        .unwrap_err();
    assert!(matches!(err, Error::NotCached { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("kandinsky-community/kandinsky-2-2-decoder"),
        "{err}"
    );
    let err = resolve_model_dir_in("./no/such/dir", cache.path()).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}
