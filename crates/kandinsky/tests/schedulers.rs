//! Schedulers against diffusers: timesteps for several step counts, single steps (with the noise
//! diffusers draws from a seeded generator) and `add_noise`; for the multistep DPM-Solver++ 2M,
//! whole sampling loops.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, errors, fixtures, load_io};
use kandinsky::schedulers::{
    from_config, with_class, SchedulerConfig, VarianceType, DPM_SOLVER_MULTISTEP,
};
use kandinsky::utils::torch_utils::TorchGenerator;
use std::collections::HashMap;

const NAMES: [&str; 8] = [
    "ddim_2_1",
    "ddpm_2_2",
    "ddpm_2_1_learned",
    "unclip_prior",
    "ddim_2_1_sample",
    "ddim_2_1_vpred",
    "ddpm_2_2_sample",
    "ddpm_2_2_vpred",
];

/// `DPMSolverMultistepScheduler.from_config(...)` fixtures (`DPM_SCHEDULERS` in make_fixtures.py).
const DPM_NAMES: [&str; 5] = [
    "dpmpp_2m_from_ddim_2_1",
    "dpmpp_2m_from_ddpm_2_2",
    "dpmpp_2m_from_saved_ddpm_2_2",
    "dpmpp_2m_trailing_vpred",
    "dpmpp_2m_thresholding_sample",
];

/// Step counts of the stored DPM-Solver loops and the step indices stored for each.
const DPM_TRAJECTORIES: [(usize, [usize; 4]); 2] = [(10, [0, 1, 5, 9]), (25, [0, 1, 12, 24])];

/// The hub scheduler files of 2.1 (`scheduler/`, DDIM) and 2.2 (DDPM): only the keys they hold,
/// as `SCHEDULERS` in make_fixtures.py.
const HUB_DDIM_2_1: &str = r#"{"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
    "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": false,
    "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": false}"#;
const HUB_DDPM_2_2: &str = r#"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000,
    "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": false,
    "set_alpha_to_one": false, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": false}"#;

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
    for name in NAMES.into_iter().chain(DPM_NAMES) {
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
    c.class_name = "LMSDiscreteScheduler".into();
    let err = from_config(&c).err().unwrap().to_string();
    assert!(err.contains("LMSDiscreteScheduler"), "{err}");
    let mut s = from_config(&config("ddpm_2_2")).unwrap();
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    let mut s = from_config(&config("unclip_prior")).unwrap();
    assert!(s.set_timesteps(1).is_err());
    // Zero terminal SNR (the usual partner of v prediction) and explicit β are not implemented:
    // every scheduler that reads β refuses them rather than run on another schedule.
    let euler = with_class(&config("ddim_2_1"), kandinsky::schedulers::EULER_DISCRETE).unwrap();
    for (name, base) in [
        ("ddim_2_1_vpred", config("ddim_2_1_vpred")),
        ("ddpm_2_2_vpred", config("ddpm_2_2_vpred")),
        ("ddim_2_1", config("ddim_2_1")),
        ("dpmpp_2m_from_ddim_2_1", config("dpmpp_2m_from_ddim_2_1")),
        ("euler from ddim_2_1", euler),
    ] {
        let mut c = base.clone();
        c.rescale_betas_zero_snr = true;
        let err = from_config(&c).err().unwrap().to_string();
        assert!(err.contains("rescale_betas_zero_snr"), "{name}: {err}");
        let mut c = base;
        c.trained_betas = Some(vec![0.01; 1000]);
        let err = from_config(&c).err().unwrap().to_string();
        assert!(err.contains("trained_betas"), "{name}: {err}");
    }
}

/// The DPM-Solver criterion: relative L2 ≤ 1e-5 and max abs ≤ 1e-5 × max |ref|.
fn assert_tight(what: &str, ours: &Tensor, reference: &Tensor) {
    let (rel, dmax, rmax) = errors(ours, reference);
    println!("{what}: rel L2 {rel:.3e}, max abs {dmax:.3e} (ref max {rmax:.3e})");
    assert!(rel <= 1e-5, "{what}: relative L2 error {rel:.3e} > 1e-5");
    assert!(
        dmax <= 1e-5 * rmax,
        "{what}: max abs error {dmax:.3e} > 1e-5 × {rmax:.3e}"
    );
}

/// Runs whole sampling loops of fixture `name` with its deterministic model
/// `model_output = eps + 0.5 · sample` and checks the stored steps.
fn check_dpm_trajectories(
    label: &str,
    config: &SchedulerConfig,
    name: &str,
    io: &HashMap<String, Tensor>,
) {
    let mut s = from_config(config).unwrap();
    let eps = &io[&format!("{name}_eps")];
    let mut g = TorchGenerator::new(0);
    for (n, keep) in DPM_TRAJECTORIES {
        s.set_timesteps(n).unwrap();
        let ts = s.timesteps().to_vec();
        assert_eq!(ts.len(), n, "{label}");
        let mut x = io[&format!("{name}_sample")].clone();
        for (i, &t) in ts.iter().enumerate() {
            let model_output = (eps + (&x * 0.5).unwrap()).unwrap();
            x = s.step(&model_output, t, &x, &mut g).unwrap();
            if keep.contains(&i) {
                assert_tight(
                    &format!("{label}, {n} steps, step {i} (t = {t})"),
                    &x,
                    &io[&format!("{name}_traj{n}_step{i}")],
                );
            }
        }
        assert!(
            s.step(eps, ts[0], &x, &mut g).is_err(),
            "{label}: a step past the last one"
        );
    }
}

