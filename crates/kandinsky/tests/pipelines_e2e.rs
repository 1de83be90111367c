//! End-to-end seed parity with diffusers' `KandinskyV22CombinedPipeline` and
//! `KandinskyCombinedPipeline` (one `torch.Generator("cpu").manual_seed(seed)` shared by the prior
//! and the decoder), on the tiny 2.2 and 2.1 model directories: every pixel within 2/255.

mod common;

use candle_core::DType;
use common::{fixtures, load_io};
use kandinsky::pipelines::decoder::DecoderParams;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::KandinskyV22Pipeline;
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::{read_rgb8, Rgb8};

enum Decoder {
    V21(Box<KandinskyPipeline>),
    V22(Box<KandinskyV22Pipeline>),
}

fn run(version: &str) {
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("e2e_{version}.json"))).unwrap(),
    )
    .unwrap();
    let reference = load_io(&dir.join(format!("e2e_{version}.safetensors")));
    let (prior_dir, decoder) = if version == "2_2" {
        let d = KandinskyV22Pipeline::load(
            &dir.join("tiny-2-2-decoder"),
            DType::F32,
            &common::device(),
        )
        .unwrap();
        ("tiny-2-2-prior", Decoder::V22(Box::new(d)))
    } else {
        let d =
            KandinskyPipeline::load(&dir.join("tiny-2-1"), DType::F32, &common::device()).unwrap();
        ("tiny-2-1-prior", Decoder::V21(Box::new(d)))
    };
    let prior =
        KandinskyPriorPipeline::load(&dir.join(prior_dir), DType::F32, &common::device()).unwrap();
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
        let img = match &decoder {
            Decoder::V22(d) => d
                .call(&emb, &neg, dp, &mut g, None, &mut |_, _| {})
                .unwrap(),
            // The combined 2.1 pipeline gives the decoder the prompt and no negative prompt.
            Decoder::V21(d) => d
                .call(&prompts, None, &emb, &neg, dp, &mut g, None, &mut |_, _| {})
                .unwrap(),
        };
        assert_matches(img, &reference[name], &format!("{version} {name}"));
    }
}

#[test]
fn combined_2_2_text_to_image_matches_diffusers() {
    run("2_2");
}

#[test]
fn combined_2_1_text_to_image_matches_diffusers() {
    run("2_1");
}

/// `prior.interpolate(...)` then the decoder, one generator: mixing texts and an image, and
/// image variations (`interpolate([image], [1.0])`).
#[test]
fn mixing_and_variations_match_diffusers() {
    use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::MixInput;
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e_mix.json")).unwrap()).unwrap();
    let reference = load_io(&dir.join("e2e_mix.safetensors"));
    for case in cases.as_array().unwrap() {
        let version = case["version"].as_str().unwrap();
        let name = format!("{version}_{}", case["name"].as_str().unwrap());
        let (prior_dir, dec_dir) = if version == "2_2" {
            ("tiny-2-2-prior", "tiny-2-2-decoder")
        } else {
            ("tiny-2-1-prior", "tiny-2-1")
        };
        let prior =
            KandinskyPriorPipeline::load(&dir.join(prior_dir), DType::F32, &common::device())
                .unwrap();
        let inputs: Vec<(MixInput, f64)> = case["items"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["weights"].as_array().unwrap())
            .map(|(item, w)| {
                let item = item.as_str().unwrap();
                let input = if item.ends_with(".png") {
                    MixInput::Image(rgb8(item))
                } else {
                    MixInput::Text(item.to_string())
                };
                (input, w.as_f64().unwrap())
            })
            .collect();
        let mut g = TorchGenerator::new(case["seed"].as_u64().unwrap());
        let params = PriorParams {
            steps: 3,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
        };
        let (emb, neg) = prior
            .interpolate(&inputs, params, "", None, &mut g, &mut |_, _| {})
            .unwrap();
        let dp = DecoderParams {
            height: 64,
            width: 64,
            steps: 4,
            guidance_scale: 4.0,
        };
        let img = if version == "2_2" {
            let d = KandinskyV22Pipeline::load(&dir.join(dec_dir), DType::F32, &common::device())
                .unwrap();
            d.call(&emb, &neg, dp, &mut g, None, &mut |_, _| {})
                .unwrap()
        } else {
            let d =
                KandinskyPipeline::load(&dir.join(dec_dir), DType::F32, &common::device()).unwrap();
            d.call(
                &[String::new()],
                None,
                &emb,
                &neg,
                dp,
                &mut g,
                None,
                &mut |_, _| {},
            )
            .unwrap()
        };
        assert_matches(img, &reference[&name], &name);
    }
}

