//! The CLI with broken models and interrupted runs: a decoder whose weights are broken is refused
//! before the prior runs; a run killed (SIGTERM, SIGINT, SIGKILL) at any moment leaves only
//! complete PNGs under their final names.

mod common;

use common::{bin, fixture};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Copies a directory, following links (the fixtures share components through links).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if std::fs::metadata(e.path()).unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_broken_decoder_is_refused_before_the_prior_runs() {
    let dir = tempfile::tempdir().unwrap();
    let decoder = dir.path().join("decoder");
    copy_dir(Path::new(&fixture("pipelines/tiny-2-2-decoder")), &decoder);
    let weights = decoder.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    // `generate` with the copied decoder: (success, stderr, seconds).
    let generate = || {
        let start = Instant::now();
        let o = bin()
            .args(["generate", "--prompt", "a red cat", "--model"])
            .arg(&decoder)
            .arg("--prior")
            .arg(fixture("pipelines/tiny-2-2-prior"))
            .args(["--prior-steps", "400", "--steps", "2"])
            .args(["--width", "64", "--height", "64", "--output"])
            .arg(dir.path().join("x.png"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.success(), err, start.elapsed())
    };
    for (what, broken) in [
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&weights, &broken).unwrap();
        let (ok, err, took) = generate();
        assert!(!ok, "{what}: {err}");
        assert!(
            err.contains("decoder") && err.contains("unet"),
            "{what}: {err}"
        );
        assert!(
            !err.contains("prior ["),
            "{what}: the prior ran first: {err}"
        );
        assert!(took < Duration::from_secs(5), "{what}");
        assert!(!dir.path().join("x.png").exists());
    }
    // A shape the config does not expect: found from the headers too.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(decoder.join("unet/config.json")).unwrap())
            .unwrap();
    std::fs::write(&weights, &bytes).unwrap();
    config["block_out_channels"] = serde_json::json!([64, 64]);
    std::fs::write(decoder.join("unet/config.json"), config.to_string()).unwrap();
    let (ok, err, _) = generate();
    assert!(!ok && err.contains("shape"), "{err}");
    assert!(!err.contains("prior ["), "{err}");
}

/// PNGs under final names in `dir` (not the hidden `.name.partial` files).
fn finals(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".png") && !n.starts_with('.')
        })
        .collect()
}

#[test]
fn a_killed_run_leaves_only_complete_pngs() {
    let dir = tempfile::tempdir().unwrap();
    for (signal, after) in [
        ("TERM", 1),
        ("INT", 2),
        ("KILL", 3),
        ("KILL", 1),
        ("TERM", 4),
    ] {
        let out = dir.path().join(format!("{signal}-{after}"));
        std::fs::create_dir_all(&out).unwrap();
        // Many images in runs of 36 (64 px), each written as its run ends: the kill comes while
        // a run writes its images.
        let mut child = bin()
            .args(["generate", "--prompt", "a red cat", "--model"])
            .arg(fixture("pipelines/tiny-2-2-decoder"))
            .arg("--prior")
            .arg(fixture("pipelines/tiny-2-2-prior"))
            .args(["--num-images", "2000", "--steps", "2", "--prior-steps", "2"])
            .args(["--width", "64", "--height", "64", "--seed", "1", "--output"])
            .arg(out.join("img.png"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while finals(&out).len() < after {
            assert!(start.elapsed() < Duration::from_secs(120), "no images");
            assert!(child.try_wait().unwrap().is_none(), "ended early");
            std::thread::sleep(Duration::from_millis(5));
        }
        let ok = std::process::Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        child.wait().unwrap();
        let images = finals(&out);
        assert!(images.len() >= after);
        for p in images {
            let img = image::open(&p)
                .unwrap_or_else(|e| panic!("{signal}: {} is not a complete PNG: {e}", p.display()));
            assert_eq!(img.width(), 64);
        }
    }
}
