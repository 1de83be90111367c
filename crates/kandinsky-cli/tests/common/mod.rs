//! Helpers shared by the `kandinsky` CLI integration tests.
// Each test file is its own crate and uses only a subset of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kandinsky"))
}

pub fn movq() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/movq/topo")
        .display()
        .to_string()
}

pub fn fixture(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(p)
        .display()
        .to_string()
}

pub fn generate_args() -> Vec<String> {
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

pub fn common_args(version: &str, seed: &str) -> Vec<String> {
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
pub fn assert_png_matches_in(out: &std::path::Path, file: &str, key: &str) {
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

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// `--model`/`--prior` of a tiny fixture pipeline, 64x64, with steps and seed.
pub fn tiny(model: &str, prior: &str, steps: &str, prior_steps: &str, seed: &str) -> Vec<String> {
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

pub fn run_ok(args: &[String], out: &std::path::Path) {
    let res = bin().args(args).arg("--output").arg(out).output().unwrap();
    assert!(
        res.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
}

/// Runs and expects a clean failure whose message contains `needle`, with no output file.
pub fn run_fails(args: &[String], out: &std::path::Path, needle: &str) {
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

/// A `kandinsky serve` child on a free loopback port, killed on drop.
pub struct Serve {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kandinsky serve` with `extra` flags and waits until it answers.
pub fn serve(extra: &[&str]) -> Serve {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = bin()
        .args(["serve", "--port", &port.to_string()])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let start = std::time::Instant::now();
    while ureq::get(&format!("{url}/api/v1/models")).call().is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Serve { child, url }
}
