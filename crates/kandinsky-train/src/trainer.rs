//! The training loop shared by every stage: parameters from a seed or a checkpoint, AdamW steps
//! on a stage's loss, atomic checkpoints (parameters + optimizer state + step), and the export of
//! the trained component when the run ends.

use super::checkpoint;
use super::optim::{AdamW, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use kandinsky::error::{Error, Result};
use kandinsky::loading::ParamStore;
use std::path::PathBuf;

/// Options shared by the training stages.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Total optimizer steps (a resumed run continues up to this count).
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Seed of the parameters and of the data.
    pub seed: u64,
    /// AdamW settings.
    pub optim: AdamWConfig,
    /// Where `checkpoint.safetensors` and the exported component go.
    pub out_dir: PathBuf,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Image side of the synthetic world.
    pub image_size: usize,
    /// The learning rate falls linearly to zero over this many final steps (0: constant), which
    /// settles the weights the way an EMA would.
    pub lr_decay_steps: u64,
    /// Steps at which the learning rate restarts at full value (warm restarts, ascending): the
    /// run is split into phases ending at each restart and at `steps`, and every phase ends with
    /// its own `lr_decay_steps` decay. One run with restarts at 2600 and 5000 equals three runs
    /// resumed to 2600, 5000 and `steps`, without building the data three times.
    pub lr_restarts: Vec<u64>,
    /// Parameters to start from when there is no checkpoint (fine-tuning); the rest are drawn
    /// from the seed.
    pub init: std::collections::HashMap<String, Tensor>,
    /// Per-element learning-rate factors of some parameters ([`AdamW::set_lr_scale`]).
    pub lr_scales: std::collections::HashMap<String, Tensor>,
}

impl TrainOptions {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        let end = self
            .lr_restarts
            .iter()
            .copied()
            .find(|&r| r > step && r < self.steps)
            .unwrap_or(self.steps);
        let left = end.saturating_sub(step);
        if self.lr_decay_steps == 0 || left >= self.lr_decay_steps {
            self.optim.lr
        } else {
            self.optim.lr * left as f64 / self.lr_decay_steps as f64
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The step the run started from (0, or a checkpoint's).
    pub start_step: u64,
    /// The first step's total loss in this run.
    pub first_loss: f32,
    /// The last step's total loss.
    pub final_loss: f32,
}

/// Parses a stage's `config.json` text.
pub fn parse_config(json: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(json).map_err(|source| Error::Json {
        path: PathBuf::from(format!("({what} config)")),
        source,
    })
}

/// Runs steps `start..opts.steps` of `loss(model, step) -> (loss, metric)`, where `model` is
/// built from trainable parameters (fresh from the seed, or from `out_dir/checkpoint.safetensors`
/// when it exists), then `export`s. `log(step, loss, metric)` sees every step.
pub fn run_loop<M>(
    opts: &TrainOptions,
    build: impl FnOnce(&ParamStore) -> Result<M>,
    mut loss: impl FnMut(&M, u64) -> Result<(Tensor, Tensor)>,
    export: impl FnOnce(&ParamStore) -> Result<()>,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    run_loop_grads(
        opts,
        build,
        |model, _, step| {
            let (l, metric) = loss(model, step)?;
            Ok((l.backward()?, l.to_scalar()?, metric.to_scalar()?))
        },
        export,
        log,
    )
}

/// [`run_loop`] for stages that compute a step's gradients themselves (for example in parts on
/// several threads): `grads(model, vars, step) -> (gradients, loss, metric)`.
pub fn run_loop_grads<M>(
    opts: &TrainOptions,
    build: impl FnOnce(&ParamStore) -> Result<M>,
    mut grads: impl FnMut(&M, &[(String, Var)], u64) -> Result<(GradStore, f32, f32)>,
    export: impl FnOnce(&ParamStore) -> Result<()>,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let ckpt = opts.out_dir.join("checkpoint.safetensors");
    let mut opt = AdamW::new(opts.optim);
    for (name, scale) in &opts.lr_scales {
        opt.set_lr_scale(name, scale.clone());
    }
    let params = if ckpt.is_file() {
        let (params, state) = checkpoint::load(&ckpt)?;
        opt.load_state(&state)?;
        ParamStore::with_init(opts.seed, params, &Device::Cpu)
    } else {
        ParamStore::with_init(opts.seed, opts.init.clone(), &Device::Cpu)
    };
    let model = build(&params)?;
    let vars = params.vars();
    let start_step = opt.steps();
    let (mut first_loss, mut final_loss) = (f32::NAN, f32::NAN);
    for step in start_step..opts.steps {
        let (g, l, m) = grads(&model, &vars, step)?;
        opt.config.lr = opts.lr_at(step);
        opt.step(&vars, &g)?;
        if !l.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "the loss diverged at step {} ({l}); lower the learning rate",
                step + 1
            )));
        }
        if step == start_step {
            first_loss = l;
        }
        final_loss = l;
        log(step + 1, l, m);
        if (step + 1) % opts.checkpoint_every == 0 || step + 1 == opts.steps {
            checkpoint::save(&ckpt, &params, &opt)?;
        }
    }
    export(&params)?;
    Ok(TrainReport {
        start_step,
        first_loss,
        final_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(steps: u64, restarts: Vec<u64>) -> TrainOptions {
        TrainOptions {
            steps,
            batch: 1,
            seed: 0,
            optim: AdamWConfig {
                lr: 5e-4,
                ..Default::default()
            },
            out_dir: PathBuf::new(),
            checkpoint_every: 1,
            image_size: 16,
            lr_decay_steps: 600,
            lr_restarts: restarts,
            init: Default::default(),
            lr_scales: Default::default(),
        }
    }

    #[test]
    fn restarts_equal_resumed_runs() {
        let one = opts(6400, vec![2600, 5000]);
        let phases = [
            (0, opts(2600, vec![])),
            (2600, opts(5000, vec![])),
            (5000, opts(6400, vec![])),
        ];
        for step in 0..6400 {
            let (_, phase) = phases.iter().rev().find(|(from, _)| step >= *from).unwrap();
            assert_eq!(one.lr_at(step), phase.lr_at(step), "step {step}");
        }
        // Full value right after a restart, decayed just before it.
        assert_eq!(one.lr_at(2600), 5e-4);
        assert!(one.lr_at(2599) < 1e-6);
    }
}
