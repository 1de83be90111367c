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
    std::os::unix::fs::symlink(fixture("movq/dummy"), broken.path().join("movq")).unwrap();
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
    let want: Vec<f32> = reference[key]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(want.len(), img.as_raw().len(), "{key}");
    let worst = img
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(&p, &w)| (p as f32 - (w * 255.0).round()).abs())
        .fold(0f32, f32::max);
    println!("{key}: max PNG difference {worst}/255");
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

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `--model`/`--prior` of a tiny fixture pipeline, 64x64, with steps and seed.
fn tiny(model: &str, prior: &str, steps: &str, prior_steps: &str, seed: &str) -> Vec<String> {
    strings(&[
        "--model",
        &fixture(model),
        "--prior",
        &fixture(prior),
        "--steps",
        steps,
        "--prior-steps",
        prior_steps,
        "--seed",
        seed,
    ])
}

fn run_ok(args: &[String], out: &std::path::Path) {
    let res = bin().args(args).arg("--output").arg(out).output().unwrap();
    assert!(
        res.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Runs and expects a clean failure whose message contains `needle`, with no output file.
fn run_fails(args: &[String], out: &std::path::Path, needle: &str) {
    let res = bin().args(args).arg("--output").arg(out).output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{args:?} succeeded");
    assert!(err.contains("error"), "{args:?}: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected '{needle}' in: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    assert!(!out.exists(), "{args:?} left an output file");
}

#[test]
fn inpaint_and_outpaint_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    for (version, model, prior) in [
        (
            "2_2",
            "pipelines/tiny-2-2-inpaint",
            "pipelines/tiny-2-2-prior",
        ),
        (
            "2_1",
            "pipelines/tiny-2-1-inpaint",
            "pipelines/tiny-2-1-prior",
        ),
    ] {
        let out = dir.path().join(format!("inpaint{version}.png"));
        let mut args = strings(&["inpaint", "--prompt", "a red cat", "--image"]);
        args.push(fixture("images/drawing_64x64.png"));
        args.push("--mask".into());
        args.push(fixture("images/mask_64x64.png"));
        args.extend(strings(&["--width", "64", "--height", "64"]));
        args.extend(tiny(model, prior, "4", "3", "41"));
        run_ok(&args, &out);
        assert_png_matches_in(
            &out,
            "pipelines/e2e_inpaint.safetensors",
            &format!("{version}_default"),
        );
        // The 48x48 drawing grown by 16 px on the left and 8 on top and bottom: a 64x64 canvas.
        let out = dir.path().join(format!("outpaint{version}.png"));
        let mut args = strings(&["outpaint", "--prompt", "a red circle", "--image"]);
        args.push(fixture("images/drawing_48x48.png"));
        args.extend(strings(&["--left", "16", "--top", "8", "--bottom", "8"]));
        args.extend(tiny(model, prior, "4", "3", "44"));
        run_ok(&args, &out);
        assert_png_matches_in(
            &out,
            "pipelines/e2e_inpaint.safetensors",
            &format!("{version}_outpaint"),
        );
    }
}

#[test]
fn controlnet_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let model = "pipelines/tiny-2-2-controlnet";
    let prior = "pipelines/tiny-2-2-prior";
    let out = dir.path().join("cn.png");
    let mut args = strings(&["controlnet", "--prompt", "a red cat", "--hint"]);
    args.push(fixture("images/hint_64x64.png"));
    args.extend(strings(&["--width", "64", "--height", "64"]));
    args.extend(tiny(model, prior, "4", "3", "51"));
    run_ok(&args, &out);
    assert_png_matches_in(&out, "pipelines/e2e_controlnet.safetensors", "default");
    // ControlNet image-to-image with the prior's emb2emb from the same image.
    let out = dir.path().join("cn_i2i.png");
    let mut args = strings(&["controlnet", "--prompt", "a red circle", "--hint"]);
    args.push(fixture("images/hint_64x64.png"));
    args.push("--image".into());
    args.push(fixture("images/drawing_64x64.png"));
    args.extend(strings(&[
        "--strength",
        "0.5",
        "--prior-strength",
        "0.6",
        "--width",
        "64",
        "--height",
        "64",
    ]));
    args.extend(tiny(model, prior, "6", "4", "56"));
    run_ok(&args, &out);
    assert_png_matches_in(
        &out,
        "pipelines/e2e_controlnet.safetensors",
        "img2img_emb2emb",
    );
}

#[test]
fn user_latents_and_other_samplers_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lat.png");
    let mut args = strings(&[
        "generate",
        "--prompt",
        "a red cat",
        "--width",
        "64",
        "--height",
        "64",
    ]);
    args.extend(tiny(
        "pipelines/tiny-2-2-decoder",
        "pipelines/tiny-2-2-prior",
        "5",
        "3",
        "61",
    ));
    args.push("--prior-latents".into());
    args.push(fixture("pipelines/prior_latents_2_2.safetensors"));
    args.push("--latents".into());
    args.push(fixture("pipelines/latents_2_2.safetensors"));
    run_ok(&args, &out);
    assert_png_matches_in(&out, "pipelines/e2e_extras.safetensors", "latents_2_2");
    for (version, model, prior) in [
        (
            "2_2",
            "pipelines/tiny-2-2-decoder",
            "pipelines/tiny-2-2-prior",
        ),
        ("2_1", "pipelines/tiny-2-1", "pipelines/tiny-2-1-prior"),
    ] {
        for (scheduler, steps, seed, key) in [
            ("ddim", "5", "65", "ddim"),
            ("dpm++2m", "6", "64", "dpmpp2m"),
        ] {
            let out = dir.path().join(format!("{key}{version}.png"));
            let mut args = strings(&[
                "generate",
                "--prompt",
                "a red cat",
                "--width",
                "64",
                "--height",
                "64",
            ]);
            args.extend(tiny(model, prior, steps, "3", seed));
            args.extend(strings(&["--scheduler", scheduler]));
            run_ok(&args, &out);
            assert_png_matches_in(
                &out,
                "pipelines/e2e_extras.safetensors",
                &format!("{key}_{version}"),
            );
        }
    }
}