#[test]
fn dpm_solver_loops_and_add_noise_match_diffusers() {
    let io = load_io(&fixtures().join("schedulers/steps.safetensors"));
    for name in DPM_NAMES {
        let c = config(name);
        check_dpm_trajectories(name, &c, name, &io);
        let mut s = from_config(&c).unwrap();
        assert!(!s.uses_learned_variance());
        s.set_timesteps(10).unwrap();
        let t3 = s.timesteps()[3];
        let got = s
            .add_noise(
                &io[&format!("{name}_sample")],
                &io[&format!("{name}_noise")],
                t3,
            )
            .unwrap();
        assert_tight(
            &format!("{name} add_noise"),
            &got,
            &io[&format!("{name}_add_noise_{t3}")],
        );
    }
}

/// `--scheduler dpm++2m`: `with_class` on the model's own scheduler config gives what
/// `DPMSolverMultistepScheduler.from_config(model_scheduler.config)` gives in diffusers.
#[test]
fn dpm_solver_from_a_model_scheduler_config_matches_diffusers_from_config() {
    let text = std::fs::read_to_string(fixtures().join("schedulers/timesteps.json")).unwrap();
    let golden: serde_json::Value = serde_json::from_str(&text).unwrap();
    let io = load_io(&fixtures().join("schedulers/steps.safetensors"));
    let cases = [
        // Hub files without timestep_spacing: DPM-Solver's "linspace".
        (
            SchedulerConfig::from_json(HUB_DDIM_2_1).unwrap(),
            "dpmpp_2m_from_ddim_2_1",
        ),
        (
            SchedulerConfig::from_json(HUB_DDPM_2_2).unwrap(),
            "dpmpp_2m_from_ddpm_2_2",
        ),
        // A file with every key (timestep_spacing "leading", variance_type "fixed_small").
        (config("ddpm_2_2"), "dpmpp_2m_from_saved_ddpm_2_2"),
    ];
    for (source, name) in cases {
        let c = with_class(&source, DPM_SOLVER_MULTISTEP).unwrap();
        let saved = config(name);
        assert_eq!(c.class_name, DPM_SOLVER_MULTISTEP, "{name}");
        assert_eq!(c.timestep_spacing, saved.timestep_spacing, "{name}");
        assert_eq!(c.steps_offset, saved.steps_offset, "{name}");
        assert_eq!(c.variance_type, saved.variance_type, "{name}");
        assert_eq!(c.prediction_type, saved.prediction_type, "{name}");
        assert_eq!(c.solver_order, saved.solver_order, "{name}");
        let mut s = from_config(&c).unwrap();
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
        check_dpm_trajectories(&format!("{name} (with_class)"), &c, name, &io);
    }
    // 2.1's `ddpm_scheduler/` (learned_range): diffusers' DPM-Solver keeps `model_output[:, :3]`,
    // which fails with 4-channel latents; here it is refused up front.
    let learned = with_class(&config("ddpm_2_1_learned"), DPM_SOLVER_MULTISTEP).unwrap();
    assert_eq!(learned.variance_type, Some(VarianceType::LearnedRange));
    assert!(from_config(&learned).is_err());
}

#[test]
fn dpm_solver_refuses_what_it_does_not_implement() {
    let base = config("dpmpp_2m_from_ddpm_2_2");
    let mut c = base.clone();
    c.use_karras_sigmas = true;
    assert!(from_config(&c).is_err());
    let mut c = base.clone();
    c.solver_order = 3;
    assert!(from_config(&c).is_err());
    let mut c = base.clone();
    c.algorithm_type = "sde-dpmsolver++".into();
    assert!(from_config(&c).is_err());
    let mut c = base.clone();
    c.prediction_type = "flow_prediction".into();
    assert!(from_config(&c).is_err());
    let mut s = from_config(&base).unwrap();
    let x = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut g = TorchGenerator::new(0);
    assert!(
        s.step(&x, 999, &x, &mut g).is_err(),
        "step before set_timesteps"
    );
    assert!(s.set_timesteps(0).is_err());
    assert!(s.set_timesteps(1001).is_err());
    // diffusers' "trailing" spacing gives a timestep of -1 for 61 steps.
    let mut s = from_config(&config("dpmpp_2m_trailing_vpred")).unwrap();
    assert!(s.set_timesteps(61).is_err());
    assert!(s.set_timesteps(60).is_ok());
}

