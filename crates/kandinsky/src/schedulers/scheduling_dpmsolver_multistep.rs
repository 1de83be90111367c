//! diffusers `schedulers/scheduling_dpmsolver_multistep.py`: `DPMSolverMultistepScheduler`
//! restricted to DPM-Solver++ 2M (`algorithm_type = "dpmsolver++"`, `solver_order` 1 or 2,
//! `solver_type = "midpoint"`) with the plain noise schedule (no Karras / exponential / beta /
//! Lu / flow sigmas), as `--scheduler dpm++2m` builds it from a model's DDIM / DDPM config
//! (see [`super::with_class`]).
//!
//! Numerics follow diffusers: `σ_t = √((1-ᾱ_t)/ᾱ_t)` is computed in f32 over the training
//! schedule (the numpy `interp` at integer timesteps and the float64 round trip of
//! `set_timesteps` leave these f32 values unchanged), and every per-step coefficient
//! (`α_t = 1/√(σ²+1)`, `σ_t·α_t`, `λ = ln α - ln σ`, `h`, `e^{-h} - 1`, `r0`) is an f32 scalar
//! computed in the order torch's 0-d float32 tensors compute it. The tensor updates are f32.
//! DPM-Solver++ is deterministic: the generator is never used.

use super::{
    alphas_cumprod, betas, AlgorithmType, FinalSigmasType, PredictionType, Scheduler,
    SchedulerConfig, SolverType, TimestepSpacing, VarianceType,
};
use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{DType, Tensor};

/// `DPMSolverMultistepScheduler` (DPM-Solver++ 2M).
///
/// The solver is multistep: [`Scheduler::step`] remembers the previous data prediction, so the
/// steps must be taken in order, once each, after [`Scheduler::set_timesteps`].
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    config: SchedulerConfig,
    /// `√((1-ᾱ_t)/ᾱ_t)` per training timestep (f32).
    train_sigmas: Vec<f32>,
    /// `num_train_timesteps - clipped_idx` (diffusers' `last_timestep`).
    last_timestep: usize,
    timesteps: Vec<usize>,
    /// σ per inference step plus the final one (before `set_timesteps`: the training sigmas).
    sigmas: Vec<f32>,
    num_inference_steps: Option<usize>,
    /// The previous converted model output (x0 prediction); diffusers' `model_outputs[-2]`.
    prev_model_output: Option<Tensor>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

/// `(α_t, σ_t)` from `σ` as `_sigma_to_alpha_sigma_t` computes them in f32:
/// `α_t = 1 / (σ² + 1)^0.5`, `σ_t = σ · α_t`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `λ = ln α_t - ln σ_t` (f32; `+∞` when `σ_t = 0`).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// `t · c` with the f32 scalar `c` (exact: candle's affine multiplies by `c` as f32, adds 0).
fn scale(t: &Tensor, c: f32) -> Result<Tensor> {
    Ok((t * c as f64)?)
}

