//! mix, variations, img2img, inpaint, outpaint and ControlNet against diffusers; their bad input.

mod common;
use common::*;

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
        args.extend(strings(&[
            "--width",
            "64",
            "--height",
            "64",
            "--no-overlay",
        ]));
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
        args.push("--no-overlay".into());
        args.extend(tiny(model, prior, "4", "3", "44"));
        run_ok(&args, &out);
        assert_png_matches_in(
            &out,
            "pipelines/e2e_inpaint.safetensors",
            &format!("{version}_outpaint"),
        );
    }
}

/// By default the input is pasted back outside the blurred mask (A1111's overlay): those pixels
/// equal the input exactly, and deep inside the mask the pixels are diffusers' output.
#[test]
fn inpaint_keeps_the_unmasked_part() {
    let dir = tempfile::tempdir().unwrap();
    let (model, prior) = ("pipelines/tiny-2-1-inpaint", "pipelines/tiny-2-1-prior");
    let run = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let mut args = strings(&["inpaint", "--prompt", "a red cat", "--image"]);
        args.push(fixture("images/drawing_64x64.png"));
        args.push("--mask".into());
        args.push(fixture("images/mask_64x64.png"));
        args.extend(strings(&["--width", "64", "--height", "64"]));
        args.extend(strings(extra));
        args.extend(tiny(model, prior, "4", "3", "41"));
        run_ok(&args, &out);
        image::open(&out).unwrap().to_rgb8()
    };
    let raw = run(&["--no-overlay"], "raw.png");
    let kept = run(&["--mask-blur", "2"], "kept.png");
    let input = image::open(fixture("images/drawing_64x64.png"))
        .unwrap()
        .to_rgb8();
    let mask = image::open(fixture("images/mask_64x64.png"))
        .unwrap()
        .to_luma8();
    // σ = 2 reaches 5 pixels (kernel radius ⌊2.5σ + 0.5⌋); the inner half of the ramp (more
    // than 2 pixels inside) is fully repainted.
    let dist = |x: u32, y: u32, repaint: bool| -> u32 {
        let mut best = u32::MAX;
        for (mx, my, p) in mask.enumerate_pixels() {
            if (p[0] > 128) != repaint {
                best = best.min(mx.abs_diff(x).max(my.abs_diff(y)));
            }
        }
        best
    };
    let (mut outside, mut inside, mut changed_raw) = (0, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        let repaint = p[0] > 128;
        if !repaint && dist(x, y, false) > 6 {
            assert_eq!(kept.get_pixel(x, y), input.get_pixel(x, y), "({x},{y})");
            changed_raw += (raw.get_pixel(x, y) != input.get_pixel(x, y)) as usize;
            outside += 1;
        }
        if repaint && dist(x, y, true) > 6 {
            assert_eq!(kept.get_pixel(x, y), raw.get_pixel(x, y), "({x},{y})");
            inside += 1;
        }
    }
    assert!(outside > 100 && inside > 100, "{outside} {inside}");
    // Without the overlay the kept part does change (what the overlay is for).
    assert!(changed_raw > outside / 2, "{changed_raw} of {outside}");
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
