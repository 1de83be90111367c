//! `scheduler_config.json` (diffusers' `ConfigMixin` for the schedulers): one struct with the
//! union of the keys Kandinsky's schedulers read, diffusers' defaults for the missing ones, and
//! the string options as enums.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;

/// A string option of a scheduler config as an enum: diffusers' values by name, and any other
/// string kept as `Other` so that the scheduler that cannot use it names it in its error.
macro_rules! string_option {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $value)] $variant,)*
            /// A value this implementation does not know.
            #[serde(untagged)]
            Other(String),
        }

        impl $name {
            /// The value as diffusers writes it.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $value,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($value => $name::$variant,)*
                    other => $name::Other(other.to_string()),
                }
            }
        }
    };
}

string_option!(
    /// `beta_schedule`.
    BetaSchedule {
        /// `linear`.
        Linear = "linear",
        /// `scaled_linear` (linear in √β).
        ScaledLinear = "scaled_linear",
        /// `squaredcos_cap_v2` (the cosine schedule).
        SquaredcosCapV2 = "squaredcos_cap_v2",
    }
);

string_option!(
    /// `prediction_type`: what the model predicts.
    PredictionType {
        /// The noise ε.
        Epsilon = "epsilon",
        /// The clean sample x₀.
        Sample = "sample",
        /// v = α ε − σ x₀.
        VPrediction = "v_prediction",
    }
);

string_option!(
    /// `timestep_spacing`: how inference timesteps are spread over the training ones.
    TimestepSpacing {
        /// `leading`.
        Leading = "leading",
        /// `trailing`.
        Trailing = "trailing",
        /// `linspace`.
        Linspace = "linspace",
    }
);

string_option!(
    /// `variance_type` of DDPM / UnCLIP (and DPM-Solver's learned-variance refusal).
    VarianceType {
        /// `fixed_small`.
        FixedSmall = "fixed_small",
        /// `fixed_small_log`.
        FixedSmallLog = "fixed_small_log",
        /// `fixed_large`.
        FixedLarge = "fixed_large",
        /// `learned`.
        Learned = "learned",
        /// `learned_range`.
        LearnedRange = "learned_range",
    }
);

string_option!(
    /// DPM-Solver's `algorithm_type`.
    AlgorithmType {
        /// `dpmsolver++`.
        DpmSolverPlusPlus = "dpmsolver++",
        /// `deis` (diffusers rewrites it to `dpmsolver++`).
        Deis = "deis",
    }
);

string_option!(
    /// DPM-Solver's second-order `solver_type`.
    SolverType {
        /// `midpoint`.
        Midpoint = "midpoint",
        /// `logrho` (diffusers rewrites it to `midpoint`).
        Logrho = "logrho",
        /// `bh1` (rewritten to `midpoint`).
        Bh1 = "bh1",
        /// `bh2` (rewritten to `midpoint`).
        Bh2 = "bh2",
    }
);

