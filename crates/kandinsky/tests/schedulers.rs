//! Schedulers against diffusers: timesteps for several step counts, single steps (with the noise
//! diffusers draws from a seeded generator) and `add_noise`.

mod common;

use candle_core::Device;
use common::{assert_close, fixtures, load_io};
use kandinsky::schedulers::{from_config, SchedulerConfig};
use kandinsky::utils::torch_utils::TorchGenerator;

const NAMES: [&str; 4] = ["ddim_2_1", "ddpm_2_2", "ddpm_2_1_learned", "unclip_prior"];

fn config(name: &str) -> SchedulerConfig {
    SchedulerConfig::load(
        &fixtures()
            .join("schedulers")
            .join(name)
            .join("scheduler_config.json"),
    )
    .unwrap()
}

#[test]
fn timesteps_match_diffusers() {
    let text = std::fs::read_to_string(fixtures().join("schedulers/timesteps.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    for name in NAMES {
        let mut s = from_config(&config(name)).unwrap();
        for (n, want) in golden[name].as_object().unwrap() {
            s.set_timesteps(n.parse().unwrap()).unwrap();
            let want: Vec<usize> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(s.timesteps(), want.as_slice(), "{name}, {n} steps");
        }
    }
}

#[test]
fn steps_and_add_noise_match_diffusers() {
    let io = load_io(&fixtures().join("schedulers/steps.safetensors"));
    for name in NAMES {
        let mut s = from_config(&config(name)).unwrap();
        s.set_timesteps(10).unwrap();
        let ts = s.timesteps().to_vec();
        let sample = &io[&format!("{name}_sample")];
        let out = &io[&format!("{name}_model_output")];
        for i in [0usize, 4, 9] {
            let mut g = TorchGenerator::new(100 + i as u64);
            let prev = s.step(out, ts[i], sample, &mut g).unwrap();
            assert_close(
                &format!("{name} step {i} (t = {})", ts[i]),
                &prev,
                &io[&format!("{name}_step{i}")],
            );
        }
        if let Some(noise) = io.get(&format!("{name}_noise")) {
            let got = s.add_noise(sample, noise, ts[3]).unwrap();
            assert_close(
                &format!("{name} add_noise"),
                &got,
                &io[&format!("{name}_add_noise_{}", ts[3])],
            );
        }
    }
    let _ = Device::Cpu;
}

#[test]
fn bad_configs_and_step_counts_are_errors() {
    let mut c = config("ddpm_2_2");
    c.variance_type = Some("learned".into());
    assert!(from_config(&c).is_err());
    let mut c = config("ddim_2_1");
    c.class_name = "EulerDiscreteScheduler".into();
    let err = from_config(&c).err().unwrap().to_string();
    assert!(err.contains("EulerDiscreteScheduler"), "{err}");
    let mut s = from_config(&config("ddpm_2_2")).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    let mut s = from_config(&config("unclip_prior")).unwrap();
    assert!(s.set_timesteps(1).is_err());
}
