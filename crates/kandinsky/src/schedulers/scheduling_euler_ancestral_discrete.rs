//! diffusers `schedulers/scheduling_euler_ancestral_discrete.py`:
//! `EulerAncestralDiscreteScheduler` (A1111's "Euler a"): an Euler step down to σ_down, then
//! fresh noise of σ_up drawn from the generator at every step, as diffusers draws it.

use super::scheduling_euler_discrete::{zip, Sigmas};
use super::{Scheduler, SchedulerConfig};
use crate::error::Result;
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    sigmas: Sigmas,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler (epsilon prediction).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            sigmas: Sigmas::new(config)?,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        self.sigmas.set(n)
    }

    fn timesteps(&self) -> &[usize] {
        &self.sigmas.entries
    }

    fn step(
        &mut self,
        eps: &Tensor,
        i: usize,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let from = self.sigmas.sigma(i)?;
        let to = self.sigmas.sigma(i + 1)?;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let dt = down - from;
        let x = zip(sample, eps, |x, e| {
            let pred = x - from * e;
            x + (x - pred) / from * dt
        })?;
        let noise = generator.randn(eps.shape(), eps.device())?;
        zip(&x, &noise, |x, n| x + n * up)
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
}
