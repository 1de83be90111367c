//! `AutoPipeline`: requests are checked before any weight loads, progress reports both stages,
//! the cancellation flag stops a run between steps, and a pipeline kept loaded gives the same
//! pixels on every request (its sampler reset to the request's).

mod common;

use common::fixtures;
use kandinsky::pipelines::auto_pipeline::{
    AutoPipeline, Inpainting, LoadOptions, Request, Stage, TextToImage,
};
use kandinsky::schedulers::SchedulerClass;
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::Rgb8;
use kandinsky::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn tiny(keep_loaded: bool) -> AutoPipeline {
    let dir = fixtures().join("pipelines");
    let options = LoadOptions {
        keep_loaded,
        ..LoadOptions::default()
    };
    AutoPipeline::from_pretrained(
        &dir.join("tiny-2-2-decoder"),
        &dir.join("tiny-2-2-prior"),
        options,
    )
    .unwrap()
}

fn request(scheduler: Option<SchedulerClass>) -> Request {
    let mut r = Request::new(TextToImage::new("a red cat"));
    r.params.width = Some(64);
    r.params.height = Some(64);
    r.params.steps = 4;
    r.params.prior_steps = 3;
    r.params.scheduler = scheduler;
    r
}

#[test]
fn cancel_flag_stops_the_run_between_steps() {
    let mut pipe = tiny(false);
    let flag = Arc::new(AtomicBool::new(false));
    pipe.set_cancel_flag(flag.clone());
    let mut seen = Vec::new();
    let result = pipe.generate(
        request(None),
        &mut TorchGenerator::new(1),
        &mut |s, i, n| {
            seen.push((s, i, n));
            if s == Stage::Decoder {
                flag.store(true, Ordering::Relaxed);
            }
        },
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let prior: Vec<_> = seen.iter().filter(|r| r.0 == Stage::Prior).collect();
    assert_eq!(prior.len(), 3);
    assert_eq!(seen.last(), Some(&(Stage::Decoder, 1, 4)));
    flag.store(false, Ordering::Relaxed);
    let images = pipe
        .generate(
            request(None),
            &mut TorchGenerator::new(1),
            &mut |_, _, _| {},
        )
        .unwrap();
    assert_eq!(
        (images.len(), images[0].width, images[0].height),
        (1, 64, 64)
    );
}

#[test]
fn kept_stages_give_the_same_pixels_and_reset_the_sampler() {
    let run = |pipe: &mut AutoPipeline, scheduler| {
        pipe.generate(
            request(scheduler),
            &mut TorchGenerator::new(7),
            &mut |_, _, _| {},
        )
        .unwrap()
    };
    let mut fresh = tiny(false);
    let ddpm = run(&mut fresh, None);
    let dpm = run(&mut fresh, Some(SchedulerClass::DpmSolverMultistep));
    assert_ne!(ddpm, dpm);
    let mut kept = tiny(true);
    assert_eq!(
        run(&mut kept, Some(SchedulerClass::DpmSolverMultistep)),
        dpm
    );
    assert_eq!(run(&mut kept, None), ddpm);
    assert_eq!(run(&mut kept, None), ddpm);
}

#[test]
fn check_refuses_bad_requests_before_loading() {
    let pipe = tiny(false);
    let image = Rgb8::new(64, 64, vec![0; 64 * 64 * 3]).unwrap();
    let mask = Rgb8::new(32, 32, vec![255; 32 * 32 * 3]).unwrap();
    let inpaint = Request::new(Inpainting {
        prompt: "a cat".into(),
        image,
        mask,
        mask_blur: None,
        latents: None,
        prior_latents: None,
    });
    let err = pipe.check(&inpaint).unwrap_err().to_string();
    assert!(err.contains("same size"), "{err}");
    let mut bad = request(None);
    bad.params.guidance = f64::NAN;
    assert!(pipe.check(&bad).is_err());
    let mut bad = request(None);
    bad.params.width = Some(100_000);
    let err = pipe.check(&bad).unwrap_err().to_string();
    assert!(err.contains("too large"), "{err}");
    assert!(pipe.check(&request(None)).is_ok());
}

#[test]
fn cancel_flag_reaches_stages_already_kept_loaded() {
    let mut pipe = tiny(true);
    pipe.generate(
        request(None),
        &mut TorchGenerator::new(1),
        &mut |_, _, _| {},
    )
    .unwrap();
    let flag = Arc::new(AtomicBool::new(true));
    pipe.set_cancel_flag(flag);
    let mut steps = 0;
    let result = pipe.generate(
        request(None),
        &mut TorchGenerator::new(1),
        &mut |_, _, _| {
            steps += 1;
        },
    );
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert_eq!(steps, 0);
}

/// The small model in `dtype` on the test device (`common::device`).
fn small(dtype: candle_core::DType, inpaint: bool) -> AutoPipeline {
    let dirs = kandinsky::loading::small_model_dirs(inpaint).unwrap();
    let options = LoadOptions {
        dtype,
        device: common::device(),
        ..LoadOptions::default()
    };
    AutoPipeline::from_pretrained(&dirs.decoder, &dirs.prior, options).unwrap()
}

/// f16 and bf16 images are within 3/255 of f32 ones on the small model (the criterion of
/// half-precision GPU runs; f16 on all but 0.5 % of the values), in every mode the small model
/// has: the dtype casts at the model boundaries (inputs into the compute dtype, f32 out) and the
/// f32 norms keep half precision close. On the CPU, bf16 is the packed-weight path and f16 candle's own; on a GPU
/// (`KANDINSKY_TEST_DEVICE=cuda`) both are the plain-candle path.
#[test]
fn half_precision_images_are_within_3_of_f32() {
    use candle_core::DType;
    use kandinsky::pipelines::auto_pipeline::{ImageToImage, Mixing, Prompt, Variations};
    use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::MixInput;
    let params = |mode: kandinsky::pipelines::auto_pipeline::Mode| {
        let mut r = Request::new(mode);
        r.params.steps = 12;
        r.params.prior_steps = 8;
        r
    };
    let prompt = |p: &str| Prompt {
        prompt: p.into(),
        negative_prompt: None,
    };
    let run = |dtype, inpaint, request: Request| -> Rgb8 {
        small(dtype, inpaint)
            .generate(request, &mut TorchGenerator::new(7), &mut |_, _, _| {})
            .unwrap()
            .remove(0)
    };
    let start = run(
        DType::F32,
        false,
        params(TextToImage::new("a red circle on a blue background").into()),
    );
    let (w, h) = (start.width, start.height);
    let mut mask = vec![0u8; w * h * 3];
    for (i, px) in mask.chunks_mut(3).enumerate() {
        if i % w < w / 2 {
            px.fill(255);
        }
    }
    let mask = Rgb8::new(w, h, mask).unwrap();
    let modes: Vec<(&str, bool, kandinsky::pipelines::auto_pipeline::Mode)> = vec![
        (
            "text to image",
            false,
            TextToImage::new("a large yellow square at the top on a green background").into(),
        ),
        (
            "image to image",
            false,
            ImageToImage {
                prompt: prompt("a red triangle on a blue background"),
                image: start.clone(),
                strength: 0.6,
                prior_strength: None,
                prior_latents: None,
            }
            .into(),
        ),
        (
            "inpainting",
            true,
            Inpainting {
                prompt: prompt("a yellow circle on a blue background"),
                image: start.clone(),
                mask,
                mask_blur: None,
                latents: None,
                prior_latents: None,
            }
            .into(),
        ),
        (
            "variations",
            false,
            Variations {
                image: start.clone(),
                latents: None,
            }
            .into(),
        ),
        (
            "mixing",
            false,
            Mixing {
                inputs: vec![
                    (MixInput::Text("a green square".into()), 0.5),
                    (MixInput::Image(start.clone()), 0.5),
                ],
                latents: None,
            }
            .into(),
        ),
    ];
    let mut failures = Vec::new();
    for (name, inpaint, mode) in modes {
        let reference = run(DType::F32, inpaint, params(mode.clone()));
        for dtype in [DType::F16, DType::BF16] {
            let image = run(dtype, inpaint, params(mode.clone()));
            let diffs: Vec<u8> = image
                .data
                .iter()
                .zip(&reference.data)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let max = diffs.iter().copied().max().unwrap_or(0);
            let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
            let beyond_3 = diffs.iter().filter(|&&d| d > 3).count() as f64 / diffs.len() as f64;
            eprintln!(
                "{name} {dtype:?}: max {max}/255, mean {mean:.3}, beyond 3/255 {:.3} %",
                100.0 * beyond_3
            );
            // bf16 keeps 8 significant bits to f16's 11: its rounding errors are 8× larger.
            // Both are held to 3/255 on the mean difference; f16 to 3/255 and bf16 to 12/255 on
            // all but 0.5 % of the values; and every value to 16 (f16) or 64 (bf16). A run
            // whose sampler starts from an image or its embedding (image to image, variations)
            // can move one small patch at an edge further: with the model retrained on
            // 2026-12-05, bf16 image to image moves a 7×9-pixel patch of its triangle by up to
            // 27 (30 of 12,288 values beyond 12, mean 0.98), bf16 variations up to 49 (0.44 %
            // beyond 12, mean 1.19), f16 variations a few values up to 12 (0.11 % beyond 3).
            // A wrong precision somewhere moves the mean and many values instead.
            let (tier, max_ok) = if dtype == DType::F16 {
                (3, 16)
            } else {
                (12, 64)
            };
            let beyond = diffs.iter().filter(|&&d| d > tier).count() as f64 / diffs.len() as f64;
            if !(max <= max_ok && mean <= 3.0 && beyond <= 0.005) {
                failures.push(format!(
                    "{name} in {dtype:?}: max {max}/255, mean {mean:.3}/255, {:.3} % beyond {tier}/255 from f32",
                    100.0 * beyond
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A batch larger than one run's memory budget runs in parts, each drawing from the generator in
/// turn; a batch within it gives `generate`'s images exactly.
#[test]
fn large_batches_run_in_parts_that_fit() {
    let dir = fixtures().join("pipelines");
    let pipe = |budget| {
        AutoPipeline::from_pretrained(
            &dir.join("tiny-2-2-decoder"),
            &dir.join("tiny-2-2-prior"),
            LoadOptions {
                batch_latent_pixels: budget,
                ..LoadOptions::default()
            },
        )
        .unwrap()
    };
    let many = |n| {
        let mut r = request(None);
        r.params.num_images = n;
        r
    };
    // The latent pixels of one 64 px image, from the plan under a budget of 2^20.
    let latent_pixels = (1 << 20) / pipe(1 << 20).check(&many(1)).unwrap().images_per_run;
    let mut small = pipe(2 * latent_pixels);
    assert_eq!(small.check(&many(5)).unwrap().images_per_run, 2);
    let mut got = Vec::new();
    small
        .generate_chunked(
            many(5),
            &mut TorchGenerator::new(3),
            &mut |_, _, _| {},
            &mut |i, image| {
                got.push((i, image));
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    // The parts are runs of 2, 2 and 1 from one generator.
    let mut generator = TorchGenerator::new(3);
    let mut want = Vec::new();
    for n in [2, 2, 1] {
        want.extend(
            pipe(usize::MAX)
                .generate(many(n), &mut generator, &mut |_, _, _| {})
                .unwrap(),
        );
    }
    assert!(got.iter().map(|g| &g.1).eq(want.iter()));
    // Within the budget: exactly `generate`.
    let mut got = Vec::new();
    pipe(usize::MAX)
        .generate_chunked(
            many(3),
            &mut TorchGenerator::new(3),
            &mut |_, _, _| {},
            &mut |_, image| {
                got.push(image);
                Ok(())
            },
        )
        .unwrap();
    let want = pipe(usize::MAX)
        .generate(many(3), &mut TorchGenerator::new(3), &mut |_, _, _| {})
        .unwrap();
    assert_eq!(got, want);
    // Given latents are for one run: refused when the batch needs several.
    let mut r = many(5);
    if let kandinsky::pipelines::auto_pipeline::Mode::TextToImage(m) = &mut r.mode {
        m.latents = Some(
            candle_core::Tensor::zeros(
                (5, 4, 8, 8),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        );
    }
    let err = small.check(&r).unwrap_err().to_string();
    assert!(err.contains("do not fit in one run"), "{err}");
}
