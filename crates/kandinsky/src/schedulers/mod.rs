//! Noise schedulers (diffusers `schedulers/`), chosen from `scheduler/scheduler_config.json` by
//! `_class_name` as diffusers does.
//!
//! Scheduler arithmetic follows diffusers' float32 tensors: the schedules (`betas`,
//! `alphas_cumprod`) are built in f32 the way torch builds them, and per-step coefficients are
//! f32 scalars.

pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_unclip;

use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;
use serde::Deserialize;

fn d_1000() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_eps() -> String {
    "epsilon".into()
}
fn d_ratio() -> f64 {
    0.995
}
fn d_leading() -> String {
    "leading".into()
}

/// The union of the scheduler config keys Kandinsky uses; missing keys take the defaults of the
/// class named by `_class_name` (see each scheduler's constructor).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// `DDIMScheduler`, `DDPMScheduler`, `UnCLIPScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// Training timesteps.
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    /// First beta of a linear schedule.
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    /// Last beta of a linear schedule.
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    /// Clamp the predicted x0.
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    /// Clamp range.
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    /// DDIM: use ᾱ = 1 past the last step.
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    /// Added to every timestep.
    #[serde(default)]
    pub steps_offset: usize,
    /// `epsilon` or `sample`.
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    /// Dynamic thresholding (DDPM).
    #[serde(default)]
    pub thresholding: bool,
    /// Quantile of dynamic thresholding.
    #[serde(default = "d_ratio")]
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the threshold.
    #[serde(default = "d_one")]
    pub sample_max_value: f64,
    /// DDPM: `fixed_small`, `fixed_small_log`, `fixed_large`, `learned_range`; UnCLIP:
    /// `fixed_small_log`, `learned_range`.
    #[serde(default)]
    pub variance_type: Option<String>,
    /// `leading`, `trailing` or `linspace`.
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        crate::loading::read_json(path)
    }

    /// Parses a JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::Json {
            path: "<inline scheduler config>".into(),
            source,
        })
    }
}

/// `betas` as diffusers builds them (f32).
pub(crate) fn betas(c: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = c.num_train_timesteps;
    Ok(match c.beta_schedule.as_str() {
        "linear" => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
        "scaled_linear" => {
            linspace_f32((c.beta_start as f32).sqrt(), (c.beta_end as f32).sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        "squaredcos_cap_v2" => betas_for_alpha_bar(n),
        other => return Err(Error::unsupported("beta_schedule", other)),
    })
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from `start`, the
/// second half down from `end`.
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `betas_for_alpha_bar(n, "cosine")`, max beta 0.999, computed in f64 then stored as f32.
pub(crate) fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1 - betas)` in f32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f32;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// Inference timesteps for "leading" / "trailing" / "linspace" spacing (DDPM and DDIM).
pub(crate) fn spaced_timesteps(c: &SchedulerConfig, n: usize) -> Result<Vec<usize>> {
    let t = c.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::InvalidArgument(format!(
            "the number of inference steps must be between 1 and {t}, got {n}"
        )));
    }
    Ok(match c.timestep_spacing.as_str() {
        "leading" => {
            let ratio = t / n;
            (0..n).rev().map(|i| i * ratio + c.steps_offset).collect()
        }
        "trailing" => {
            let ratio = t as f64 / n as f64;
            let mut v = Vec::new();
            let mut x = t as f64;
            while x > 0.0 {
                v.push((x.round_ties_even() as usize).saturating_sub(1));
                x -= ratio;
            }
            v
        }
        "linspace" => {
            let last = (t - 1) as f64;
            (0..n)
                .rev()
                .map(|i| {
                    let v = if n == 1 {
                        0.0
                    } else {
                        last * i as f64 / (n - 1) as f64
                    };
                    v.round_ties_even() as usize
                })
                .collect()
        }
        other => return Err(Error::unsupported("timestep_spacing", other)),
    })
}

/// The sampling loop interface shared by every scheduler.
pub trait Scheduler {
    /// Prepares `n` inference steps.
    fn set_timesteps(&mut self, n: usize) -> Result<()>;
    /// The inference timesteps, first to last.
    fn timesteps(&self) -> &[usize];
    /// One denoising step from `sample` at `timestep`; noise, when the step needs it, is drawn
    /// from `generator` exactly when diffusers draws it.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor>;
    /// `add_noise(x0, noise, t) = √ᾱ_t x0 + √(1-ᾱ_t) noise`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor>;
    /// Whether the model's learned-variance channels are consumed (`learned` / `learned_range`).
    fn uses_learned_variance(&self) -> bool;
}

/// `√ᾱ_t x0 + √(1-ᾱ_t) noise` with f32 coefficients.
pub(crate) fn add_noise_with(
    alphas_cumprod: &[f32],
    original: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<Tensor> {
    let a = *alphas_cumprod
        .get(t)
        .ok_or_else(|| Error::InvalidArgument(format!("timestep {t} out of range")))?;
    let sa = a.sqrt() as f64;
    let sb = (1.0 - a).sqrt() as f64;
    Ok(((original * sa)? + (noise * sb)?)?)
}

/// Builds the scheduler a config names.
pub fn from_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler + Send>> {
    Ok(match config.class_name.as_str() {
        "DDIMScheduler" => Box::new(scheduling_ddim::DdimScheduler::new(config)?),
        "DDPMScheduler" => Box::new(scheduling_ddpm::DdpmScheduler::new(config)?),
        "UnCLIPScheduler" => Box::new(scheduling_unclip::UnClipScheduler::new(config)?),
        other => return Err(Error::unsupported("_class_name", other)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).unwrap()
    }

    #[test]
    fn leading_timesteps_match_the_spec() {
        let c = cfg(r#"{"_class_name": "DDIMScheduler", "steps_offset": 1}"#);
        let t = spaced_timesteps(&c, 100).unwrap();
        assert_eq!((t[0], t[1], t[98], t[99]), (991, 981, 11, 1));
        let t = spaced_timesteps(&c, 50).unwrap();
        assert_eq!((t[0], t[1], t[49]), (981, 961, 1));
    }
}
