//! `kandinsky train <stage>`: trains one stage of our small Kandinsky on the synthetic shapes
//! world, resumable from `OUT/checkpoint.safetensors`, logging loss and progress.

use anyhow::{bail, Result};
use kandinsky::training::movq::{train_movq, TrainOptions, SMALL_MOVQ_CONFIG};
use kandinsky::training::optim::AdamWConfig;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    stage: Stage,
}

#[derive(clap::Subcommand)]
enum Stage {
    /// The MoVQ autoencoder (reconstruction + VQ codebook/commitment losses).
    Movq(StageArgs),
}

#[derive(clap::Args)]
struct StageArgs {
    /// Output directory: checkpoint.safetensors and the exported diffusers component. An
    /// existing checkpoint there is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Total optimizer steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seed of the parameters and the data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Checkpoint every this many steps.
    #[arg(long, default_value_t = 200)]
    checkpoint_every: u64,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: u64,
}

pub fn run(a: &TrainArgs) -> Result<()> {
    match &a.stage {
        Stage::Movq(s) => {
            if s.steps == 0 || s.batch == 0 || s.checkpoint_every == 0 || s.log_every == 0 {
                bail!("--steps, --batch, --checkpoint-every and --log-every must be at least 1");
            }
            if !(s.lr.is_finite() && s.lr > 0.0) {
                bail!("--lr must be a positive number, got {}", s.lr);
            }
            let opts = TrainOptions {
                steps: s.steps,
                batch: s.batch,
                seed: s.seed,
                optim: AdamWConfig {
                    lr: s.lr,
                    ..Default::default()
                },
                out_dir: s.out.clone(),
                checkpoint_every: s.checkpoint_every,
                image_size: 64,
            };
            let start = Instant::now();
            let mut first: Option<u64> = None;
            let report = train_movq(&opts, SMALL_MOVQ_CONFIG, &mut |step, loss, rec| {
                let first = *first.get_or_insert(step);
                if step % s.log_every == 0 || step == s.steps {
                    let done = (step - first + 1) as f64;
                    let el = start.elapsed().as_secs_f64();
                    let eta = el / done * (s.steps - step) as f64;
                    eprintln!(
                        "movq step {step}/{} loss {loss:.5} (reconstruction {rec:.5}) {el:.0}s, ETA {eta:.0}s",
                        s.steps
                    );
                }
            })?;
            println!(
                "movq: steps {}..{}, loss {:.5} -> {:.5}; exported {}",
                report.start_step,
                s.steps,
                report.first_loss,
                report.final_loss,
                s.out.join("movq").display()
            );
            Ok(())
        }
    }
}
