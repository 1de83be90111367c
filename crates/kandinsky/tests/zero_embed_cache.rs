//! The zero-image embedding is cached on disk, keyed by the image encoder's content: a second
//! pipeline gets the identical tensor without loading the encoder, and a changed weight file is
//! a different key (recomputed, and different).

use candle_core::{DType, Device, Tensor};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::KandinskyPriorPipeline;
use std::path::Path;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn zero_image_embeds_are_cached_by_content() {
    let cache = tempfile::tempdir().unwrap();
    // The only test of this binary: no other thread reads the environment.
    std::env::set_var("XDG_CACHE_HOME", cache.path());
    let root =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines/tiny-2-2-prior");
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("prior");
    copy_dir(&root, &dir);

    let first = KandinskyPriorPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert!(
        !first.image_encoder_loaded(),
        "loading the pipeline must not load the encoder"
    );
    let computed = first.zero_image_embeds(1).unwrap();
    assert!(
        first.image_encoder_loaded(),
        "an empty cache means computing it"
    );
    let entries = std::fs::read_dir(cache.path().join("kandinsky"))
        .unwrap()
        .count();
    assert!(entries >= 1, "the embedding was not stored");

    let second = KandinskyPriorPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let cached = second.zero_image_embeds(2).unwrap();
    assert!(
        !second.image_encoder_loaded(),
        "a cache hit must not load the encoder"
    );
    assert_eq!(cached.dims(), &[2, computed.dim(1).unwrap()]);
    assert_eq!(
        max_abs_diff(&cached.narrow(0, 0, 1).unwrap(), &computed),
        0.0
    );
    // The recomputed value (the encoder itself) equals the cached one exactly.
    let recomputed = second.image_encoder().unwrap().zero_image_embeds().unwrap();
    assert_eq!(max_abs_diff(&recomputed, &computed), 0.0);

    // Change one weight of the encoder: a new key, a recomputation, a different embedding.
    let st = std::fs::read_dir(dir.join("image_encoder"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = tensors
        .keys()
        .find(|k| k.contains("post_layernorm.bias"))
        .unwrap()
        .clone();
    let t = tensors[&name].clone();
    tensors.insert(name, (t + 0.5).unwrap());
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let third = KandinskyPriorPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let changed = third.zero_image_embeds(1).unwrap();
    assert!(
        third.image_encoder_loaded(),
        "a changed file must not hit the old entry"
    );
    assert!(max_abs_diff(&changed, &computed) > 1e-3);
}
