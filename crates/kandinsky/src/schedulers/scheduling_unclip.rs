//! diffusers `schedulers/scheduling_unclip.py`: `UnCLIPScheduler`, the prior's sampler (cosine
//! schedule, x0 prediction clipped to ±10, `fixed_small_log` variance).

use super::{
    add_noise_with, alphas_cumprod, betas_for_alpha_bar, PredictionType, Scheduler,
    SchedulerConfig, VarianceType,
};
use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// `UnCLIPScheduler` (always `squaredcos_cap_v2` betas).
#[derive(Debug, Clone)]
pub struct UnClipScheduler {
    config: SchedulerConfig,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
}

impl UnClipScheduler {
    /// Builds the scheduler.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        match config
            .variance_type
            .as_ref()
            .unwrap_or(&VarianceType::FixedSmallLog)
        {
            VarianceType::FixedSmallLog => {}
            other => return Err(Error::unsupported("variance_type", other.as_str())),
        }
        if !matches!(
            config.prediction_type,
            PredictionType::Epsilon | PredictionType::Sample
        ) {
            return Err(Error::unsupported(
                "prediction_type",
                config.prediction_type.as_str(),
            ));
        }
        let betas = betas_for_alpha_bar(config.num_train_timesteps);
        Ok(Self {
            alphas_cumprod: alphas_cumprod(&betas),
            betas,
            timesteps: (0..config.num_train_timesteps).rev().collect(),
            config: config.clone(),
        })
    }
}

impl Scheduler for UnClipScheduler {
    /// `round_half_even(i · (T-1)/(n-1))`, reversed (the karlo step ratio).
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        if n < 2 || n > t {
            return Err(Error::InvalidArgument(format!(
                "the prior needs between 2 and {t} inference steps, got {n}"
            )));
        }
        let ratio = (t - 1) as f64 / (n - 1) as f64;
        self.timesteps = (0..n)
            .rev()
            .map(|i| (i as f64 * ratio).round_ties_even() as usize)
            .collect();
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
        let i = self.timesteps.iter().position(|&x| x == t);
        // The pipeline passes the next timestep; after the last one it passes None (t - 1).
        let prev = i
            .and_then(|i| self.timesteps.get(i + 1).map(|&p| p as i64))
            .unwrap_or(t as i64 - 1);
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            1.0
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (beta, alpha) = if prev == t as i64 - 1 {
            (self.betas[t], 1.0 - self.betas[t])
        } else {
            let beta = 1.0 - a_t / a_prev;
            (beta, 1.0 - beta)
        };
        let mut x0 = if self.config.prediction_type == PredictionType::Epsilon {
            ((sample - (model_output * b_t.sqrt() as f64)?)? / a_t.sqrt() as f64)?
        } else {
            model_output.clone()
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let x0_coeff = (a_prev.sqrt() * beta) / b_t;
        let cur_coeff = alpha.sqrt() * b_prev / b_t;
        let mean = ((x0 * x0_coeff as f64)? + (sample * cur_coeff as f64)?)?;
        if t == 0 {
            return Ok(mean);
        }
        let noise = generator
            .randn(model_output.shape(), model_output.device())?
            .to_dtype(model_output.dtype())?;
        let variance = b_prev / b_t * beta;
        let std = (0.5 * variance.max(1e-20).ln()).exp();
        Ok((mean + (noise * std as f64)?)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        add_noise_with(&self.alphas_cumprod, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        false
    }
}
