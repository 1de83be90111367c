//! diffusers `schedulers/scheduling_ddim.py`: `DDIMScheduler` with `eta = 0` (the 2.1 default).

use super::{
    add_noise_with, alphas_cumprod, betas, spaced_timesteps, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// `DDIMScheduler` (deterministic: `eta = 0`, as every Kandinsky pipeline calls it).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
}

impl DdimScheduler {
    /// Builds the scheduler.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if let PredictionType::Other(p) = &config.prediction_type {
            return Err(Error::unsupported("prediction_type", p));
        }
        if config.thresholding {
            return Err(Error::unsupported("thresholding", true));
        }
        let ac = alphas_cumprod(&betas(config)?);
        let t = config.num_train_timesteps;
        Ok(Self {
            final_alpha_cumprod: if config.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            config: config.clone(),
            timesteps: (0..t).rev().collect(),
            num_inference_steps: t,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.timesteps = spaced_timesteps(&self.config, n)?;
        self.num_inference_steps = n;
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
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let prev = t as i64 - (self.config.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (sa, sb) = (a_t.sqrt() as f64, (1.0 - a_t).sqrt() as f64);
        let (mut x0, eps) = match &self.config.prediction_type {
            PredictionType::Epsilon => (
                ((sample - (model_output * sb)?)? / sa)?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                ((sample - (model_output * sa)?)? / sb)?,
            ),
            PredictionType::VPrediction => (
                ((sample * sa)? - (model_output * sb)?)?,
                ((model_output * sa)? + (sample * sb)?)?,
            ),
            PredictionType::Other(p) => return Err(Error::unsupported("prediction_type", p)),
        };
        if self.config.clip_sample {
            let r = self.config.clip_sample_range as f32;
            x0 = x0.clamp(-r, r)?;
        }
        let dir = (&eps * (1.0 - a_prev).sqrt() as f64)?;
        Ok(((x0 * a_prev.sqrt() as f64)? + dir)?)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        add_noise_with(&self.alphas_cumprod, original, noise, t)
    }

    fn uses_learned_variance(&self) -> bool {
        false
    }
}
