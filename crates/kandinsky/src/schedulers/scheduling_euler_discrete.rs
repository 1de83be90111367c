//! diffusers `schedulers/scheduling_euler_discrete.py`: `EulerDiscreteScheduler` (Karras et al.'s
//! Euler method on σ = √((1 - ᾱ)/ᾱ), `s_churn = 0`), and the σ schedule the ancestral variant
//! shares.
//!
//! Schedule entries are step indices: [`Scheduler::model_timestep`] gives the (fractional)
//! timestep the model sees, as diffusers' float `timesteps`.

use super::{
    alphas_cumprod, betas, FinalSigmasType, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// The σ schedule of the Euler schedulers.
#[derive(Debug, Clone)]
pub(crate) struct Sigmas {
    config: SchedulerConfig,
    /// `√((1 - ᾱ_t)/ᾱ_t)` for every training timestep (f32, as torch computes it).
    train_sigmas: Vec<f32>,
    /// The inference timesteps (f32).
    pub timesteps: Vec<f32>,
    /// σ at each inference step, then the final σ (f32).
    pub sigmas: Vec<f32>,
    /// `0..n`, the schedule entries.
    pub entries: Vec<usize>,
}

impl Sigmas {
    /// `(x, model output) → predicted x0` at `sigma`, as diffusers' Euler steps compute it for
    /// the config's prediction type (checked in [`Sigmas::new`]).
    pub fn x0_of(&self, sigma: f32) -> impl Fn(f32, f32) -> f32 {
        let prediction = self.config.prediction_type.clone();
        let norm = sigma * sigma + 1.0;
        move |x, out| match prediction {
            PredictionType::Sample => out,
            PredictionType::VPrediction => out * (-sigma / norm.sqrt()) + x / norm,
            _ => x - sigma * out,
        }
    }

    /// Checks the config (what our Euler supports, the `predictions` among them) and builds the
    /// training σ.
    pub fn new(config: &SchedulerConfig, predictions: &[PredictionType]) -> Result<Self> {
        if !predictions.contains(&config.prediction_type) {
            return Err(Error::unsupported(
                "prediction_type",
                config.prediction_type.as_str(),
            ));
        }
        for (key, on) in [
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ] {
            if on {
                return Err(Error::unsupported(key, true));
            }
        }
        let ac = alphas_cumprod(&betas(config)?);
        let train_sigmas = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut s = Self {
            config: config.clone(),
            train_sigmas,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            entries: Vec::new(),
        };
        s.set(config.num_train_timesteps)?;
        Ok(s)
    }

    /// `set_timesteps(n)`: the spacing's timesteps, σ interpolated linearly at them (`np.interp`
    /// in f64), then the final σ.
    pub fn set(&mut self, n: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        if n == 0 || n > t {
            return Err(Error::InvalidArgument(format!(
                "the number of inference steps must be between 1 and {t}, got {n}"
            )));
        }
        let timesteps: Vec<f32> = match &self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let step = if n > 1 {
                    (t - 1) as f64 / (n - 1) as f64
                } else {
                    0.0
                };
                (0..n)
                    .rev()
                    .map(|i| {
                        if i == n - 1 && n > 1 {
                            (t - 1) as f32
                        } else {
                            (i as f64 * step) as f32
                        }
                    })
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio) as f32 + self.config.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t as f64 / n as f64;
                let count = (t as f64 / ratio).ceil() as usize;
                (0..count)
                    .map(|k| ((t as f64 - k as f64 * ratio).round_ties_even() as f32) - 1.0)
                    .collect()
            }
            other => return Err(Error::unsupported("timestep_spacing", other.as_str())),
        };
        let fp = &self.train_sigmas;
        let last = fp.len() - 1;
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&x| {
                let x = x as f64;
                if x <= 0.0 {
                    return fp[0];
                }
                if x >= last as f64 {
                    return fp[last];
                }
                let j = x.floor() as usize;
                let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
                if x == j as f64 {
                    y0 as f32
                } else {
                    ((y1 - y0) * (x - j as f64) + y0) as f32
                }
            })
            .collect();
        sigmas.push(match self.config.final_sigmas_type {
            Some(FinalSigmasType::SigmaMin) => self.train_sigmas[0],
            _ => 0.0,
        });
        self.entries = (0..timesteps.len()).collect();
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    /// σ at entry `i`.
    pub fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas
            .get(i)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("step {i} out of the schedule")))
    }

    /// `init_noise_sigma`: the largest σ, or `√(σ² + 1)` of it for `leading` spacing.
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0f32, f32::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            _ => (max * max + 1.0).sqrt() as f64,
        }
    }

    /// `sample / √(σ² + 1)`.
    pub fn scale(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigma(i)?;
        let d = (s * s + 1.0).sqrt();
        map(sample, |x| x / d)
    }

    /// `original + noise · σ_i`.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let s = self.sigma(i)?;
        zip(original, noise, |o, n| o + n * s)
    }

    /// The model's timestep at entry `i`.
    pub fn timestep(&self, i: usize) -> f64 {
        self.timesteps.get(i).copied().unwrap_or(0.0) as f64
    }
}

/// The [`Scheduler`] methods both Euler schedulers take from their [`Sigmas`] (a field
/// `sigmas`): everything but `step`.
macro_rules! sigma_schedule_methods {
    () => {
        fn set_timesteps(&mut self, n: usize) -> Result<()> {
            self.sigmas.set(n)
        }

        fn timesteps(&self) -> &[usize] {
            &self.sigmas.entries
        }

        fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
            self.sigmas.add_noise(original, noise, i)
        }

        fn uses_learned_variance(&self) -> bool {
            false
        }

        fn model_timestep(&self, i: usize) -> f64 {
            self.sigmas.timestep(i)
        }

        fn scale_model_input(&self, sample: &Tensor, i: usize) -> Result<Tensor> {
            self.sigmas.scale(sample, i)
        }

        fn init_noise_sigma(&self) -> f64 {
            self.sigmas.init_noise_sigma()
        }
    };
}
pub(crate) use sigma_schedule_methods;

/// `f` on every element, in f32.
pub(crate) fn map(x: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
    let v: Vec<f32> = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?
        .into_iter()
        .map(f)
        .collect();
    Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
}

/// `f` on every pair of elements of two tensors of one shape, in f32.
pub(crate) fn zip(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::InvalidArgument(format!(
            "shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    let va: Vec<f32> = a
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let vb: Vec<f32> = b
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let v: Vec<f32> = va.iter().zip(&vb).map(|(&x, &y)| f(x, y)).collect();
    Ok(Tensor::from_vec(v, a.shape(), a.device())?.to_dtype(a.dtype())?)
}

/// `EulerDiscreteScheduler` with `s_churn = 0` (diffusers' default: no noise is drawn).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    sigmas: Sigmas,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler (ε, x0 or v prediction, linear interpolation of σ).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            sigmas: Sigmas::new(
                config,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
        })
    }
}

impl Scheduler for EulerDiscreteScheduler {
    sigma_schedule_methods!();

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let sigma = self.sigmas.sigma(i)?;
        let dt = self.sigmas.sigma(i + 1)? - sigma;
        // derivative = (x - pred_x0) / σ; x + derivative · dt.
        let x0 = self.sigmas.x0_of(sigma);
        zip(sample, model_output, |x, out| {
            x + (x - x0(x, out)) / sigma * dt
        })
    }
}
