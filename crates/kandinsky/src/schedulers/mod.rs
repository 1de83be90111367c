//! Noise schedulers (diffusers `schedulers/`), chosen from `scheduler/scheduler_config.json` by
//! `_class_name` as diffusers does.
//!
//! Scheduler arithmetic follows diffusers' float32 tensors: the schedules (`betas`,
//! `alphas_cumprod`) are built in f32 the way torch builds them, and per-step coefficients are
//! f32 scalars.

pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_unclip;

use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// `_class_name` of diffusers' `DPMSolverMultistepScheduler`.
pub const DPM_SOLVER_MULTISTEP: &str = "DPMSolverMultistepScheduler";

fn d_1000() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_eps() -> String {
    "epsilon".into()
}
fn d_ratio() -> f64 {
    0.995
}
fn d_leading() -> String {
    "leading".into()
}
fn d_two() -> usize {
    2
}
fn d_dpmpp() -> String {
    "dpmsolver++".into()
}
fn d_midpoint() -> String {
    "midpoint".into()
}
fn d_zero_sigmas() -> Option<String> {
    Some("zero".into())
}
fn d_neg_inf() -> f64 {
    f64::NEG_INFINITY
}

/// A `bool` that may also be written as `null` (read as `false`).
fn bool_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A float that may also be one of Python's non-finite JSON tokens (quoted by
/// [`quote_non_finite`] before parsing).
fn float_or_token<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        N(f64),
        S(String),
    }
    match F::deserialize(d)? {
        F::N(v) => Ok(v),
        F::S(s) => match s.as_str() {
            "-Infinity" => Ok(f64::NEG_INFINITY),
            "Infinity" => Ok(f64::INFINITY),
            "NaN" => Ok(f64::NAN),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, got {other:?}"
            ))),
        },
    }
}

/// Python's `json.dumps` writes non-finite floats as the bare tokens `NaN`, `Infinity` and
/// `-Infinity` (diffusers saves `"lambda_min_clipped": -Infinity` for DPM-Solver), which
/// serde_json rejects; this quotes them (outside strings) so that they parse as strings.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|tok| rest.starts_with(tok))
        {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The union of the scheduler config keys Kandinsky uses; missing keys take the defaults of the
/// class named by `_class_name` (see each scheduler's constructor).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// `DDIMScheduler`, `DDPMScheduler`, `UnCLIPScheduler`, `DPMSolverMultistepScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: String,
    /// Training timesteps.
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    /// First beta of a linear schedule.
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    /// Last beta of a linear schedule.
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    /// Clamp the predicted x0.
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    /// Clamp range.
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    /// DDIM: use ᾱ = 1 past the last step.
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    /// Added to every timestep.
    #[serde(default)]
    pub steps_offset: usize,
    /// `epsilon` or `sample`.
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    /// Dynamic thresholding (DDPM).
    #[serde(default)]
    pub thresholding: bool,
    /// Quantile of dynamic thresholding.
    #[serde(default = "d_ratio")]
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the threshold.
    #[serde(default = "d_one")]
    pub sample_max_value: f64,
    /// DDPM: `fixed_small`, `fixed_small_log`, `fixed_large`, `learned_range`; UnCLIP:
    /// `fixed_small_log`, `learned_range`.
    #[serde(default)]
    pub variance_type: Option<String>,
    /// `leading`, `trailing` or `linspace` (default `leading`, but `linspace` for
    /// `DPMSolverMultistepScheduler`: [`SchedulerConfig::load`] / [`SchedulerConfig::from_json`]
    /// apply the class default when the key is absent).
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    /// Explicit betas (unsupported: must be `null`).
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Whether the betas are rescaled to zero terminal SNR (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub rescale_betas_zero_snr: bool,
    /// DPM-Solver: solver order (1 or 2 supported).
    #[serde(default = "d_two")]
    pub solver_order: usize,
    /// DPM-Solver: `dpmsolver++` (the only one supported).
    #[serde(default = "d_dpmpp")]
    pub algorithm_type: String,
    /// DPM-Solver: second-order solver type, `midpoint` (the only one supported).
    #[serde(default = "d_midpoint")]
    pub solver_type: String,
    /// DPM-Solver: first order at the last step when there are fewer than 15 steps.
    #[serde(default = "d_true", deserialize_with = "bool_or_null")]
    pub lower_order_final: bool,
    /// DPM-Solver: always first order at the last step.
    #[serde(default, deserialize_with = "bool_or_null")]
    pub euler_at_final: bool,
    /// DPM-Solver: Karras sigmas (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_karras_sigmas: bool,
    /// DPM-Solver: exponential sigmas (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_exponential_sigmas: bool,
    /// DPM-Solver: beta sigmas (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_beta_sigmas: bool,
    /// DPM-Solver: uniform-logSNR steps (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_lu_lambdas: bool,
    /// DPM-Solver: flow-matching sigmas (unsupported: must be false).
    #[serde(default, deserialize_with = "bool_or_null")]
    pub use_flow_sigmas: bool,
    /// DPM-Solver: flow-matching shift (unused while `use_flow_sigmas` is false).
    #[serde(default = "d_one")]
    pub flow_shift: f64,
    /// DPM-Solver: the sigma after the last step, `zero` (default) or `sigma_min`.
    #[serde(default = "d_zero_sigmas")]
    pub final_sigmas_type: Option<String>,
    /// DPM-Solver: timesteps whose λ(t) is below this are cut off (default −∞: none).
    #[serde(default = "d_neg_inf", deserialize_with = "float_or_token")]
    pub lambda_min_clipped: f64,
    /// The keys the JSON file held (filled by [`SchedulerConfig::load`] /
    /// [`SchedulerConfig::from_json`]); `None` counts every key as present. [`with_class`]
    /// needs it: like diffusers' `_use_default_values`, keys that were absent take the new
    /// class's defaults.
    #[serde(skip)]
    pub present_keys: Option<BTreeSet<String>>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound {
                what: "config file".into(),
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path)
    }

    /// Parses a JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::parse(text, Path::new("<inline scheduler config>"))
    }

    /// Parses (accepting Python's `-Infinity` / `Infinity` / `NaN` tokens), records the keys
    /// present and applies the defaults of the named class that differ from the serde defaults.
    fn parse(text: &str, path: &Path) -> Result<Self> {
        let json_err = |source: serde_json::Error| Error::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value =
            serde_json::from_str(&quote_non_finite(text)).map_err(json_err)?;
        let present: Option<BTreeSet<String>> =
            value.as_object().map(|o| o.keys().cloned().collect());
        let mut config: SchedulerConfig = serde_json::from_value(value).map_err(json_err)?;
        if let Some(keys) = &present {
            if config.class_name == DPM_SOLVER_MULTISTEP && !keys.contains("timestep_spacing") {
                config.timestep_spacing = "linspace".into();
            }
        }
        config.present_keys = present;
        Ok(config)
    }

    /// Whether `key` was in the JSON file (always true when the keys were not recorded).
    pub fn has_key(&self, key: &str) -> bool {
        self.present_keys.as_ref().is_none_or(|k| k.contains(key))
    }
}