#[test]
fn new_modes_reject_bad_input_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let inpaint = |extra: &[&str], image: &str, mask: &str, model: &str| {
        let mut a = strings(&["inpaint", "--prompt", "a cat", "--image"]);
        a.push(fixture(image));
        a.push("--mask".into());
        a.push(fixture(mask));
        a.extend(tiny(model, "pipelines/tiny-2-2-prior", "2", "2", "1"));
        a.extend(strings(&["--height", "64"]));
        if !extra.contains(&"--width") {
            a.extend(strings(&["--width", "64"]));
        }
        a.extend(strings(extra));
        a
    };
    let m = "pipelines/tiny-2-2-inpaint";
    // Mask and image of different sizes.
    run_fails(
        &inpaint(&[], "images/drawing_64x64.png", "images/hint_128x64.png", m),
        &out,
        "same size",
    );
    // A size that is not a multiple of the latent grid (4 pixels for the tiny MoVQ).
    run_fails(
        &inpaint(
            &["--width", "66"],
            "images/drawing_64x64.png",
            "images/mask_64x64.png",
            m,
        ),
        &out,
        "multiples of 4",
    );
    // A decoder of the wrong kind.
    run_fails(
        &inpaint(
            &[],
            "images/drawing_64x64.png",
            "images/mask_64x64.png",
            "pipelines/tiny-2-2-decoder",
        ),
        &out,
        "inpainting decoder",
    );
    // Unreadable mask.
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"plain text").unwrap();
    let mut a = inpaint(&[], "images/drawing_64x64.png", "images/mask_64x64.png", m);
    let i = a.iter().position(|x| x == "--mask").unwrap();
    a[i + 1] = not_an_image.display().to_string();
    run_fails(&a, &out, "mask");
    // Wrong latents shape.
    let mut a = inpaint(&[], "images/drawing_64x64.png", "images/mask_64x64.png", m);
    a.push("--latents".into());
    a.push(fixture("pipelines/prior_latents_2_2.safetensors"));
    run_fails(&a, &out, "latents must have shape");
    // Outpainting without margins, and with a canvas off the grid.
    let outpaint = |extra: &[&str]| {
        let mut a = strings(&["outpaint", "--prompt", "a cat", "--image"]);
        a.push(fixture("images/drawing_48x48.png"));
        a.extend(tiny(m, "pipelines/tiny-2-2-prior", "2", "2", "1"));
        a.extend(strings(extra));
        a
    };
    run_fails(&outpaint(&[]), &out, "margin");
    run_fails(&outpaint(&["--left", "3"]), &out, "multiples of 4");
    // ControlNet: bad strength, --prior-strength without an image, missing hint, wrong model.
    let controlnet = |extra: &[&str], model: &str| {
        let mut a = strings(&["controlnet", "--prompt", "a cat", "--hint"]);
        a.push(fixture("images/hint_64x64.png"));
        a.extend(strings(&["--width", "64", "--height", "64"]));
        a.extend(tiny(model, "pipelines/tiny-2-2-prior", "2", "2", "1"));
        a.extend(strings(extra));
        a
    };
    let c = "pipelines/tiny-2-2-controlnet";
    let img = fixture("images/drawing_64x64.png");
    run_fails(
        &controlnet(&["--image", &img, "--strength", "1.5"], c),
        &out,
        "strength",
    );
    run_fails(
        &controlnet(&["--prior-strength", "0.5"], c),
        &out,
        "--image",
    );
    run_fails(
        &controlnet(&[], "pipelines/tiny-2-2-decoder"),
        &out,
        "ControlNet decoder",
    );
    let mut a = controlnet(&[], c);
    let i = a.iter().position(|x| x == "--hint").unwrap();
    a[i + 1] = "/no/such/hint.png".into();
    run_fails(&a, &out, "hint");
    // --latents with image-to-image, --prior-latents with mixing.
    run_fails(
        &controlnet(
            &[
                "--image",
                &img,
                "--latents",
                &fixture("pipelines/latents_2_2.safetensors"),
            ],
            c,
        ),
        &out,
        "--latents",
    );
    // --prior without a preset is required.
    let a = strings(&[
        "generate",
        "--prompt",
        "x",
        "--model",
        &fixture("pipelines/tiny-2-2-decoder"),
    ]);
    run_fails(&a, &out, "--prior");
}

