//! Noise schedulers (diffusers `schedulers/`): the [`Scheduler`] trait and the schedule maths
//! every scheduler shares here, the config in [`configuration`], the classes and `from_config`
//! in [`scheduling_utils`], one file per scheduler.
//!
//! Scheduler arithmetic follows diffusers' float32 tensors: the schedules (`betas`,
//! `alphas_cumprod`) are built in f32 the way torch builds them, and per-step coefficients are
//! f32 scalars.

pub mod configuration;
pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_euler_ancestral_discrete;
pub mod scheduling_euler_discrete;
pub mod scheduling_unclip;
pub mod scheduling_utils;

pub use configuration::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing, VarianceType,
};
pub use scheduling_utils::{
    from_config, with_class, SchedulerClass, DPM_SOLVER_MULTISTEP, EULER_ANCESTRAL_DISCRETE,
    EULER_DISCRETE,
};

use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// `betas` as diffusers builds them (f32).
pub fn betas(c: &SchedulerConfig) -> Result<Vec<f32>> {
    // Neither is implemented: refused here, where every schedule that reads β starts, rather
    // than run on another schedule than diffusers would.
    if c.trained_betas.is_some() {
        return Err(Error::unsupported("trained_betas", "an explicit list"));
    }
    if c.rescale_betas_zero_snr {
        return Err(Error::unsupported("rescale_betas_zero_snr", true));
    }
    let n = c.num_train_timesteps;
    Ok(match &c.beta_schedule {
        BetaSchedule::Linear => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
        BetaSchedule::ScaledLinear => {
            linspace_f32((c.beta_start as f32).sqrt(), (c.beta_end as f32).sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n),
        other => return Err(Error::unsupported("beta_schedule", other.as_str())),
    })
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from `start`, the
/// second half down from `end`.
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    match n {
        0 => return Vec::new(),
        1 => return vec![start],
        _ => {}
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
pub fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
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

/// `torch.cumprod(1 - betas)` of an f32 tensor: `1 - b` in f32, the running product in f64
/// (torch's CPU accumulation type for float), each prefix stored as f32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect()
}

/// Inference timesteps for "leading" / "trailing" / "linspace" spacing (DDPM and DDIM).
pub fn spaced_timesteps(c: &SchedulerConfig, n: usize) -> Result<Vec<usize>> {
    let t = c.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::InvalidArgument(format!(
            "the number of inference steps must be between 1 and {t}, got {n}"
        )));
    }
    Ok(match &c.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|i| i * ratio + c.steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = t as f64 / n as f64;
            let mut v = Vec::new();
            let mut x = t as f64;
            while x > 0.0 {
                v.push((x.round_ties_even() as usize).saturating_sub(1));
                x -= ratio;
            }
            v
        }
        TimestepSpacing::Linspace => {
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
        other => return Err(Error::unsupported("timestep_spacing", other.as_str())),
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
    /// The timestep the model is conditioned on at schedule entry `t` (Euler's are fractional;
    /// its entries are step indices).
    fn model_timestep(&self, t: usize) -> f64 {
        t as f64
    }
    /// `scale_model_input`: the model's input at entry `t` (the sample itself except for the
    /// Euler schedulers, which divide by `√(σ² + 1)`).
    fn scale_model_input(&self, sample: &Tensor, _t: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// `init_noise_sigma`: the standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
}

/// `_threshold_sample` (dynamic thresholding, DDPM and DPM-Solver): per sample,
/// `s = clamp(quantile(|x|, ratio), 1, max)`, `x = clamp(x, -s, s) / s`.
pub fn threshold_sample(x: &Tensor, ratio: f64, max: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let b = dims[0];
    let flat = x.to_dtype(candle_core::DType::F32)?.reshape((b, ()))?;
    let rows: Vec<Vec<f32>> = flat.to_vec2()?;
    let mut out = Vec::with_capacity(flat.elem_count());
    for row in rows {
        let mut abs: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        abs.sort_by(|a, b| a.total_cmp(b));
        let pos = ratio as f32 * (abs.len() - 1) as f32;
        let lo = pos.floor() as usize;
        let hi = (lo + 1).min(abs.len() - 1);
        let frac = pos - lo as f32;
        let q = abs[lo] + (abs[hi] - abs[lo]) * frac;
        let s = q.clamp(1.0, max as f32);
        out.extend(row.iter().map(|v| v.clamp(-s, s) / s));
    }
    Ok(Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?)
}

/// `√ᾱ_t x0 + √(1-ᾱ_t) noise` with f32 coefficients.
pub fn add_noise_with(
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
