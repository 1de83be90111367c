//! CLIP image preprocessing against transformers' `CLIPImageProcessor` on photos and drawings of
//! several sizes and aspect ratios (within 1e-2 per normalised pixel; in practice exact).

mod common;

use candle_core::{Device, IndexOp};
use common::{fixtures, load_io};
use kandinsky::clip_image_processor::ClipImageProcessor;
use kandinsky::models::clip::ClipVisionModelWithProjection;

#[test]
fn matches_transformers() {
    let dir = fixtures().join("images");
    let proc =
        ClipImageProcessor::load(&dir.join("image_processor/preprocessor_config.json")).unwrap();
    let reference = load_io(&dir.join("pixel_values.safetensors"));
    assert!(reference.len() >= 8);
    for (name, want) in &reference {
        let img = image::open(dir.join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let ours = proc.preprocess(w, h, img.as_raw(), &Device::Cpu).unwrap();
        assert_eq!(ours.dims(), want.dims(), "{name}");
        let want = want.to_dtype(candle_core::DType::F32).unwrap();
        let diff = (ours - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        println!("{name} ({w}x{h}): max abs difference {diff:.2e}");
        assert!(diff <= 1e-2, "{name}: max abs difference {diff}");
    }
}

#[test]
fn default_processor_is_the_kandinsky_one() {
    let dir = fixtures().join("images");
    let loaded =
        ClipImageProcessor::load(&dir.join("image_processor/preprocessor_config.json")).unwrap();
    let img = image::open(dir.join("photo_flower.png")).unwrap().to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let a = loaded.preprocess(w, h, img.as_raw(), &Device::Cpu).unwrap();
    let b = ClipImageProcessor::default()
        .preprocess(w, h, img.as_raw(), &Device::Cpu)
        .unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn zero_image_embedding_is_computed_once_and_matches() {
    let d = fixtures().join("encoders/clip_vision_2_2");
    let model =
        ClipVisionModelWithProjection::load(&d, candle_core::DType::F32, &Device::Cpu).unwrap();
    let io = load_io(&d.join("io.safetensors"));
    // The fixture's third image is all zeros.
    let want = io["image_embeds"].i(2..3).unwrap();
    let first = model.zero_image_embeds().unwrap();
    common::assert_close("zero image embedding", &first, &want);
    let again = model.zero_image_embeds().unwrap();
    assert_eq!(
        first.id(),
        again.id(),
        "the second call must return the cached tensor"
    );
}

/// Pillow's `resize` as diffusers calls it: bicubic with `reducing_gap=1` (image preprocessing;
/// `Image.reduce` first when shrinking 2× or more, then a fractional-box resample) and Lanczos
/// (inpainting masks), on photos and drawings, shrinking and enlarging: every byte equal.
#[test]
fn pillow_resize_with_reducing_gap_matches() {
    use kandinsky::clip_image_processor::{resize_rgb8_reducing_gap, Filter};
    let reference = candle_core::safetensors::load(
        fixtures().join("images/resized.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(reference.len(), 11);
    let mut bad = 0;
    for (key, want) in &reference {
        let parts: Vec<&str> = key.rsplitn(4, '_').collect();
        let (gap, filter, size, name) = (parts[0], parts[1], parts[2], parts[3]);
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
        let filter = if filter == "bicubic" {
            Filter::Bicubic
        } else {
            Filter::Lanczos
        };
        let gap = gap.parse::<f64>().ok();
        let img = kandinsky::vae_image_processor::read_rgb8(
            &fixtures().join(format!("images/{name}.png")),
        )
        .unwrap();
        let ours = resize_rgb8_reducing_gap(img.width, img.height, &img.data, w, h, filter, gap);
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        let differing = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(ours.len(), want.len(), "{key}");
        let worst = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        println!("{key}: {differing} bytes differ, worst {worst}");
        bad += (differing > 0) as usize;
    }
    assert_eq!(bad, 0);
}
