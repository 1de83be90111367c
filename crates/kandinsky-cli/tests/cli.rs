//! The `kandinsky` binary: the README's decode command works, and bad input fails cleanly.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kandinsky"))
}

fn movq() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/movq/topo")
        .display()
        .to_string()
}

#[test]
fn decode_writes_a_png_of_the_latent_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let status = bin()
        .args([
            "decode",
            "--movq",
            &movq(),
            "--latent-size",
            "4",
            "--seed",
            "3",
            "--output",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    // Same seed, same image.
    let out2 = dir.path().join("img2.png");
    bin()
        .args([
            "decode",
            "--movq",
            &movq(),
            "--latent-size",
            "4",
            "--seed",
            "3",
            "--output",
        ])
        .arg(&out2)
        .status()
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

#[test]
fn bad_input_fails_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    for args in [
        vec!["decode", "--movq", "/no/such/model"],
        vec!["decode", "--movq", "org/not-in-cache"],
        vec!["decode", "--latent-size", "0"],
    ] {
        let mut cmd = bin();
        cmd.args(&args)
            .arg("--output")
            .arg(&out)
            .env("HF_HUB_CACHE", dir.path());
        if !args.contains(&"--movq") {
            cmd.args(["--movq", &movq()]);
        }
        let res = cmd.output().unwrap();
        assert!(!res.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("Stack backtrace"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} left an output file");
    }
}

fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
        .display()
        .to_string()
}

fn generate_args() -> Vec<String> {
    [
        "generate",
        "--model",
        &fixture("pipelines/tiny-2-2-decoder"),
        "--prior",
        &fixture("pipelines/tiny-2-2-prior"),
        "--prompt",
        "a red cat",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "5",
        "--prior-steps",
        "3",
        "--seed",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
/// Compared as PNGs, as the issue defines it: diffusers' PIL output is `round(x · 255)`.
fn generate_matches_diffusers_and_records_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    let res = bin()
        .args(generate_args())
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_png_matches_in(&out, "pipelines/e2e_2_2.safetensors", "t2i_default");
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.contains("parameters") && text.contains("Seed: 0") && text.contains("a red cat"),
        "no parameters chunk"
    );
}

#[test]
fn generate_rejects_bad_input_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let cases: Vec<(&str, &str)> = vec![
        ("--steps", "0"),
        ("--prior-steps", "0"),
        ("--guidance", "NaN"),
        ("--guidance", "-1"),
        ("--prior-guidance", "inf"),
        ("--width", "20000"),
        ("--num-images", "0"),
        ("--model", "/no/such/dir"),
    ];
    for (flag, value) in cases {
        let mut args = generate_args();
        if let Some(i) = args.iter().position(|a| a == flag) {
            args[i + 1] = value.to_string();
        } else {
            args.extend([flag.to_string(), value.to_string()]);
        }
        let res = bin()
            .args(&args)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{flag} {value} succeeded");
        assert!(err.contains("error"), "{flag} {value}: {err}");
        assert!(!out.exists(), "{flag} {value} left an output file");
    }
    // A model directory missing a part names it.
    let broken = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("pipelines/tiny-2-2-decoder/model_index.json"),
        broken.path().join("model_index.json"),
    )
    .unwrap();
    let mut args = generate_args();
    let i = args.iter().position(|a| a == "--model").unwrap();
    args[i + 1] = broken.path().display().to_string();
    let res = bin()
        .args(&args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("'unet'"), "{err}");
    assert!(!out.exists());
}

#[test]
fn generate_2_1_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat21.png");
    let mut args = generate_args();
    for (flag, value) in [
        ("--model", fixture("pipelines/tiny-2-1")),
        ("--prior", fixture("pipelines/tiny-2-1-prior")),
    ] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value;
    }
    let res = bin()
        .args(&args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_png_matches_in(&out, "pipelines/e2e_2_1.safetensors", "t2i_default");
}

