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
