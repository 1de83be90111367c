//! The `decode` command: the README's decode command works, and bad input fails cleanly.

mod common;
use common::*;

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