fn common_args(version: &str, seed: &str) -> Vec<String> {
    let (model, prior) = if version == "2_2" {
        ("pipelines/tiny-2-2-decoder", "pipelines/tiny-2-2-prior")
    } else {
        ("pipelines/tiny-2-1", "pipelines/tiny-2-1-prior")
    };
    [
        "--model",
        &fixture(model),
        "--prior",
        &fixture(prior),
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "4",
        "--prior-steps",
        "3",
        "--seed",
        seed,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Our PNG against diffusers' image `key` of a reference file, both as PNGs (`round(x · 255)`):
/// at most 2 levels apart per pixel.
fn assert_png_matches_in(out: &std::path::Path, file: &str, key: &str) {
    let img = image::open(out).unwrap().to_rgb8();
    let reference =
        candle_core::safetensors::load(fixture(file), &candle_core::Device::Cpu).unwrap();
    let want: Vec<f32> = reference[key].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(want.len(), img.as_raw().len(), "{key}");
    let worst = img
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(&p, &w)| (p as f32 - (w * 255.0).round()).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 2.0, "{key}: max pixel difference {worst}/255");
}

#[test]
fn mix_and_variations_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let flower = fixture("images/photo_flower.png");
    for version in ["2_1", "2_2"] {
        let out = dir.path().join(format!("mix{version}.png"));
        let mut args = vec!["mix".to_string()];
        args.extend(common_args(version, "21"));
        for (input, weight) in [
            ("a red circle", "0.3"),
            (flower.as_str(), "0.5"),
            ("a blue square", "0.2"),
        ] {
            args.extend([
                "--input".into(),
                input.into(),
                "--weight".into(),
                weight.into(),
            ]);
        }
        let res = bin()
            .args(&args)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_png_matches_in(
            &out,
            "pipelines/e2e_mix.safetensors",
            &format!("{version}_mix"),
        );

        let out = dir.path().join(format!("var{version}.png"));
        let mut args = vec!["variations".to_string(), "--image".into(), flower.clone()];
        args.extend(common_args(version, "22"));
        let res = bin()
            .args(&args)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_png_matches_in(
            &out,
            "pipelines/e2e_mix.safetensors",
            &format!("{version}_variations"),
        );
    }
}

#[test]
fn mix_and_variations_reject_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"plain text").unwrap();
    let mut more_inputs = vec![
        "mix".to_string(),
        "--input".into(),
        "a".into(),
        "--input".into(),
        "b".into(),
        "--weight".into(),
        "1".into(),
    ];
    more_inputs.extend(common_args("2_2", "1"));
    let mut bad_weight = vec![
        "mix".to_string(),
        "--input".into(),
        "a".into(),
        "--weight".into(),
        "NaN".into(),
    ];
    bad_weight.extend(common_args("2_2", "1"));
    let mut bad_image = vec![
        "variations".to_string(),
        "--image".into(),
        not_an_image.display().to_string(),
    ];
    bad_image.extend(common_args("2_2", "1"));
    let mut missing_image = vec![
        "variations".to_string(),
        "--image".into(),
        "/no/such.png".into(),
    ];
    missing_image.extend(common_args("2_2", "1"));
    for args in [more_inputs, bad_weight, bad_image, missing_image] {
        let res = bin()
            .args(&args)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success() && err.starts_with("error: "),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?} left an output file");
    }
}

#[test]
fn img2img_matches_diffusers_and_rejects_bad_strength() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("i2i.png");
    let base = |strength: &str| {
        let mut args: Vec<String> = ["img2img", "--prompt", "a red circle", "--image"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(fixture("images/drawing_64x64.png"));
        args.extend(["--strength".to_string(), strength.to_string()]);
        let mut c = common_args("2_2", "31");
        let i = c.iter().position(|a| a == "--steps").unwrap();
        c[i + 1] = "10".into();
        args.extend(c);
        args
    };
    let res = bin()
        .args(base("0.5"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_png_matches_in(&out, "pipelines/e2e_img2img_2_2.safetensors", "same_size");
    std::fs::remove_file(&out).unwrap();
    for bad in ["0", "-0.5", "1.5", "NaN"] {
        let res = bin()
            .args(base(bad))
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(
            !res.status.success() && err.contains("strength"),
            "{bad}: {err}"
        );
        assert!(!out.exists());
    }
}

#[test]
fn img2img_2_1_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("i2i21.png");
    let mut args: Vec<String> = [
        "img2img",
        "--prompt",
        "a red circle",
        "--strength",
        "0.5",
        "--image",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(fixture("images/drawing_64x64.png"));
    let mut c = common_args("2_1", "31");
    let i = c.iter().position(|a| a == "--steps").unwrap();
    c[i + 1] = "10".into();
    args.extend(c);
    let res = bin()
        .args(&args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_png_matches_in(&out, "pipelines/e2e_img2img_2_1.safetensors", "same_size");
}
