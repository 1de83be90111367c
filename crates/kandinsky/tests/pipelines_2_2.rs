//! End-to-end seed parity with diffusers' `KandinskyV22CombinedPipeline` (one
//! `torch.Generator("cpu").manual_seed(seed)` shared by the prior and the decoder), on the tiny 2.2
//! model directories: every pixel within 2/255.

mod common;

use candle_core::{DType, Device};
use common::{fixtures, load_io};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::{
    DecoderParams, KandinskyV22Pipeline,
};
use kandinsky::utils::torch_utils::TorchGenerator;

#[test]
fn combined_text_to_image_matches_diffusers() {
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e_2_2.json")).unwrap()).unwrap();
    let reference = load_io(&dir.join("e2e_2_2.safetensors"));
    let prior = KandinskyPriorPipeline::load(&dir.join("tiny-2-2-prior"), DType::F32, &Device::Cpu)
        .unwrap();
    let decoder =
        KandinskyV22Pipeline::load(&dir.join("tiny-2-2-decoder"), DType::F32, &Device::Cpu)
            .unwrap();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mut g = TorchGenerator::new(case["seed"].as_u64().unwrap());
        let params = PriorParams {
            steps: case["prior_steps"].as_u64().unwrap() as usize,
            guidance_scale: case["prior_guidance"].as_f64().unwrap(),
            num_images_per_prompt: case["num_images"].as_u64().unwrap() as usize,
        };
        let prompts = vec![case["prompt"].as_str().unwrap().to_string()];
        let (emb, neg) = prior
            .call(
                &prompts,
                case["negative_prompt"].as_str(),
                params,
                &mut g,
                None,
                &mut |_, _| {},
            )
            .unwrap();
        let dp = DecoderParams {
            height: case["height"].as_u64().unwrap() as usize,
            width: case["width"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance"].as_f64().unwrap(),
        };
        let img = decoder
            .call(&emb, &neg, dp, &mut g, None, &mut |_, _| {})
            .unwrap();
        let ours = ((img * 0.5).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        let want = &reference[name];
        assert_eq!(ours.dims(), want.dims(), "{name}");
        let diff = (ours - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!(
            "{name}: max pixel difference {:.3e} ({:.3}/255)",
            diff,
            diff * 255.0
        );
        assert!(diff <= 2.0 / 255.0, "{name}: max pixel difference {diff}");
    }
}
