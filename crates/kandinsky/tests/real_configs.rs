//! The real checkpoints will load: building our modules from the real hub configs (without
//! allocating weights) must request exactly the tensor names and shapes of diffusers' state dicts,
//! dumped by `tools/make_fixtures.py` from the same configs on the meta device.

mod common;

use candle_core::DType;
use common::fixtures;
use kandinsky::loading::Weights;
use kandinsky::models::clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
};
use kandinsky::models::transformers::prior_transformer::{
    PriorTransformer, PriorTransformerConfig,
};
use kandinsky::models::{UNet2DConditionConfig, UNet2DConditionModel, VQModel, VQModelConfig};
use kandinsky::pipelines::kandinsky::text_encoder::{MClipConfig, MultilingualClip};
use std::collections::BTreeMap;

fn reference(key: &str) -> (u64, BTreeMap<String, Vec<usize>>) {
    let text = std::fs::read_to_string(fixtures().join("real_shapes.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let entry = &all[key];
    let params = entry["params"].as_u64().unwrap();
    let tensors = entry["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t[0].as_str().unwrap().to_string();
            let shape = t[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (name, shape)
        })
        .collect();
    (params, tensors)
}

fn compare(key: &str, w: &Weights, expected_params: Option<u64>) {
    let recorded = w.recorded();
    let ours: BTreeMap<String, Vec<usize>> = recorded.iter().cloned().collect();
    assert_eq!(
        ours.len(),
        recorded.len(),
        "{key}: a tensor was requested twice"
    );
    let (params, theirs) = reference(key);
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{key}: not requested {missing:?}; unknown {extra:?}"
    );
    for (name, shape) in &theirs {
        assert_eq!(&ours[name], shape, "{key}: shape of {name}");
    }
    let ours_params: u64 = ours
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(ours_params, params, "{key}: parameter count");
    if let Some(p) = expected_params {
        assert_eq!(ours_params, p, "{key}: published parameter count");
    }
    println!("{key}: {} tensors, {ours_params} parameters", ours.len());
}

fn unet(repo: &str, expected_params: Option<u64>) {
    let dir = real_configs().join(repo).join("unet");
    let config = UNet2DConditionConfig::load(&dir).unwrap();
    let w = Weights::meta(DType::F32);
    UNet2DConditionModel::new(&w, &config).unwrap();
    compare(&format!("{repo}/unet"), &w, expected_params);
}

#[test]
fn unet_2_1() {
    unet("kandinsky-2-1", Some(1_228_661_768));
}

#[test]
fn unet_2_1_inpaint() {
    unet("kandinsky-2-1-inpaint", None);
}

#[test]
fn unet_2_2() {
    unet("kandinsky-2-2-decoder", Some(1_253_057_288));
}

#[test]
fn unet_2_2_inpaint() {
    unet("kandinsky-2-2-decoder-inpaint", None);
}

#[test]
fn unet_2_2_controlnet_depth() {
    unet("kandinsky-2-2-controlnet-depth", None);
}

#[test]
fn movq() {
    let dir = real_configs().join("movq");
    let config = VQModelConfig::load(&dir).unwrap();
    let w = Weights::meta(DType::F32);
    VQModel::new(&w, &config).unwrap();
    compare("movq", &w, None);
}

fn component<C: serde::de::DeserializeOwned>(key: &str) -> C {
    kandinsky::loading::read_json(&real_configs().join(key).join("config.json")).unwrap()
}

#[test]
fn prior_2_1() {
    let w = Weights::meta(DType::F32);
    PriorTransformer::new(
        &w,
        &component::<PriorTransformerConfig>("kandinsky-2-1-prior/prior"),
    )
    .unwrap();
    compare("kandinsky-2-1-prior/prior", &w, None);
}

#[test]
fn prior_2_2() {
    let w = Weights::meta(DType::F32);
    PriorTransformer::new(
        &w,
        &component::<PriorTransformerConfig>("kandinsky-2-2-prior/prior"),
    )
    .unwrap();
    compare("kandinsky-2-2-prior/prior", &w, None);
}

#[test]
fn clip_vit_l_14_text() {
    let w = Weights::meta(DType::F32);
    ClipTextModelWithProjection::new(
        &w,
        &component::<ClipTextConfig>("kandinsky-2-1-prior/text_encoder"),
    )
    .unwrap();
    compare("kandinsky-2-1-prior/text_encoder", &w, None);
}

#[test]
fn clip_vit_l_14_vision() {
    let w = Weights::meta(DType::F32);
    ClipVisionModelWithProjection::new(
        &w,
        &component::<ClipVisionConfig>("kandinsky-2-1-prior/image_encoder"),
    )
    .unwrap();
    compare("kandinsky-2-1-prior/image_encoder", &w, None);
}

#[test]
fn clip_bigg_text() {
    let w = Weights::meta(DType::F32);
    ClipTextModelWithProjection::new(
        &w,
        &component::<ClipTextConfig>("kandinsky-2-2-prior/text_encoder"),
    )
    .unwrap();
    compare("kandinsky-2-2-prior/text_encoder", &w, None);
}

#[test]
fn clip_bigg_vision() {
    let w = Weights::meta(DType::F32);
    ClipVisionModelWithProjection::new(
        &w,
        &component::<ClipVisionConfig>("kandinsky-2-2-prior/image_encoder"),
    )
    .unwrap();
    compare("kandinsky-2-2-prior/image_encoder", &w, None);
}

#[test]
fn mclip_xlm_roberta_large() {
    let w = Weights::meta(DType::F32);
    MultilingualClip::new(&w, &component::<MClipConfig>("kandinsky-2-1/text_encoder")).unwrap();
    compare("kandinsky-2-1/text_encoder", &w, None);
}

/// The embedded configurations' directory (`kandinsky::models::real_configs`).
fn real_configs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("real_configs")
}
