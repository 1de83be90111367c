//! `kandinsky decode`: MoVQ latent → PNG.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky::image_io::{numbered_path, save_png, to_rgb8};
use kandinsky::loading::component_dir;
use kandinsky::models::VQModel;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// A `movq/` component directory, or a model directory (or hub id) containing `movq/`.
    /// Default: the small model's (`models/small/decoder`).
    #[arg(long)]
    movq: Option<String>,
    /// A safetensors file holding the latent `(B, 4, h, w)` (first tensor, or the one named
    /// `latents`). Without it, a standard-normal latent is drawn from `--seed`.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Latent side when no `--latents` is given (image side = 8 × this for the real MoVQ).
    #[arg(long, default_value_t = 8)]
    latent_size: usize,
    /// Seed of the random latent.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output PNG; with a batch, `-<i>` is inserted before the extension.
    #[arg(long, default_value = "decoded.png")]
    output: PathBuf,
}

fn random_latent(seed: u64, side: usize) -> Result<Tensor> {
    // A small, dependency-free Gaussian source (SplitMix64 + Box–Muller); the torch-compatible
    // generator arrives with the pipelines.
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let n = 4 * side * side;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let (u1, u2) = (1.0 - next(), next());
        let r = (-2.0 * u1.ln()).sqrt();
        v.push((r * (std::f64::consts::TAU * u2).cos()) as f32);
        v.push((r * (std::f64::consts::TAU * u2).sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, (1, 4, side, side), &Device::Cpu)?)
}

pub fn run(args: &DecodeArgs) -> Result<()> {
    let dir = crate::generate::given_or_small(args.movq.as_deref(), "decoder")?;
    let dir = if dir.join("config.json").is_file() {
        dir
    } else {
        component_dir(&dir, "movq")?
    };
    let movq = VQModel::load(&dir, DType::F32, &Device::Cpu)?;
    let latents = match &args.latents {
        Some(p) => {
            let mut t = candle_core::safetensors::load(p, &Device::Cpu)
                .with_context(|| format!("reading latents from {}", p.display()))?;
            match t.remove("latents") {
                Some(l) => l,
                None => t
                    .into_values()
                    .next()
                    .context("the latents file holds no tensor")?,
            }
        }
        None => {
            anyhow::ensure!(args.latent_size > 0, "--latent-size must be positive");
            random_latent(args.seed, args.latent_size)?
        }
    };
    anyhow::ensure!(
        latents.rank() == 4 && latents.dim(1)? == 4,
        "latents must have shape (B, 4, h, w), found {:?}",
        latents.dims()
    );
    let images = movq.decode(&latents.to_dtype(DType::F32)?, true)?;
    let rgb = to_rgb8(&images)?;
    for (i, (w, h, pixels)) in rgb.iter().enumerate() {
        let path = numbered_path(&args.output, i, rgb.len());
        save_png(&path, *w, *h, pixels, &[])?;
        println!("wrote {} ({w}x{h})", path.display());
    }
    Ok(())
}