/// `EulerDiscreteScheduler` / `EulerAncestralDiscreteScheduler` `.from_config(hub file)` against
/// diffusers (`tools/make_euler_fixtures.py`): timesteps, σ, `init_noise_sigma`, a whole 10-step
/// loop on a stand-in model (`ε = 0.5 · scaled input + 0.1`, the ancestral noise drawn from a
/// seeded generator), and `add_noise`.
#[test]
fn euler_schedulers_match_diffusers() {
    use kandinsky::schedulers::{EULER_ANCESTRAL_DISCRETE, EULER_DISCRETE};
    let io = load_io(&fixtures().join("schedulers/euler.safetensors"));
    let leading = HUB_DDIM_2_1.replace(
        "\"thresholding\": false",
        "\"thresholding\": false, \"timestep_spacing\": \"leading\"",
    );
    let trailing = HUB_DDPM_2_2.replace(
        "\"thresholding\": false",
        "\"thresholding\": false, \"timestep_spacing\": \"trailing\"",
    );
    let cases = [
        (
            "euler_from_ddim_2_1",
            EULER_DISCRETE,
            HUB_DDIM_2_1.to_string(),
        ),
        (
            "euler_a_from_ddpm_2_2",
            EULER_ANCESTRAL_DISCRETE,
            HUB_DDPM_2_2.to_string(),
        ),
        ("euler_leading", EULER_DISCRETE, leading),
        ("euler_a_trailing", EULER_ANCESTRAL_DISCRETE, trailing),
        (
            "euler_sample",
            EULER_DISCRETE,
            HUB_DDIM_2_1.replace("\"epsilon\"", "\"sample\""),
        ),
        (
            "euler_vpred",
            EULER_DISCRETE,
            HUB_DDIM_2_1.replace("\"epsilon\"", "\"v_prediction\""),
        ),
        (
            "euler_a_vpred",
            EULER_ANCESTRAL_DISCRETE,
            HUB_DDPM_2_2.replace("\"epsilon\"", "\"v_prediction\""),
        ),
    ];
    let get = |k: &str| io.get(k).unwrap_or_else(|| panic!("fixture {k}")).clone();
    for (name, class, base) in cases {
        let config = with_class(&SchedulerConfig::from_json(&base).unwrap(), class).unwrap();
        for n in [10, 25] {
            let mut s = from_config(&config).unwrap();
            s.set_timesteps(n).unwrap();
            let ours: Vec<f32> = s
                .timesteps()
                .iter()
                .map(|&i| s.model_timestep(i) as f32)
                .collect();
            let want: Vec<f32> = get(&format!("{name}.timesteps_{n}")).to_vec1().unwrap();
            assert_eq!(ours, want, "{name} timesteps {n}");
            let sigma0: Vec<f32> = get(&format!("{name}.init_noise_sigma_{n}"))
                .to_vec1()
                .unwrap();
            assert!(
                (s.init_noise_sigma() as f32 - sigma0[0]).abs() <= 1e-6 * sigma0[0],
                "{name} init_noise_sigma {} vs {}",
                s.init_noise_sigma(),
                sigma0[0]
            );
            // σ through `add_noise` of zeros and ones: σ_i exactly.
            let sigmas: Vec<f32> = get(&format!("{name}.sigmas_{n}")).to_vec1().unwrap();
            let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
            let one = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
            for (i, want) in sigmas.iter().enumerate().take(n) {
                let got: Vec<f32> = s.add_noise(&zero, &one, i).unwrap().to_vec1().unwrap();
                assert!(
                    (got[0] - want).abs() <= 2e-7 * want.max(1.0),
                    "{name} σ_{i}: {} vs {want}",
                    got[0]
                );
            }
        }
        let mut s = from_config(&config).unwrap();
        s.set_timesteps(10).unwrap();
        let mut g = TorchGenerator::new(0);
        let mut x = (g.randn((1, 4, 8, 8), &Device::Cpu).unwrap() * s.init_noise_sigma()).unwrap();
        let mut noise_gen = TorchGenerator::new(1);
        let steps = s.timesteps().to_vec();
        for (i, &t) in steps.iter().enumerate() {
            let input = s.scale_model_input(&x, t).unwrap();
            if i == 0 || i == 5 {
                assert_close(
                    &format!("{name} input {i}"),
                    &input,
                    &get(&format!("{name}.input_{i}")),
                );
            }
            let eps = ((&input * 0.5).unwrap() + 0.1).unwrap();
            x = s.step(&eps, t, &x, &mut noise_gen).unwrap();
            if i == 0 {
                assert_close(
                    &format!("{name} step 0"),
                    &x,
                    &get(&format!("{name}.after_0")),
                );
            }
        }
        assert_close(&format!("{name} final"), &x, &get(&format!("{name}.final")));
        let noised = s
            .add_noise(
                &get(&format!("{name}.x0")),
                &get(&format!("{name}.noise")),
                3,
            )
            .unwrap();
        assert_close(
            &format!("{name} add_noise"),
            &noised,
            &get(&format!("{name}.noised_3")),
        );
    }
}
