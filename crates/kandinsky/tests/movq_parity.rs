//! MoVQ (VQModel, SpatialNorm decoder) parity against diffusers: encode, decode without and with
//! codebook quantisation, on diffusers' dummy and a small-width model with the real topology.

mod common;

use candle_core::DType;
use common::{assert_close, fixtures, load_io};
use kandinsky::loading::Weights;
use kandinsky::models::{VQModel, VQModelConfig};

fn check(name: &str) {
    let dir = fixtures().join("movq").join(name);
    let config = VQModelConfig::load(&dir).unwrap();
    let w = Weights::from_dir(&dir, DType::F32, &common::device()).unwrap();
    let movq = VQModel::new(&w, &config).unwrap();
    let io = load_io(&dir.join("io.safetensors"));
    for j in 0..2 {
        let get = |k: &str| io.get(&format!("{k}_{j}")).unwrap();
        let image = get("image");
        let what = format!("{name} {:?}", image.dims());
        assert_close(
            &format!("{what} encode"),
            &movq.encode(image).unwrap(),
            get("encoded"),
        );
        let z = get("latent");
        assert_close(
            &format!("{what} decode"),
            &movq.decode(z, true).unwrap(),
            get("decoded"),
        );
        let idx: Vec<u32> = movq.quantizer().indices(z).unwrap().to_vec1().unwrap();
        let ref_idx: Vec<u32> = get("indices")
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        assert_eq!(idx, ref_idx, "{what}: codebook indices");
        assert_close(
            &format!("{what} decode quantised"),
            &movq.decode(z, false).unwrap(),
            get("decoded_quantized"),
        );
    }
}

#[test]
fn dummy() {
    check("dummy");
}

#[test]
fn real_topology() {
    check("topo");
}
