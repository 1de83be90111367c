//! Parity of the prior stage's networks with transformers / diffusers on tiny random models:
//! CLIP text (quick_gelu and gelu, legacy and modern pooling, with and without a padding mask),
//! CLIP vision (including the all-zero image), M-CLIP and the PriorTransformer.

mod common;

use candle_core::{DType, Tensor};
use common::{assert_close, fixtures, load_io};
use kandinsky::models::clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
use kandinsky::models::transformers::prior_transformer::PriorTransformer;
use kandinsky::pipelines::kandinsky::text_encoder::MultilingualClip;

fn dir(name: &str) -> std::path::PathBuf {
    fixtures().join("encoders").join(name)
}

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn clip_text(name: &str) {
    let d = dir(name);
    let model = ClipTextModelWithProjection::load(&d, DType::F32, &common::device()).unwrap();
    let io = load_io(&d.join("io.safetensors"));
    let out = model.forward(&ids(&io["input_ids"]), None).unwrap();
    assert_close(
        &format!("{name} text_embeds"),
        &out.text_embeds,
        &io["text_embeds"],
    );
    assert_close(
        &format!("{name} last_hidden_state"),
        &out.last_hidden_state,
        &io["last_hidden_state"],
    );
    let out = model
        .forward(&ids(&io["input_ids"]), Some(&io["attention_mask"]))
        .unwrap();
    assert_close(
        &format!("{name} masked text_embeds"),
        &out.text_embeds,
        &io["text_embeds_masked"],
    );
    assert_close(
        &format!("{name} masked last_hidden_state"),
        &out.last_hidden_state,
        &io["last_hidden_state_masked"],
    );
}

#[test]
fn clip_text_2_1_quick_gelu_legacy_pooling() {
    clip_text("clip_text_2_1");
}

#[test]
fn clip_text_2_2_gelu_pad_is_eos() {
    clip_text("clip_text_2_2");
}

#[test]
fn clip_text_modern_eos_pooling() {
    clip_text("clip_text_eos");
}

fn clip_vision(name: &str) {
    let d = dir(name);
    let model = ClipVisionModelWithProjection::load(&d, DType::F32, &common::device()).unwrap();
    let io = load_io(&d.join("io.safetensors"));
    let out = model.forward(&io["pixel_values"]).unwrap();
    assert_close(
        &format!("{name} image_embeds"),
        &out.image_embeds,
        &io["image_embeds"],
    );
    assert_close(
        &format!("{name} last_hidden_state"),
        &out.last_hidden_state,
        &io["last_hidden_state"],
    );
}

#[test]
fn clip_vision_2_1_quick_gelu() {
    clip_vision("clip_vision_2_1");
}

#[test]
fn clip_vision_2_2_gelu() {
    clip_vision("clip_vision_2_2");
}

#[test]
fn mclip() {
    let d = dir("mclip");
    let model = MultilingualClip::load(&d, DType::F32, &common::device()).unwrap();
    let io = load_io(&d.join("io.safetensors"));
    let (pooled, hidden) = model
        .forward(&ids(&io["input_ids"]), &io["attention_mask"])
        .unwrap();
    assert_close("mclip prompt_embeds", &pooled, &io["prompt_embeds"]);
    assert_close("mclip last_hidden_state", &hidden, &io["last_hidden_state"]);
}

fn prior(name: &str) {
    let d = dir(name);
    let model = PriorTransformer::load(&d, DType::F32, &common::device()).unwrap();
    let io = load_io(&d.join("io.safetensors"));
    let out = model
        .forward(
            &io["hidden_states"],
            741.0,
            &io["proj_embedding"],
            Some(&io["encoder_hidden_states"]),
            Some(&io["attention_mask"]),
        )
        .unwrap();
    assert_close(&format!("{name} masked"), &out, &io["out"]);
    let post = model.post_process_latents(&out).unwrap();
    assert_close(
        &format!("{name} post_process_latents"),
        &post,
        &io["post_processed"],
    );
    let out = model
        .forward(
            &io["hidden_states"],
            3.0,
            &io["proj_embedding"],
            Some(&io["encoder_hidden_states"]),
            None,
        )
        .unwrap();
    assert_close(&format!("{name} without mask"), &out, &io["out_nomask"]);
}

#[test]
fn prior_dummy() {
    prior("prior_dummy");
}

#[test]
fn prior_deep() {
    prior("prior_deep");
}
