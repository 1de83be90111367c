//! diffusers `schedulers/scheduling_ddpm.py`: `DDPMScheduler` (the 2.2 default; `learned_range`
//! with dynamic thresholding is the 2.1 `ddpm_scheduler/`).

use super::{
    add_noise_with, alphas_cumprod, betas, spaced_timesteps, PredictionType, Scheduler,
    SchedulerConfig, VarianceType,
};
use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variance {
    FixedSmall,
    FixedSmallLog,
    FixedLarge,
    LearnedRange,
}

/// `DDPMScheduler`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
    variance: Variance,
}

impl DdpmScheduler {
    /// Builds the scheduler (`variance_type` defaults to `fixed_small`).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let variance = match config
            .variance_type
            .as_ref()
            .unwrap_or(&VarianceType::FixedSmall)
        {
            VarianceType::FixedSmall => Variance::FixedSmall,
            VarianceType::FixedSmallLog => Variance::FixedSmallLog,
            VarianceType::FixedLarge => Variance::FixedLarge,
            VarianceType::LearnedRange => Variance::LearnedRange,
            other => return Err(Error::unsupported("variance_type", other.as_str())),
        };
        if let PredictionType::Other(p) = &config.prediction_type {
            return Err(Error::unsupported("prediction_type", p));
        }
        let t = config.num_train_timesteps;
        Ok(Self {
            alphas_cumprod: alphas_cumprod(&betas(config)?),
            timesteps: (0..t).rev().collect(),
            config: config.clone(),
            variance,
        })
    }

    fn previous_timestep(&self, t: usize) -> Option<usize> {
        let i = self.timesteps.iter().position(|&x| x == t)?;
        self.timesteps.get(i + 1).copied()
    }

    /// `_threshold_sample` with this config's ratio and maximum.
    fn threshold(&self, x: &Tensor) -> Result<Tensor> {
        super::threshold_sample(
            x,
            self.config.dynamic_thresholding_ratio,
            self.config.sample_max_value,
        )
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = spaced_timesteps(&self.config, n)?;
        Ok(())
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let c = sample.dim(1)?;
        let (eps, predicted_variance) =
            if model_output.dim(1)? == 2 * c && self.variance == Variance::LearnedRange {
                (
                    model_output.narrow(1, 0, c)?,
                    Some(model_output.narrow(1, c, c)?),
                )
            } else {
                (model_output.clone(), None)
            };
        let a_t = self.alphas_cumprod[t];
        let a_prev = self
            .previous_timestep(t)
            .map_or(1.0, |p| self.alphas_cumprod[p]);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = match &self.config.prediction_type {
            PredictionType::Epsilon => {
                ((sample - (&eps * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?
            }
            PredictionType::Sample => eps.clone(),
            PredictionType::VPrediction => {
                ((sample * a_t.sqrt() as f64)? - (&eps * b_t.sqrt() as f64)?)?
            }
            PredictionType::Other(p) => return Err(Error::unsupported("prediction_type", p)),
        };
        if self.config.thresholding {
            x0 = self.threshold(&x0)?;
        } else if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let x0_coeff = (a_prev.sqrt() * cur_beta) / b_t;
        let cur_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let prev = ((x0 * x0_coeff as f64)? + (sample * cur_coeff as f64)?)?;
        if t == 0 {
            return Ok(prev);
        }
        let noise = generator
            .randn(eps.shape(), eps.device())?
            .to_dtype(eps.dtype())?;
        let variance = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
        let scaled = match self.variance {
            Variance::FixedSmall => (noise * variance.sqrt() as f64)?,
            Variance::FixedSmallLog => (noise * (0.5 * variance.ln()).exp() as f64)?,
            Variance::FixedLarge => (noise * cur_beta.sqrt() as f64)?,
            Variance::LearnedRange => {
                let v = predicted_variance.ok_or_else(|| {
                    Error::InvalidArgument(
                        "learned_range needs the model's variance channels".into(),
                    )
                })?;
                let (min_log, max_log) = (variance.ln() as f64, cur_beta.ln() as f64);
                let frac = ((v + 1.0)? / 2.0)?;
                let log_var = ((&frac * max_log)? + ((1.0 - &frac)? * min_log)?)?;
                ((log_var * 0.5)?.exp()? * noise)?
            }
        };
        Ok((prev + scaled)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        add_noise_with(&self.alphas_cumprod, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        self.variance == Variance::LearnedRange
    }
}