/// Image-to-image (prior, then `KandinskyImg2ImgPipeline` / `KandinskyV22Img2ImgPipeline`, one
/// generator): an image of the output size, an upscaled one, and strength 1.0.
fn img2img(version: &str) {
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e_img2img_2_2.json")).unwrap())
            .unwrap();
    let reference = load_io(&dir.join(format!("e2e_img2img_{version}.safetensors")));
    let (prior_dir, decoder) = if version == "2_2" {
        let d = KandinskyV22Pipeline::load(
            &dir.join("tiny-2-2-decoder"),
            DType::F32,
            &common::device(),
        )
        .unwrap();
        ("tiny-2-2-prior", Decoder::V22(Box::new(d)))
    } else {
        let d =
            KandinskyPipeline::load(&dir.join("tiny-2-1"), DType::F32, &common::device()).unwrap();
        ("tiny-2-1-prior", Decoder::V21(Box::new(d)))
    };
    let prior =
        KandinskyPriorPipeline::load(&dir.join(prior_dir), DType::F32, &common::device()).unwrap();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (height, width) = (
            case["height"].as_u64().unwrap() as usize,
            case["width"].as_u64().unwrap() as usize,
        );
        let mut g = TorchGenerator::new(case["seed"].as_u64().unwrap());
        let params = PriorParams {
            steps: 3,
            guidance_scale: case["prior_guidance"].as_f64().unwrap(),
            num_images_per_prompt: 1,
        };
        let prompts = vec![case["prompt"].as_str().unwrap().to_string()];
        let negative = case["negative_prompt"].as_str();
        let (emb, neg) = prior
            .call(&prompts, negative, params, &mut g, None, &mut |_, _| {})
            .unwrap();
        let image = rgb8(case["image"].as_str().unwrap());
        let image = kandinsky::vae_image_processor::prepare_image(
            &image,
            width,
            height,
            2,
            &common::device(),
        )
        .unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let dp = DecoderParams {
            height,
            width,
            steps,
            guidance_scale: case["guidance"].as_f64().unwrap(),
        };
        let strength = case["strength"].as_f64().unwrap();
        // The same run up to its latents (`output_type="latent"`), decoded here: the same image.
        let mut g_latent = g.clone();
        let (latents, movq) = match &decoder {
            Decoder::V22(d) => (
                d.img2img_latents(
                    &image,
                    &emb,
                    &neg,
                    dp,
                    strength,
                    &mut g_latent,
                    &mut |_, _| {},
                )
                .unwrap(),
                d.movq(),
            ),
            Decoder::V21(d) => (
                d.img2img_latents(
                    &prompts,
                    None,
                    &image,
                    &emb,
                    &neg,
                    dp,
                    strength,
                    &mut g_latent,
                    &mut |_, _| {},
                )
                .unwrap(),
                d.movq(),
            ),
        };
        let decoded = movq.decode(&latents, true).unwrap();
        let img = match &decoder {
            Decoder::V22(d) => d
                .img2img(&image, &emb, &neg, dp, strength, &mut g, &mut |_, _| {})
                .unwrap(),
            Decoder::V21(d) => d
                .img2img(
                    &prompts,
                    None,
                    &image,
                    &emb,
                    &neg,
                    dp,
                    strength,
                    &mut g,
                    &mut |_, _| {},
                )
                .unwrap(),
        };
        let same = (&img - &decoded)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            same, 0.0,
            "{version} {name}: the latents decode to the image"
        );
        assert_matches(img, &reference[name], &format!("{version} img2img {name}"));
    }
}

#[test]
fn img2img_2_2_matches_diffusers() {
    img2img("2_2");
}

#[test]
fn img2img_2_1_matches_diffusers() {
    img2img("2_1");
}

/// `x·0.5 + 0.5` clamped, NHWC, against diffusers' `output_type="np"` image: max ≤ 2/255.
fn assert_matches(img: candle_core::Tensor, want: &candle_core::Tensor, label: &str) {
    let ours = ((img * 0.5).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_eq!(ours.dims(), want.dims(), "{label}");
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
        "{label}: max pixel difference {diff:.3e} ({:.3}/255)",
        diff * 255.0
    );
    assert!(diff <= 2.0 / 255.0, "{label}: max pixel difference {diff}");
}

fn rgb8(rel: &str) -> Rgb8 {
    read_rgb8(&fixtures().join(rel)).unwrap()
}