/// `t / c`, a true division like torch's (candle's `Tensor / f64` multiplies by `1/c`).
fn div_scalar(t: &Tensor, c: f32) -> Result<Tensor> {
    let d = Tensor::new(c, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&d)?)
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler; options outside DPM-Solver++ 1S/2M with the plain sigma schedule
    /// are `UnsupportedConfig` errors.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let c = config;
        if !matches!(
            c.algorithm_type,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::Deis
        ) {
            // diffusers rewrites "deis" to "dpmsolver++".
            return Err(Error::unsupported(
                "algorithm_type",
                c.algorithm_type.as_str(),
            ));
        }
        if !matches!(
            c.solver_type,
            SolverType::Midpoint | SolverType::Logrho | SolverType::Bh1 | SolverType::Bh2
        ) {
            // diffusers rewrites "logrho" / "bh1" / "bh2" to "midpoint".
            return Err(Error::unsupported("solver_type", c.solver_type.as_str()));
        }
        if !(1..=2).contains(&c.solver_order) {
            return Err(Error::unsupported("solver_order", c.solver_order));
        }
        if let PredictionType::Other(p) = &c.prediction_type {
            return Err(Error::unsupported("prediction_type", p));
        }
        if !matches!(
            c.final_sigmas_type,
            Some(FinalSigmasType::Zero | FinalSigmasType::SigmaMin)
        ) {
            return Err(Error::unsupported(
                "final_sigmas_type",
                c.final_sigmas_type.as_ref().map(|f| f.as_str()),
            ));
        }
        // diffusers keeps only `model_output[:, :3]` for learned variances, which cannot work
        // with 4-channel latents (it fails there too).
        if matches!(
            c.variance_type,
            Some(VarianceType::Learned | VarianceType::LearnedRange)
        ) {
            return Err(Error::unsupported(
                "variance_type",
                c.variance_type.as_ref().map(|v| v.as_str()),
            ));
        }
        for (key, on) in [
            ("use_karras_sigmas", c.use_karras_sigmas),
            ("use_exponential_sigmas", c.use_exponential_sigmas),
            ("use_beta_sigmas", c.use_beta_sigmas),
            ("use_lu_lambdas", c.use_lu_lambdas),
            ("use_flow_sigmas", c.use_flow_sigmas),
        ] {
            if on {
                return Err(Error::unsupported(key, true));
            }
        }
        let t = c.num_train_timesteps;
        if t < 2 {
            return Err(Error::InvalidArgument(format!(
                "num_train_timesteps must be at least 2, got {t}"
            )));
        }
        let ac = alphas_cumprod(&betas(c)?);
        // self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5, in f32.
        let train_sigmas: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        // clipped_idx = searchsorted(flip(lambda_t), lambda_min_clipped) with
        // lambda_t = log(sqrt(ac)) - log(sqrt(1 - ac)), increasing once flipped.
        let clipped_idx = ac
            .iter()
            .rev()
            .position(|&a| {
                let l = lambda(a.sqrt(), (1.0 - a).sqrt());
                l as f64 >= c.lambda_min_clipped
            })
            .unwrap_or(t);
        if clipped_idx >= t {
            return Err(Error::InvalidArgument(format!(
                "lambda_min_clipped {} leaves no timestep",
                c.lambda_min_clipped
            )));
        }
        Ok(Self {
            config: c.clone(),
            sigmas: train_sigmas.clone(),
            train_sigmas,
            last_timestep: t - clipped_idx,
            timesteps: (0..t).rev().collect(),
            num_inference_steps: None,
            prev_model_output: None,
            lower_order_nums: 0,
            step_index: None,
        })
    }

    /// The inference timesteps of `set_timesteps(n)` ("linspace" / "leading" / "trailing"
    /// exactly as DPMSolverMultistepScheduler computes them; they differ from DDIM / DDPM's).
    fn compute_timesteps(&self, n: usize) -> Result<Vec<usize>> {
        let c = &self.config;
        let t = c.num_train_timesteps;
        if n == 0 || n > t {
            return Err(Error::InvalidArgument(format!(
                "the number of inference steps must be between 1 and {t}, got {n}"
            )));
        }
        let last = self.last_timestep;
        let ts: Vec<i64> = match &c.timestep_spacing {
            // np.linspace(0, last - 1, n + 1).round()[::-1][:-1]: y_i = i * ((last-1)/n), the
            // endpoint exactly last - 1; round half to even.
            TimestepSpacing::Linspace => {
                let stop = (last - 1) as f64;
                let step = stop / n as f64;
                (1..=n)
                    .rev()
                    .map(|i| {
                        let y = if i == n { stop } else { i as f64 * step };
                        y.round_ties_even() as i64
                    })
                    .collect()
            }
            // step_ratio = last // (n + 1); (arange(0, n + 1) * step_ratio)[::-1][:-1] + offset.
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as i64)
                    .collect()
            }
            // np.arange(last, 0, -t / n).round() - 1, with numpy's float arange: length
            // ceil((0 - last) / -ratio), values start + i * ((start - ratio) - start).
            TimestepSpacing::Trailing => {
                let step = -(t as f64 / n as f64);
                let start = last as f64;
                let len = ((0.0 - start) / step).ceil().max(0.0) as usize;
                let delta = (start + step) - start;
                (0..len)
                    .map(|i| {
                        let v = match i {
                            0 => start,
                            1 => start + step,
                            _ => start + i as f64 * delta,
                        };
                        v.round_ties_even() as i64 - 1
                    })
                    .collect()
            }
            other => return Err(Error::unsupported("timestep_spacing", other.as_str())),
        };
        ts.into_iter()
            .map(|x| {
                usize::try_from(x).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "{} spacing gives the negative timestep {x} for {n} steps (as diffusers \
                         computes it); choose another number of steps",
                        c.timestep_spacing.as_str()
                    ))
                })
            })
            .collect()
    }

    /// `index_for_timestep`: the position of `t` in the schedule, the second one when `t`
    /// repeats, the last position when it is absent.
    fn index_for_timestep(&self, t: usize) -> usize {
        let mut hits = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|&(_, &x)| x == t)
            .map(|(i, _)| i);
        match (hits.next(), hits.next()) {
            (None, _) => self.timesteps.len().saturating_sub(1),
            (Some(_), Some(second)) => second,
            (Some(first), None) => first,
        }
    }

    /// `_threshold_sample` with this config's ratio and maximum.
    fn threshold(&self, x: &Tensor) -> Result<Tensor> {
        super::threshold_sample(
            x,
            self.config.dynamic_thresholding_ratio,
            self.config.sample_max_value,
        )
    }

    /// `convert_model_output` for DPM-Solver++: the data (x0) prediction at step `i`.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let x0 = match &self.config.prediction_type {
            // (sample - sigma_t * model_output) / alpha_t
            PredictionType::Epsilon => {
                div_scalar(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?
            }
            PredictionType::Sample => model_output.clone(),
            // alpha_t * sample - sigma_t * model_output
            PredictionType::VPrediction => {
                (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?
            }
            PredictionType::Other(other) => {
                return Err(Error::unsupported("prediction_type", other))
            }
        };
        if self.config.thresholding {
            self.threshold(&x0)
        } else {
            Ok(x0)
        }
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let ts = self.compute_timesteps(n)?;
        let last_train = self.train_sigmas.len() - 1;
        // np.interp(timesteps, arange(T), sigmas) at integer timesteps (clamped at the end).
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| self.train_sigmas[t.min(last_train)])
            .collect();
        sigmas.push(
            match self.config.final_sigmas_type.as_ref().map(|f| f.as_str()) {
                Some("sigma_min") => self.train_sigmas[0],
                _ => 0.0,
            },
        );
        self.num_inference_steps = Some(ts.len());
        self.timesteps = ts;
        self.sigmas = sigmas;
        self.prev_model_output = None;
        self.lower_order_nums = 0;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        if self.num_inference_steps.is_none() {
            return Err(Error::InvalidArgument(
                "DPMSolverMultistepScheduler: call set_timesteps before step".into(),
            ));
        }
        let i = match self.step_index {
            Some(i) => i,
            None => self.index_for_timestep(timestep),
        };
        let n = self.timesteps.len();
        if i >= n {
            return Err(Error::InvalidArgument(format!(
                "DPMSolverMultistepScheduler: step {} past the last of {n} steps",
                i + 1
            )));
        }
        let solver_order = self.config.solver_order;
        let final_zero = self.config.final_sigmas_type == Some(FinalSigmasType::Zero);
        let lower_order_final = i == n - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && n < 15)
                || final_zero);
        let out_dtype = sample.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let m0 = self.convert_model_output(&model_output, &sample, i)?;

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        // sigma_t / sigma_s0 and alpha_t * (exp(-h) - 1.0), shared by both orders.
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        // dpm_solver_first_order_update (dpmsolver++): the first term pair.
        let x = (scale(&sample, c_sample)? - scale(&m0, c_d0)?)?;
        let prev = match &self.prev_model_output {
            Some(m1) if solver_order == 2 && self.lower_order_nums >= 1 && !lower_order_final => {
                // multistep_dpm_solver_second_order_update, dpmsolver++ / midpoint:
                // r0 = h_0 / h, D1 = (1 / r0) (m0 - m1), x -= 0.5 * (alpha_t (e^{-h} - 1)) D1.
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let h_0 = lambda_s0 - lambda_s1;
                let r0 = h_0 / h;
                let d1 = scale(&(&m0 - m1)?, 1.0f32 / r0)?;
                (x - scale(&d1, 0.5f32 * c_d0)?)?
            }
            _ => x,
        };
        self.prev_model_output = Some(m0);
        if self.lower_order_nums < solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev.to_dtype(out_dtype)?)
    }

    /// diffusers' DPM-Solver `add_noise`: `σ = sigmas[index_for_timestep(t)]`,
    /// `α_t x0 + σ_t noise` with `α_t = 1/√(σ²+1)`, `σ_t = σ α_t` (equal to `√ᾱ_t`, `√(1-ᾱ_t)`
    /// up to f32 rounding). Before `set_timesteps` it looks `t` up in the 999…0 list like
    /// diffusers (which then reads the training sigma at `999 - t`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: usize) -> Result<Tensor> {
        let sigma = self.sigmas[self.index_for_timestep(timestep)];
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        Ok((scale(original, alpha_t)? + scale(noise, sigma_t)?)?)
    }

    fn uses_learned_variance(&self) -> bool {
        false
    }
}
