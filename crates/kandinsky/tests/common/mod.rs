//! Shared helpers of the parity tests: fixture paths and the error metrics.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// The repository's `fixtures/` directory (written by `tools/make_fixtures.py`).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The device the parity tests run on: the CPU, or `cuda[:N]` from `KANDINSKY_TEST_DEVICE`
/// (test binaries built with `--features cuda`, on a GPU machine: `tools/device_check.sh`).
pub fn device() -> Device {
    match std::env::var("KANDINSKY_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(d) => {
            let n = d
                .strip_prefix("cuda")
                .map(|n| n.trim_start_matches(':'))
                .map(|n| if n.is_empty() { Ok(0) } else { n.parse() })
                .unwrap_or_else(|| panic!("KANDINSKY_TEST_DEVICE={d}: not cpu or cuda[:N]"))
                .expect("a device number");
            Device::new_cuda(n).expect("the CUDA device of KANDINSKY_TEST_DEVICE")
        }
    }
}

/// Loads an `io.safetensors` of inputs and reference outputs, as f32 (inputs may be stored as
/// fp16 when their values are exactly representable), on [`device`].
pub fn load_io(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &device())
        .expect("fixture io file")
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::F16 {
                v.to_dtype(DType::F32).unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect()
}

/// (relative L2 error, max abs error, max abs of the reference).
pub fn errors(ours: &Tensor, reference: &Tensor) -> (f64, f64, f64) {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let a: Vec<f32> = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = reference
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut d2, mut r2, mut dmax, mut rmax) = (0f64, 0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let (x, y) = (*x as f64, *y as f64);
        assert!(x.is_finite(), "non-finite output");
        d2 += (x - y) * (x - y);
        r2 += y * y;
        dmax = dmax.max((x - y).abs());
        rmax = rmax.max(y.abs());
    }
    ((d2 / r2.max(1e-30)).sqrt(), dmax, rmax)
}

/// Asserts the parity criterion of the project: relative L2 ≤ 1e-5 and max abs ≤ 1e-4 × max |ref|.
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    let (rel, dmax, rmax) = errors(ours, reference);
    println!("{what}: rel L2 {rel:.3e}, max abs {dmax:.3e} (ref max {rmax:.3e})");
    assert!(rel <= 1e-5, "{what}: relative L2 error {rel:.3e} > 1e-5");
    assert!(
        dmax <= 1e-4 * rmax,
        "{what}: max abs error {dmax:.3e} > 1e-4 × {rmax:.3e}"
    );
}
