//! UNet parity against diffusers for every Kandinsky variant, on diffusers' test dummies and on
//! small-width models with the real topology, at a square and a non-square latent.

mod common;

use candle_core::DType;
use common::{assert_close, fixtures, load_io};
use kandinsky::loading::Weights;
use kandinsky::models::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};

fn check(name: &str) {
    let dir = fixtures().join("unet").join(name);
    let config = UNet2DConditionConfig::load(&dir).unwrap();
    let w = Weights::from_dir(&dir, DType::F32, &common::device()).unwrap();
    let unet = UNet2DConditionModel::new(&w, &config).unwrap();
    let io = load_io(&dir.join("io.safetensors"));
    for j in 0..2 {
        let get = |k: &str| io.get(&format!("{k}_{j}"));
        let t = get("timestep").unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        let cond = UNetConditioning {
            image_embeds: get("image_embeds"),
            text_embeds: get("text_embeds"),
            encoder_hidden_states: get("encoder_hidden_states"),
            hint: get("hint"),
        };
        let out = unet.forward(get("sample").unwrap(), t, &cond).unwrap();
        let sample = get("sample").unwrap();
        assert_close(
            &format!("{name} {:?}", sample.dims()),
            &out,
            get("out").unwrap(),
        );
    }
}

#[test]
fn dummy_2_1() {
    check("dummy_2_1");
}
#[test]
fn dummy_2_1_inpaint() {
    check("dummy_2_1_inpaint");
}
#[test]
fn dummy_2_2() {
    check("dummy_2_2");
}
#[test]
fn dummy_2_2_inpaint() {
    check("dummy_2_2_inpaint");
}
#[test]
fn dummy_2_2_controlnet() {
    check("dummy_2_2_controlnet");
}
#[test]
fn topo_2_1() {
    check("topo_2_1");
}
#[test]
fn topo_2_1_inpaint() {
    check("topo_2_1_inpaint");
}
#[test]
fn topo_2_2() {
    check("topo_2_2");
}
#[test]
fn topo_2_2_inpaint() {
    check("topo_2_2_inpaint");
}
#[test]
fn topo_2_2_controlnet() {
    check("topo_2_2_controlnet");
}
