//! AdamW (decoupled weight decay, bias-corrected moments) whose state is plain named tensors, so a
//! checkpoint holds it and training resumes exactly where it stopped.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use kandinsky::error::{Error, Result};
use std::collections::HashMap;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (applied to matrices and kernels only).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer: moments per parameter name and the step count.
pub struct AdamW {
    /// Hyper-parameters (the learning rate may be changed between steps).
    pub config: AdamWConfig,
    step: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let p = var.as_tensor();
            let decayed = if c.weight_decay > 0.0 && p.rank() >= 2 {
                (p * (1.0 - c.lr * c.weight_decay))?
            } else {
                p.clone()
            };
            var.set(&(decayed - (update * c.lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The state as named tensors (`adamw.m.<name>`, `adamw.v.<name>`, `adamw.step`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, t) in &self.m {
            out.insert(format!("adamw.m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("adamw.v.{k}"), t.clone());
        }
        out.insert(
            "adamw.step".to_string(),
            Tensor::new(&[self.step as i64], &candle_core::Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores [`Self::state`] (other keys are ignored).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state
            .get("adamw.step")
            .ok_or_else(|| Error::InvalidArgument("checkpoint without adamw.step".into()))?;
        self.step = step.to_vec1::<i64>()?[0] as u64;
        for (k, t) in state {
            if let Some(name) = k.strip_prefix("adamw.m.") {
                self.m.insert(name.to_string(), t.clone());
            } else if let Some(name) = k.strip_prefix("adamw.v.") {
                self.v.insert(name.to_string(), t.clone());
            }
        }
        Ok(())
    }
}
