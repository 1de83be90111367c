//! Our small model is the CLI's default and matches diffusers.

mod common;
use common::*;

/// Our small model (`models/small`), run through the CLI with every default (no `--model`,
/// `--prior`, size or sampler flags; `--model small-2-2` for the 2.2 sibling's cases), against
/// what diffusers' own pipelines generate from the same directories (`tools/make_fixtures.py
/// small_model`): at most 2 levels apart per pixel.
#[test]
fn small_model_is_the_default_and_matches_diffusers() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixture("small_model/cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() >= 3);
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
        match case["model"].as_str().unwrap_or("small") {
            "small" => {}
            model => args.extend(strings(&["--model", model])),
        }
        if mode == "controlnet" {
            args.extend(strings(&[
                "--hint",
                &fixture("small_model/controlnet_hint.png"),
            ]));
        }
        if mode == "inpaint" {
            args.extend(strings(&[
                "--image",
                &fixture("small_model/inpaint_image.png"),
                "--mask",
                &fixture("small_model/inpaint_mask.png"),
                "--no-overlay",
            ]));
        }
        run_ok(&args, &out);
        assert_png_matches_in(&out, "small_model/references.safetensors", name);
    }
}