string_option!(
    /// DPM-Solver's `final_sigmas_type`: the sigma after the last step.
    FinalSigmasType {
        /// `zero`.
        Zero = "zero",
        /// `sigma_min`.
        SigmaMin = "sigma_min",
    }
);

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
#[serde(default)]
pub struct SchedulerConfig {
    /// `DDIMScheduler`, `DDPMScheduler`, `UnCLIPScheduler`, `DPMSolverMultistepScheduler`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Training timesteps.
    pub num_train_timesteps: usize,
    /// First beta of a linear schedule.
    pub beta_start: f64,
    /// Last beta of a linear schedule.
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    pub beta_schedule: BetaSchedule,
    /// Clamp the predicted x0.
    pub clip_sample: bool,
    /// Clamp range.
    pub clip_sample_range: f64,
    /// DDIM: use ᾱ = 1 past the last step.
    pub set_alpha_to_one: bool,
    /// Added to every timestep.
    pub steps_offset: usize,
    /// `epsilon` or `sample`.
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (DDPM).
    pub thresholding: bool,
    /// Quantile of dynamic thresholding.
    pub dynamic_thresholding_ratio: f64,
    /// Upper bound of the threshold.
    pub sample_max_value: f64,
    /// DDPM: `fixed_small`, `fixed_small_log`, `fixed_large`, `learned_range`; UnCLIP:
    /// `fixed_small_log`, `learned_range`.
    pub variance_type: Option<VarianceType>,
    /// `leading`, `trailing` or `linspace` (default `leading`, but `linspace` for
    /// `DPMSolverMultistepScheduler`: [`SchedulerConfig::load`] / [`SchedulerConfig::from_json`]
    /// apply the class default when the key is absent).
    pub timestep_spacing: TimestepSpacing,
    /// Explicit betas (unsupported: must be `null`).
    pub trained_betas: Option<Vec<f64>>,
    /// Whether the betas are rescaled to zero terminal SNR (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub rescale_betas_zero_snr: bool,
    /// DPM-Solver: solver order (1 or 2 supported).
    pub solver_order: usize,
    /// DPM-Solver: `dpmsolver++` (the only one supported).
    pub algorithm_type: AlgorithmType,
    /// DPM-Solver: second-order solver type, `midpoint` (the only one supported).
    pub solver_type: SolverType,
    /// DPM-Solver: first order at the last step when there are fewer than 15 steps.
    #[serde(deserialize_with = "bool_or_null")]
    pub lower_order_final: bool,
    /// DPM-Solver: always first order at the last step.
    #[serde(deserialize_with = "bool_or_null")]
    pub euler_at_final: bool,
    /// DPM-Solver: Karras sigmas (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub use_karras_sigmas: bool,
    /// DPM-Solver: exponential sigmas (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub use_exponential_sigmas: bool,
    /// DPM-Solver: beta sigmas (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub use_beta_sigmas: bool,
    /// DPM-Solver: uniform-logSNR steps (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub use_lu_lambdas: bool,
    /// DPM-Solver: flow-matching sigmas (unsupported: must be false).
    #[serde(deserialize_with = "bool_or_null")]
    pub use_flow_sigmas: bool,
    /// DPM-Solver: flow-matching shift (unused while `use_flow_sigmas` is false).
    pub flow_shift: f64,
    /// DPM-Solver: the sigma after the last step, `zero` (default) or `sigma_min`.
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// DPM-Solver: timesteps whose λ(t) is below this are cut off (default −∞: none).
    #[serde(deserialize_with = "float_or_token")]
    pub lambda_min_clipped: f64,
    /// The keys the JSON file held (filled by [`SchedulerConfig::load`] /
    /// [`SchedulerConfig::from_json`]); `None` counts every key as present. [`with_class`](super::with_class)
    /// needs it: like diffusers' `_use_default_values`, keys that were absent take the new
    /// class's defaults.
    #[serde(skip)]
    pub present_keys: Option<BTreeSet<String>>,
}

impl Default for SchedulerConfig {
    /// diffusers' `__init__` defaults of DDIM / DDPM (and of DPM-Solver for its own keys);
    /// [`SchedulerConfig::load`] applies DPM-Solver's `linspace` spacing when its file has none.
    fn default() -> Self {
        Self {
            class_name: String::new(),
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            variance_type: None,
            timestep_spacing: TimestepSpacing::Leading,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: Some(FinalSigmasType::Zero),
            lambda_min_clipped: f64::NEG_INFINITY,
            present_keys: None,
        }
    }
}

/// The most training timesteps a scheduler config may declare (the real ones have 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

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
        let refused = |m: String| {
            Error::InvalidArgument(format!(
                "{}: {m}; refused before building anything",
                path.display()
            ))
        };
        crate::loading::check_config_values(&value).map_err(refused)?;
        let mut config: SchedulerConfig = serde_json::from_value(value).map_err(json_err)?;
        // The schedule holds one value per training timestep.
        // Below 2 there is no schedule to step through (and no step size between timesteps).
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&config.num_train_timesteps) {
            return Err(refused(format!(
                "num_train_timesteps = {} (between 2 and {MAX_TRAIN_TIMESTEPS})",
                config.num_train_timesteps
            )));
        }
        if let Some(keys) = &present {
            if [
                super::DPM_SOLVER_MULTISTEP,
                super::EULER_DISCRETE,
                super::EULER_ANCESTRAL_DISCRETE,
            ]
            .contains(&config.class_name.as_str())
                && !keys.contains("timestep_spacing")
            {
                config.timestep_spacing = TimestepSpacing::Linspace;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).unwrap()
    }

    #[test]
    fn python_non_finite_tokens_parse() {
        let c = cfg(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "prediction_type": "NaN-Infinity"}"#,
        );
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(
            c.prediction_type,
            PredictionType::Other("NaN-Infinity".into())
        );
        // Absent from a DPM-Solver file: the class default, not DDIM/DDPM's "leading".
        assert_eq!(c.timestep_spacing, TimestepSpacing::Linspace);
        assert!(!c.has_key("timestep_spacing") && c.has_key("prediction_type"));
    }

    #[test]
    fn schedules_without_two_timesteps_are_refused() {
        // Found by the configs fuzz target: 0 underflowed `n - 1` building the betas.
        for n in [0, 1, MAX_TRAIN_TIMESTEPS + 1] {
            let json =
                format!(r#"{{"_class_name": "UnCLIPScheduler", "num_train_timesteps": {n}}}"#);
            let err = SchedulerConfig::from_json(&json).unwrap_err().to_string();
            assert!(
                err.contains(&format!("num_train_timesteps = {n} (between 2 and")),
                "{err}"
            );
        }
        assert_eq!(cfg(r#"{"num_train_timesteps": 2}"#).num_train_timesteps, 2);
    }
}
