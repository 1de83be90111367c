//! diffusers `schedulers/scheduling_euler_ancestral_discrete.py`:
//! `EulerAncestralDiscreteScheduler` (A1111's "Euler a"): an Euler step down to σ_down, then
//! fresh noise of σ_up drawn from the generator at every step, as diffusers draws it.

use super::scheduling_euler_discrete::{sigma_schedule_methods, zip, Sigmas};
use super::{PredictionType, Scheduler, SchedulerConfig};
use crate::error::Result;
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

/// `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    sigmas: Sigmas,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler (ε or v prediction, as diffusers').
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            sigmas: Sigmas::new(
                config,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    sigma_schedule_methods!();

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
        let x0 = self.sigmas.x0_of(from);
        let x = zip(sample, eps, |x, out| x + (x - x0(x, out)) / from * dt)?;
        let noise = generator.randn(eps.shape(), eps.device())?;
        zip(&x, &noise, |x, n| x + n * up)
    }
}