/// The `__init__` keys (among this struct's fields) of the classes [`with_class`] builds.
fn init_keys(class_name: &str) -> Option<&'static [&'static str]> {
    Some(match class_name {
        "DDIMScheduler" => &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "clip_sample",
            "set_alpha_to_one",
            "steps_offset",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        ],
        "DDPMScheduler" => &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ],
        DPM_SOLVER_MULTISTEP => &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "solver_order",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "sample_max_value",
            "algorithm_type",
            "solver_type",
            "lower_order_final",
            "euler_at_final",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "flow_shift",
            "final_sigmas_type",
            "lambda_min_clipped",
            "variance_type",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ],
        _ => return None,
    })
}

/// diffusers' `Class.from_config(config)` for another scheduler class (what `--scheduler`
/// does with the model's own scheduler config): the new class's `__init__` keys that the
/// config file held carry over; the others take the new class's defaults (keys the file did
/// not hold count as absent, as diffusers' `_use_default_values` makes them); keys the new
/// class does not take are left as they are and ignored by it. Targets: `DDIMScheduler`,
/// `DDPMScheduler`, `DPMSolverMultistepScheduler`, or `config`'s own class (a copy).
///
/// E.g. the 2.2 decoder's hub `DDPMScheduler` config (no `timestep_spacing` or
/// `variance_type` in the file) gives a DPM-Solver++ with `linspace` spacing and
/// `variance_type = None`, while a config saved by a recent diffusers (every key written,
/// `timestep_spacing: "leading"`, `variance_type: "fixed_small"`) keeps `leading` spacing.
pub fn with_class(config: &SchedulerConfig, class_name: &str) -> Result<SchedulerConfig> {
    if class_name == config.class_name {
        return Ok(config.clone());
    }
    let keys =
        init_keys(class_name).ok_or_else(|| Error::unsupported("_class_name", class_name))?;
    let mut defaults =
        SchedulerConfig::from_json(&format!(r#"{{"_class_name": "{class_name}"}}"#))?;
    let mut out = config.clone();
    out.class_name = class_name.into();
    macro_rules! carry {
        ($($field:ident),* $(,)?) => {
            $({
                let key = stringify!($field);
                if keys.contains(&key) && !config.has_key(key) {
                    std::mem::swap(&mut out.$field, &mut defaults.$field);
                }
            })*
        };
    }
    carry!(
        num_train_timesteps,
        beta_start,
        beta_end,
        beta_schedule,
        clip_sample,
        clip_sample_range,
        set_alpha_to_one,
        steps_offset,
        prediction_type,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
        variance_type,
        timestep_spacing,
        trained_betas,
        rescale_betas_zero_snr,
        solver_order,
        algorithm_type,
        solver_type,
        lower_order_final,
        euler_at_final,
        use_karras_sigmas,
        use_exponential_sigmas,
        use_beta_sigmas,
        use_lu_lambdas,
        use_flow_sigmas,
        flow_shift,
        final_sigmas_type,
        lambda_min_clipped,
    );
    Ok(out)
}

/// `betas` as diffusers builds them (f32).
pub(crate) fn betas(c: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = c.num_train_timesteps;
    Ok(match c.beta_schedule.as_str() {
        "linear" => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
        "scaled_linear" => {
            linspace_f32((c.beta_start as f32).sqrt(), (c.beta_end as f32).sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        "squaredcos_cap_v2" => betas_for_alpha_bar(n),
        other => return Err(Error::unsupported("beta_schedule", other)),
    })
}

/// `torch.linspace(start, end, n, dtype=float32)`: the first half counts up from `start`, the
/// second half down from `end`.
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
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
pub(crate) fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
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

/// `torch.cumprod(1 - betas)` in f32.
pub(crate) fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f32;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// Inference timesteps for "leading" / "trailing" / "linspace" spacing (DDPM and DDIM).
pub(crate) fn spaced_timesteps(c: &SchedulerConfig, n: usize) -> Result<Vec<usize>> {
    let t = c.num_train_timesteps;
    if n == 0 || n > t {
        return Err(Error::InvalidArgument(format!(
            "the number of inference steps must be between 1 and {t}, got {n}"
        )));
    }
    Ok(match c.timestep_spacing.as_str() {
        "leading" => {
            let ratio = t / n;
            (0..n).rev().map(|i| i * ratio + c.steps_offset).collect()
        }
        "trailing" => {
            let ratio = t as f64 / n as f64;
            let mut v = Vec::new();
            let mut x = t as f64;
            while x > 0.0 {
                v.push((x.round_ties_even() as usize).saturating_sub(1));
                x -= ratio;
            }
            v
        }
        "linspace" => {
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
        other => return Err(Error::unsupported("timestep_spacing", other)),
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
}

/// `_threshold_sample` (dynamic thresholding, DDPM and DPM-Solver): per sample,
/// `s = clamp(quantile(|x|, ratio), 1, max)`, `x = clamp(x, -s, s) / s`.
pub(crate) fn threshold_sample(x: &Tensor, ratio: f64, max: f64) -> Result<Tensor> {
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
pub(crate) fn add_noise_with(
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

/// Builds the scheduler a config names.
pub fn from_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler + Send>> {
    Ok(match config.class_name.as_str() {
        "DDIMScheduler" => Box::new(scheduling_ddim::DdimScheduler::new(config)?),
        "DDPMScheduler" => Box::new(scheduling_ddpm::DdpmScheduler::new(config)?),
        DPM_SOLVER_MULTISTEP => {
            Box::new(scheduling_dpmsolver_multistep::DpmSolverMultistepScheduler::new(config)?)
        }
        "UnCLIPScheduler" => Box::new(scheduling_unclip::UnClipScheduler::new(config)?),
        other => return Err(Error::unsupported("_class_name", other)),
    })
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

    #[test]
    fn python_non_finite_tokens_parse() {
        let c = cfg(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "prediction_type": "NaN-Infinity"}"#,
        );
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.prediction_type, "NaN-Infinity");
        // Absent from a DPM-Solver file: the class default, not DDIM/DDPM's "leading".
        assert_eq!(c.timestep_spacing, "linspace");
        assert!(!c.has_key("timestep_spacing") && c.has_key("prediction_type"));
    }

    #[test]
    fn with_class_carries_present_keys_only() {
        // The 2.2 decoder's hub DDPM config: no timestep_spacing / variance_type in the file.
        let hub = cfg(
            r#"{"_class_name": "DDPMScheduler", "beta_end": 0.012, "beta_schedule": "linear",
            "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "set_alpha_to_one": false, "steps_offset": 1,
            "thresholding": false, "trained_betas": null}"#,
        );
        let d = with_class(&hub, DPM_SOLVER_MULTISTEP).unwrap();
        assert_eq!(d.class_name, DPM_SOLVER_MULTISTEP);
        assert_eq!(
            (d.timestep_spacing.as_str(), d.steps_offset),
            ("linspace", 1)
        );
        assert_eq!((d.beta_start, d.beta_end), (0.00085, 0.012));
        assert_eq!(d.variance_type, None);
        assert_eq!(
            (d.solver_order, d.algorithm_type.as_str()),
            (2, "dpmsolver++")
        );
        let mut saved = hub.clone();
        saved.present_keys = None; // every key written, as a recent save_config does
        saved.variance_type = Some("fixed_small".into());
        let d = with_class(&saved, DPM_SOLVER_MULTISTEP).unwrap();
        assert_eq!(d.timestep_spacing, "leading");
        assert_eq!(d.variance_type.as_deref(), Some("fixed_small"));
        assert!(from_config(&d).is_ok());
        // DDIM from the same hub file: set_alpha_to_one present (false), clip_sample false.
        let ddim = with_class(&hub, "DDIMScheduler").unwrap();
        assert!(!ddim.set_alpha_to_one && !ddim.clip_sample);
        assert!(with_class(&hub, "EulerDiscreteScheduler").is_err());
    }
}