/// `KandinskyInpaintCombinedPipeline` / `KandinskyV22InpaintCombinedPipeline` with one generator:
/// a mask at the image size, a non-square output (image bicubic- and mask Lanczos-resized), no
/// CFG with 2 images, and an outpainting canvas.
fn inpaint(version: &str) {
    use kandinsky::pipelines::decoder::prepare_mask_and_masked_image;
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e_inpaint.json")).unwrap())
            .unwrap();
    let reference = load_io(&dir.join("e2e_inpaint.safetensors"));
    let (prior_dir, decoder) = if version == "2_2" {
        let d = KandinskyV22Pipeline::load(
            &dir.join("tiny-2-2-inpaint"),
            DType::F32,
            &common::device(),
        )
        .unwrap();
        ("tiny-2-2-prior", Decoder::V22(Box::new(d)))
    } else {
        let d =
            KandinskyPipeline::load(&dir.join("tiny-2-1-inpaint"), DType::F32, &common::device())
                .unwrap();
        ("tiny-2-1-prior", Decoder::V21(Box::new(d)))
    };
    let prior =
        KandinskyPriorPipeline::load(&dir.join(prior_dir), DType::F32, &common::device()).unwrap();
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
        let image = rgb8(case["image"].as_str().unwrap());
        let mask = rgb8(case["mask"].as_str().unwrap());
        let (mask, image) =
            prepare_mask_and_masked_image(&image, &mask, dp.width, dp.height, &common::device())
                .unwrap();
        let img = match &decoder {
            Decoder::V22(d) => d
                .inpaint(&image, &mask, &emb, &neg, dp, &mut g, None, &mut |_, _| {})
                .unwrap(),
            Decoder::V21(d) => d
                .inpaint(
                    &prompts,
                    None,
                    &image,
                    &mask,
                    &emb,
                    &neg,
                    dp,
                    &mut g,
                    None,
                    &mut |_, _| {},
                )
                .unwrap(),
        };
        let key = format!("{version}_{name}");
        assert_matches(img, &reference[&key], &format!("{version} inpaint {name}"));
    }
}

#[test]
fn inpaint_2_2_matches_diffusers() {
    inpaint("2_2");
}

#[test]
fn inpaint_2_1_matches_diffusers() {
    inpaint("2_1");
}

/// The prior (or its emb2emb from an image), then `KandinskyV22ControlnetPipeline` /
/// `KandinskyV22ControlnetImg2ImgPipeline`, one generator.
#[test]
fn controlnet_and_emb2emb_match_diffusers() {
    let dir = fixtures().join("pipelines");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e_controlnet.json")).unwrap())
            .unwrap();
    let reference = load_io(&dir.join("e2e_controlnet.safetensors"));
    let decoder = KandinskyV22Pipeline::load(
        &dir.join("tiny-2-2-controlnet"),
        DType::F32,
        &common::device(),
    )
    .unwrap();
    let prior =
        KandinskyPriorPipeline::load(&dir.join("tiny-2-2-prior"), DType::F32, &common::device())
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
        let negative = case["negative_prompt"].as_str();
        let start = case["image"].as_str().map(rgb8);
        let (emb, neg) = match case["prior_strength"].as_f64() {
            None => prior.call(&prompts, negative, params, &mut g, None, &mut |_, _| {}),
            Some(s) => prior.emb2emb(
                &prompts,
                negative,
                start.as_ref().unwrap(),
                s,
                params,
                &mut g,
                &mut |_, _| {},
            ),
        }
        .unwrap();
        let dp = DecoderParams {
            height: case["height"].as_u64().unwrap() as usize,
            width: case["width"].as_u64().unwrap() as usize,
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance"].as_f64().unwrap(),
        };
        let hint = kandinsky::vae_image_processor::prepare_hint(
            &rgb8(case["hint"].as_str().unwrap()),
            dp.width,
            dp.height,
            &common::device(),
        )
        .unwrap();
        let image = case["image"].as_str().map(|p| {
            kandinsky::vae_image_processor::prepare_image(
                &rgb8(p),
                dp.width,
                dp.height,
                8,
                &common::device(),
            )
            .unwrap()
        });
        let init = image
            .as_ref()
            .map(|i| (i, case["strength"].as_f64().unwrap()));
        let img = decoder
            .controlnet(&hint, init, &emb, &neg, dp, &mut g, None, &mut |_, _| {})
            .unwrap();
        assert_matches(img, &reference[name], &format!("controlnet {name}"));
    }
}