#[test]
fn train_movq_writes_a_checkpoint_resumes_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = |steps: &str| {
        strings(&[
            "train",
            "movq",
            "--out",
            &out.display().to_string(),
            "--steps",
            steps,
            "--batch",
            "1",
            "--checkpoint-every",
            "1",
        ])
    };
    let res = bin().args(args("2")).output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(out.join("checkpoint.safetensors").is_file());
    assert!(out.join("movq/config.json").is_file());
    let res = bin().args(args("3")).output().unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success() && stdout.contains("steps 2..3"),
        "{stdout}"
    );
    // The exported MoVQ decodes like any diffusers MoVQ.
    let png = dir.path().join("d.png");
    let res = bin()
        .args(["decode", "--movq", &out.join("movq").display().to_string()])
        .args(["--latent-size", "4", "--seed", "1", "--output"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // Bad input.
    let res = bin().args(args("0")).output().unwrap();
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("at least 1"));
}

#[test]
fn train_clip_exports_towers_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&out)
        .args(["--steps", "2", "--batch", "4", "--tokenizer"])
        .arg(fixture("tokenizers/clip"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let d = candle_core::Device::Cpu;
    kandinsky::models::clip::ClipTextModelWithProjection::load(
        &out.join("text_encoder"),
        candle_core::DType::F32,
        &d,
    )
    .unwrap();
    kandinsky::models::clip::ClipVisionModelWithProjection::load(
        &out.join("image_encoder"),
        candle_core::DType::F32,
        &d,
    )
    .unwrap();
    // A missing vocabulary is a clear error.
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(dir.path().join("x"))
        .args(["--steps", "1", "--tokenizer", "/no/such/dir"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("CLIP vocabulary"),
        "{err}"
    );
}

#[test]
fn train_prior_against_a_trained_clip() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let tok = fixture("tokenizers/clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&clip)
        .args(["--steps", "1", "--batch", "2", "--tokenizer", &tok])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let prior = dir.path().join("prior");
    let res = bin()
        .args(["train", "prior", "--out"])
        .arg(&prior)
        .arg("--clip")
        .arg(&clip)
        .args(["--steps", "2", "--batch", "4", "--tokenizer", &tok])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    kandinsky::models::transformers::prior_transformer::PriorTransformer::load(
        &prior.join("prior"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // Without a trained CLIP it says so.
    let res = bin()
        .args(["train", "prior", "--out"])
        .arg(dir.path().join("p2"))
        .args([
            "--clip",
            "/no/such/clip",
            "--steps",
            "1",
            "--tokenizer",
            &tok,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("trained CLIP"),
        "{err}"
    );
}

#[test]
fn train_mclip_exports_an_encoder_and_tokenizer_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip");
    let tok = fixture("tokenizers/clip");
    let res = bin()
        .args(["train", "clip", "--out"])
        .arg(&clip)
        .args(["--steps", "1", "--batch", "2", "--tokenizer", &tok])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let out = dir.path().join("mclip");
    let res = bin()
        .args(["train", "mclip", "--out"])
        .arg(&out)
        .arg("--clip")
        .arg(&clip)
        .args([
            "--steps",
            "2",
            "--batch",
            "4",
            "--tokenizer",
            &tok,
            "--pieces",
        ])
        .arg(fixture("tokenizers/xlm_roberta/pieces.tsv.gz"))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    kandinsky::pipelines::kandinsky::text_encoder::MultilingualClip::load(
        &out.join("text_encoder"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    kandinsky::tokenization::PromptTokenizer::xlm_roberta_from_dir(&out.join("tokenizer")).unwrap();
}

/// The decoder stages chain: MoVQ, CLIP and M-CLIP outputs feed the UNet and inpainting UNet.
#[test]
fn train_unet_and_inpainting_unet_on_trained_encoders() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let tok = fixture("tokenizers/clip");
    let pieces = fixture("tokenizers/xlm_roberta/pieces.tsv.gz");
    let runs: Vec<Vec<String>> = vec![
        strings(&[
            "train",
            "movq",
            "--out",
            &p("movq"),
            "--steps",
            "1",
            "--batch",
            "1",
        ]),
        strings(&[
            "train",
            "clip",
            "--out",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--tokenizer",
            &tok,
        ]),
        strings(&[
            "train",
            "mclip",
            "--out",
            &p("mclip"),
            "--clip",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--tokenizer",
            &tok,
            "--pieces",
            &pieces,
        ]),
        strings(&[
            "train",
            "unet",
            "--out",
            &p("unet"),
            "--movq",
            &p("movq"),
            "--clip",
            &p("clip"),
            "--mclip",
            &p("mclip"),
            "--steps",
            "2",
            "--batch",
            "2",
            "--pool",
            "3",
            "--pool-cache",
            &p("pool.safetensors"),
        ]),
        strings(&[
            "train",
            "unet",
            "--inpaint",
            "--out",
            &p("inpaint"),
            "--movq",
            &p("movq"),
            "--clip",
            &p("clip"),
            "--mclip",
            &p("mclip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--pool",
            "3",
            "--init",
            &p("unet"),
        ]),
    ];
    let mut logs = vec![];
    for args in &runs {
        let res = bin().args(args).output().unwrap();
        let log = String::from_utf8_lossy(&res.stderr).to_string();
        assert!(res.status.success(), "{args:?}: {log}");
        logs.push(log);
    }
    // The UNet wrote the teachers' pool; the inpainting UNet (same teachers, seed and size) reused
    // it and trained to the same bits as with a freshly built pool; another size is not reused.
    assert!(
        logs[3].contains("teacher outputs for 3 examples in"),
        "{}",
        logs[3]
    );
    let mut cached = runs[4].clone();
    cached.extend(strings(&["--pool-cache", &p("pool.safetensors")]));
    let mut cached_out = cached.clone();
    cached_out[4] = p("inpaint-cached");
    let res = bin().args(&cached_out).output().unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success() && log.contains("reused from"), "{log}");
    let inpaint_weights = |d: &str| {
        std::fs::read(
            dir.path()
                .join(d)
                .join("unet/diffusion_pytorch_model.safetensors"),
        )
        .unwrap()
    };
    assert!(inpaint_weights("inpaint") == inpaint_weights("inpaint-cached"));
    let mut other = cached.clone();
    other[4] = p("inpaint-other");
    let at = other.iter().position(|a| a == "--pool").unwrap();
    other[at + 1] = "2".into();
    let res = bin().args(&other).output().unwrap();
    let log = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success() && log.contains("teacher outputs for 2 examples in"),
        "{log}"
    );
    for (d, ch) in [("unet", 4), ("inpaint", 9)] {
        let unet = kandinsky::models::UNet2DConditionModel::load(
            &dir.path().join(d).join("unet"),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert_eq!(unet.config().in_channels, ch);
    }
    // The inpainting UNet started from the text-to-image one: one small step away from it.
    let weights = |d: &str| {
        candle_core::safetensors::load(
            dir.path()
                .join(d)
                .join("unet/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (base, inpaint) = (weights("unet"), weights("inpaint"));
    let w = "conv_out.weight";
    let diff = (&inpaint[w] - &base[w]).unwrap().abs().unwrap();
    let max_diff = diff.max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = base[w]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max_diff < 0.1 * scale, "{max_diff} vs {scale}");
    assert_eq!(inpaint["conv_in.weight"].dims(), &[64, 9, 3, 3]);
    // The prior, then the assembled model directories generate through the ordinary commands.
    let more: Vec<Vec<String>> = vec![
        strings(&[
            "train",
            "prior",
            "--out",
            &p("prior"),
            "--clip",
            &p("clip"),
            "--steps",
            "1",
            "--batch",
            "2",
            "--tokenizer",
            &tok,
        ]),
        strings(&[
            "train",
            "assemble",
            "--runs",
            &p(""),
            "--out",
            &p("model"),
            "--tokenizer",
            &tok,
        ]),
    ];
    for args in more {
        let res = bin().args(&args).output().unwrap();
        assert!(
            res.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    let model = |d: &str| dir.path().join("model").join(d).display().to_string();
    let out = dir.path().join("gen.png");
    let common = strings(&[
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--prior-steps",
        "2",
        "--seed",
        "1",
    ]);
    let mut g = strings(&[
        "generate",
        "--prompt",
        "a small red circle on the left on a blue background",
    ]);
    g.extend(strings(&[
        "--model",
        &model("decoder"),
        "--prior",
        &model("prior"),
    ]));
    g.extend(common.clone());
    run_ok(&g, &out);
    assert_eq!(image::open(&out).unwrap().width(), 64);
    let mut i = strings(&[
        "inpaint",
        "--prompt",
        "большой зелёный треугольник сверху, фон белый",
        "--image",
    ]);
    i.push(fixture("images/drawing_64x64.png"));
    i.push("--mask".into());
    i.push(fixture("images/mask_64x64.png"));
    i.extend(strings(&[
        "--model",
        &model("decoder-inpaint"),
        "--prior",
        &model("prior"),
    ]));
    i.extend(common);
    run_ok(&i, &dir.path().join("inp.png"));
    // The evaluation runs on the assembled model and prints its table.
    let res = bin()
        .args([
            "eval",
            "shapes",
            "--model",
            &model("decoder"),
            "--prior",
            &model("prior"),
        ])
        .args([
            "--n",
            "4",
            "--batch",
            "2",
            "--steps",
            "2",
            "--prior-steps",
            "2",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        stdout.contains("| real images (analyser ceiling) | 8 | 100.0 %"),
        "{stdout}"
    );
    assert!(stdout.contains("generated, Russian"), "{stdout}");
}

/// Our small model (`models/small`), run through the CLI with every default (no `--model`,
/// `--prior`, size or sampler flags), against what diffusers' own pipelines generate from the
/// same directories (`tools/make_fixtures.py small_model`): at most 2 levels apart per pixel.
#[test]
fn small_model_is_the_default_and_matches_diffusers() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("small_model/cases.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mode = case["mode"].as_str().unwrap();
        let out = dir.path().join(format!("{name}.png"));
        let mut args = strings(&[
            mode,
            "--prompt",
            case["prompt"].as_str().unwrap(),
            "--seed",
            &case["seed"].to_string(),
        ]);
        if mode == "inpaint" {
            args.extend(strings(&[
                "--image",
                &fixture("small_model/inpaint_image.png"),
                "--mask",
                &fixture("small_model/inpaint_mask.png"),
            ]));
        }
        run_ok(&args, &out);
        assert_png_matches_in(&out, "small_model/references.safetensors", name);
    }
}
