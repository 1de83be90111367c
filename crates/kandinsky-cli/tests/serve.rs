//! `kandinsky serve` as a user starts it: the same parameters and seed give the same pixels as
//! `kandinsky generate` / `inpaint` (default small model), and bad flags exit with an error.

mod common;

use base64::Engine;
use common::{bin, fixture, run_ok, serve, strings};
use serde_json::{json, Value};

fn job(url: &str, body: Value) -> image::RgbImage {
    let mut r = ureq::post(&format!("{url}/api/v1/jobs?wait=true"))
        .header("Content-Type", "application/json")
        .send(body.to_string().as_bytes())
        .unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["state"], "done", "{v}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["result"]["images"][0].as_str().unwrap())
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

fn b64_file(path: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
}

#[test]
fn the_server_gives_the_cli_pixels() {
    let s = serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a small red circle on the left on a white background";
    for sampler in ["default", "euler-a"] {
        let out = dir.path().join(format!("t2i-{sampler}.png"));
        run_ok(
            &strings(&[
                "generate",
                "--prompt",
                prompt,
                "--seed",
                "9",
                "--steps",
                "12",
                "--prior-steps",
                "6",
                "--scheduler",
                sampler,
            ]),
            &out,
        );
        let cli = image::open(&out).unwrap().to_rgb8();
        let served = job(
            &s.url,
            json!({"prompt": prompt, "seed": 9, "steps": 12, "prior_steps": 6, "sampler": sampler}),
        );
        assert_eq!(cli, served, "text-to-image with {sampler}");
    }
    let (image, mask) = (
        fixture("small_model/inpaint_image.png"),
        fixture("small_model/inpaint_mask.png"),
    );
    let out = dir.path().join("inpaint.png");
    let mut args = strings(&[
        "inpaint",
        "--prompt",
        prompt,
        "--seed",
        "4",
        "--steps",
        "12",
        "--prior-steps",
        "6",
        "--image",
    ]);
    args.extend([image.clone(), "--mask".into(), mask.clone()]);
    run_ok(&args, &out);
    let cli = image::open(&out).unwrap().to_rgb8();
    let served = job(
        &s.url,
        json!({"mode": "inpainting", "prompt": prompt, "seed": 4, "steps": 12, "prior_steps": 6,
               "image": b64_file(&image), "mask": b64_file(&mask)}),
    );
    assert_eq!(cli, served, "inpainting (mask blur 4 on both sides)");
}

#[test]
fn serve_refuses_bad_flags() {
    let out = bin()
        .args([
            "serve",
            "--model",
            "/no/such/model",
            "--prior",
            "/no/such/prior",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model"), "{err}");
    let out = bin().args(["serve", "--queue", "0"]).output().unwrap();
    assert!(!out.status.success());
}
