//! `kandinsky bench`: UNet forward timing on the real Kandinsky 2.2 topology with random weights.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use kandinsky::loading::Weights;
use kandinsky::models::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
use std::time::Instant;

/// The real `kandinsky-community/kandinsky-2-2-decoder` `unet/config.json`.
const UNET_2_2_CONFIG: &str =
    include_str!("../../../fixtures/real_configs/kandinsky-2-2-decoder/unet/config.json");

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Latent sides to time (pixels / 8).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    sizes: Vec<usize>,
    /// Timed runs per size (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// A UNet `config.json` to use instead of the real 2.2 one.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Print one JSON line per size (for tools/bench_unet.py).
    #[arg(long)]
    json: bool,
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let config: UNet2DConditionConfig = match &args.config {
        Some(p) => UNet2DConditionConfig::load(p)?,
        None => UNet2DConditionConfig::from_json(UNET_2_2_CONFIG).context("embedded 2.2 config")?,
    };
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let device = Device::Cpu;
    let t0 = Instant::now();
    let unet =
        UNet2DConditionModel::new(&Weights::random(crate::compute_dtype(), &device), &config)?;
    eprintln!(
        "built UNet with random weights in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let embed_dim = config
        .encoder_hid_dim
        .context("config has no encoder_hid_dim")?;
    for &side in &args.sizes {
        let sample = Tensor::randn(0f32, 1.0, (2, config.in_channels, side, side), &device)?;
        let image_embeds = Tensor::randn(0f32, 1.0, (2, embed_dim), &device)?;
        let cond = UNetConditioning {
            image_embeds: Some(&image_embeds),
            ..Default::default()
        };
        let mut times = Vec::new();
        for i in 0..=args.runs {
            let t = Instant::now();
            let out = unet.forward(&sample, 500.0, &cond)?;
            out.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let rss = peak_rss().unwrap_or(0);
        if args.json {
            println!(
                "{{\"impl\": \"rust-candle\", \"latent\": {side}, \"best_s\": {best:.4}, \"runs_s\": {times:?}, \"peak_rss_bytes\": {rss}}}"
            );
        } else {
            println!(
                "UNet 2.2 forward, batch 2, latent {side}x{side}: best {best:.3} s of {times:.3?}; peak RSS {:.2} GiB",
                rss as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
