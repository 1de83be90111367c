//! Text-to-image `generate` (2.2, 2.1, user latents, other samplers) against diffusers; bad input.

mod common;
use common::*;

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
