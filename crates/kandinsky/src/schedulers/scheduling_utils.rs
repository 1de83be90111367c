//! diffusers `schedulers/scheduling_utils.py`: the scheduler classes by `_class_name`, building
//! one from a config, and `Class.from_config(other.config)` (switching classes).

use super::{
    scheduling_ddim, scheduling_ddpm, scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete, scheduling_euler_discrete, scheduling_unclip, Scheduler,
    SchedulerConfig,
};
use crate::error::{Error, Result};

/// `_class_name` of diffusers' `DPMSolverMultistepScheduler`.
pub const DPM_SOLVER_MULTISTEP: &str = "DPMSolverMultistepScheduler";

/// The scheduler classes we implement, by diffusers' `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerClass {
    /// `DDIMScheduler` (η = 0).
    Ddim,
    /// `DDPMScheduler` (ancestral).
    Ddpm,
    /// `DPMSolverMultistepScheduler` (DPM-Solver++ 2M).
    DpmSolverMultistep,
    /// `UnCLIPScheduler` (the priors').
    UnClip,
    /// `EulerDiscreteScheduler`.
    EulerDiscrete,
    /// `EulerAncestralDiscreteScheduler` (A1111's "Euler a").
    EulerAncestralDiscrete,
}

/// `EulerDiscreteScheduler`'s `_class_name`.
pub const EULER_DISCRETE: &str = "EulerDiscreteScheduler";
/// `EulerAncestralDiscreteScheduler`'s `_class_name`.
pub const EULER_ANCESTRAL_DISCRETE: &str = "EulerAncestralDiscreteScheduler";

impl SchedulerClass {
    /// Every class.
    pub const ALL: [SchedulerClass; 6] = [
        SchedulerClass::Ddim,
        SchedulerClass::Ddpm,
        SchedulerClass::DpmSolverMultistep,
        SchedulerClass::UnClip,
        SchedulerClass::EulerDiscrete,
        SchedulerClass::EulerAncestralDiscrete,
    ];

    /// diffusers' `_class_name`.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerClass::Ddim => "DDIMScheduler",
            SchedulerClass::Ddpm => "DDPMScheduler",
            SchedulerClass::DpmSolverMultistep => DPM_SOLVER_MULTISTEP,
            SchedulerClass::UnClip => "UnCLIPScheduler",
            SchedulerClass::EulerDiscrete => EULER_DISCRETE,
            SchedulerClass::EulerAncestralDiscrete => EULER_ANCESTRAL_DISCRETE,
        }
    }

    /// The class of a `_class_name`.
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.class_name() == name)
    }

    /// The sampler's usual short name (A1111's for the ones it has).
    pub fn display_name(self) -> &'static str {
        match self {
            SchedulerClass::Ddim => "DDIM",
            SchedulerClass::Ddpm => "DDPM",
            SchedulerClass::DpmSolverMultistep => "DPM++ 2M",
            SchedulerClass::UnClip => "UnCLIP",
            SchedulerClass::EulerDiscrete => "Euler",
            SchedulerClass::EulerAncestralDiscrete => "Euler a",
        }
    }
}

/// The `__init__` keys (among [`SchedulerConfig`]'s fields) of the classes [`with_class`]
/// builds (not `UnCLIPScheduler`).
fn init_keys(class: SchedulerClass) -> Option<&'static [&'static str]> {
    Some(match class {
        SchedulerClass::Ddim => &[
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
        SchedulerClass::Ddpm => &[
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
        SchedulerClass::DpmSolverMultistep => &[
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
        SchedulerClass::EulerDiscrete | SchedulerClass::EulerAncestralDiscrete => &[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "final_sigmas_type",
        ],
        SchedulerClass::UnClip => return None,
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
    let keys = SchedulerClass::from_class_name(class_name)
        .and_then(init_keys)
        .ok_or_else(|| Error::unsupported("_class_name", class_name))?;
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

/// Builds the scheduler a config names.
pub fn from_config(config: &SchedulerConfig) -> Result<Box<dyn Scheduler + Send>> {
    let class = SchedulerClass::from_class_name(&config.class_name)
        .ok_or_else(|| Error::unsupported("_class_name", &config.class_name))?;
    Ok(match class {
        SchedulerClass::Ddim => Box::new(scheduling_ddim::DdimScheduler::new(config)?),
        SchedulerClass::Ddpm => Box::new(scheduling_ddpm::DdpmScheduler::new(config)?),
        SchedulerClass::DpmSolverMultistep => {
            Box::new(scheduling_dpmsolver_multistep::DpmSolverMultistepScheduler::new(config)?)
        }
        SchedulerClass::UnClip => Box::new(scheduling_unclip::UnClipScheduler::new(config)?),
        SchedulerClass::EulerDiscrete => Box::new(
            scheduling_euler_discrete::EulerDiscreteScheduler::new(config)?,
        ),
        SchedulerClass::EulerAncestralDiscrete => Box::new(
            scheduling_euler_ancestral_discrete::EulerAncestralDiscreteScheduler::new(config)?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{TimestepSpacing, VarianceType};

    fn cfg(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).unwrap()
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
            (&d.timestep_spacing, d.steps_offset),
            (&TimestepSpacing::Linspace, 1)
        );
        assert_eq!((d.beta_start, d.beta_end), (0.00085, 0.012));
        assert_eq!(d.variance_type, None);
        assert_eq!(
            (d.solver_order, d.algorithm_type.as_str()),
            (2, "dpmsolver++")
        );
        let mut saved = hub.clone();
        saved.present_keys = None; // every key written, as a recent save_config does
        saved.variance_type = Some(VarianceType::FixedSmall);
        let d = with_class(&saved, DPM_SOLVER_MULTISTEP).unwrap();
        assert_eq!(d.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(d.variance_type, Some(VarianceType::FixedSmall));
        assert!(from_config(&d).is_ok());
        // DDIM from the same hub file: set_alpha_to_one present (false), clip_sample false.
        let ddim = with_class(&hub, "DDIMScheduler").unwrap();
        assert!(!ddim.set_alpha_to_one && !ddim.clip_sample);
        assert!(with_class(&hub, "LMSDiscreteScheduler").is_err());
        let euler = with_class(&hub, EULER_DISCRETE).unwrap();
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
    }
}
