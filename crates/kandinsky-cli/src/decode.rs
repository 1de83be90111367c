//! `kandinsky decode`: MoVQ latent → PNG.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use kandinsky::loading::{component_dir, given_or_small};
use kandinsky::models::VQModel;
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::{numbered_path, to_rgb8};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// A `movq/` component directory, or a model directory (or hub id) containing `movq/`.
    /// Default: the small model's (`models/small/decoder`).
    #[arg(long)]
    movq: Option<String>,
    /// A safetensors file holding the latent `(B, 4, h, w)` (first tensor, or the one named
    /// `latents`). Without it, a standard-normal latent is drawn from `--seed` with the
    /// torch-compatible generator (`torch.randn` of `torch.Generator().manual_seed(seed)`).
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

pub fn run(args: &DecodeArgs) -> Result<()> {
    let dir = given_or_small(args.movq.as_deref(), "decoder")?;
    let dir = if dir.join("config.json").is_file() {
        dir
    } else {
        component_dir(&dir, "movq")?
    };
    let device = crate::compute_device()?;
    let movq = VQModel::load(&dir, crate::compute_dtype(), &device)?;
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
            let shape = vec![1, 4, args.latent_size, args.latent_size];
            TorchGenerator::new(args.seed).randn(shape, &Device::Cpu)?
        }
    };
    anyhow::ensure!(
        latents.rank() == 4 && latents.dim(1)? == 4,
        "latents must have shape (B, 4, h, w), found {:?}",
        latents.dims()
    );
    let images = movq.decode(&latents.to_dtype(DType::F32)?.to_device(&device)?, true)?;
    let rgb = to_rgb8(&images)?;
    for (i, image) in rgb.iter().enumerate() {
        crate::generate::write_image(&numbered_path(&args.output, i, rgb.len()), image, &[])?;
    }
    Ok(())
}
