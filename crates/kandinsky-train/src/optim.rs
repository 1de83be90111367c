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
    /// Per-element learning-rate factors of some parameters (broadcast to their shape).
    lr_scales: HashMap<String, Tensor>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
            lr_scales: HashMap::new(),
        }
    }

    /// Multiplies the learning rate of parameter `name` element by element by `scale` (a tensor
    /// that broadcasts to its shape): parameters added to a trained model (a widened `conv_in`)
    /// can learn faster than the rest. Adam's steps do not depend on the gradient's scale, so
    /// this cannot be done by scaling gradients.
    pub fn set_lr_scale(&mut self, name: &str, scale: Tensor) {
        self.lr_scales.insert(name.to_string(), scale);
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
            let delta = match self.lr_scales.get(name) {
                Some(s) => (update * c.lr)?.broadcast_mul(s)?,
                None => (update * c.lr)?,
            };
            var.set(&(decayed - delta)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn lr_scales_multiply_each_elements_step() {
        let d = Device::Cpu;
        let start = Tensor::new(&[1f32, 1., 1.], &d).unwrap();
        let plain = Var::from_tensor(&start).unwrap();
        let scaled = Var::from_tensor(&start).unwrap();
        let params = vec![
            ("plain".to_string(), plain.clone()),
            ("scaled".to_string(), scaled.clone()),
        ];
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        });
        opt.set_lr_scale("scaled", Tensor::new(&[1f32, 10., 0.], &d).unwrap());
        let loss =
            (plain.as_tensor().sum_all().unwrap() + scaled.as_tensor().sum_all().unwrap()).unwrap();
        opt.step(&params, &loss.backward().unwrap()).unwrap();
        let moved = |v: &Var| -> Vec<f32> { (&start - v.as_tensor()).unwrap().to_vec1().unwrap() };
        let (p, s) = (moved(&plain), moved(&scaled));
        // Adam's first step moves every element by about lr, whatever its gradient.
        for x in &p {
            assert!((x - 1e-2).abs() < 1e-6, "{p:?}");
        }
        assert!(
            (s[0] - p[0]).abs() < 1e-7 && (s[1] - 10.0 * p[1]).abs() < 1e-6 && s[2] == 0.0,
            "{s:?}"
        );
    }
}
