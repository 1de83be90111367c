//! `torch.Generator("cpu").manual_seed(s)` + `torch.randn` reproduced bit for bit, for sizes below
//! and above torch's 16-element threshold and for consecutive draws from one generator.

mod common;

use candle_core::Device;
use common::{fixtures, load_io};
use kandinsky::utils::torch_utils::TorchGenerator;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn single_draws_are_bit_identical() {
    let io = load_io(&fixtures().join("rng/randn.safetensors"));
    for seed in [0u64, 42, 1_234_567_890_123] {
        for size in [1usize, 7, 15, 16, 17, 31, 32, 1280] {
            let want: Vec<f32> = io[&format!("seed{seed}_single_{size}")].to_vec1().unwrap();
            let got = TorchGenerator::new(seed).randn_vec(size);
            assert_eq!(bits(&got), bits(&want), "seed {seed}, size {size}");
        }
        let want = io[&format!("seed{seed}_single_4x64x64")]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = TorchGenerator::new(seed)
            .randn((4, 64, 64), &Device::Cpu)
            .unwrap();
        assert_eq!(got.dims(), &[4, 64, 64]);
        assert_eq!(
            bits(&got.flatten_all().unwrap().to_vec1().unwrap()),
            bits(&want),
            "seed {seed}, 4x64x64"
        );
    }
}

#[test]
fn consecutive_draws_share_one_generator() {
    let io = load_io(&fixtures().join("rng/randn.safetensors"));
    for seed in [0u64, 42, 1_234_567_890_123] {
        let mut g = TorchGenerator::new(seed);
        let shapes: [&[usize]; 8] = [
            &[7],
            &[1],
            &[17],
            &[3],
            &[2, 4, 8, 8],
            &[5],
            &[1, 1280],
            &[33],
        ];
        for (i, shape) in shapes.iter().enumerate() {
            let name = format!(
                "seed{seed}_seq{i}_{}",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            );
            let want = io[&name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = g.randn(shape.to_vec(), &Device::Cpu).unwrap();
            assert_eq!(got.dims(), *shape);
            assert_eq!(
                bits(&got.flatten_all().unwrap().to_vec1().unwrap()),
                bits(&want),
                "{name}"
            );
        }
    }
}
