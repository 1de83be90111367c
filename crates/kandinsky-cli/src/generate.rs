//! `kandinsky generate`: text → image with the prior and the decoder, loaded one after the other.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use kandinsky::image_io::{numbered_path, save_png, to_rgb8};
use kandinsky::loading::{resolve_model_dir, ModelIndex};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::{
    latent_size, DecoderParams, KandinskyV22Pipeline,
};
use kandinsky::utils::torch_utils::TorchGenerator;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Decoder model: a directory in diffusers layout or a hub id in the Hugging Face cache.
    #[arg(long)]
    model: String,
    /// Prior model: a directory or a hub id.
    #[arg(long)]
    prior: String,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (the prior samples its embedding as the negative).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image width in pixels (rounded up to a multiple of 64).
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Image height in pixels (rounded up to a multiple of 64).
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Decoder steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Prior steps.
    #[arg(long, default_value_t = 25)]
    prior_steps: usize,
    /// Decoder guidance scale (CFG when > 1).
    #[arg(long, default_value_t = 4.0)]
    guidance: f64,
    /// Prior guidance scale (CFG when > 1).
    #[arg(long, default_value_t = 4.0)]
    prior_guidance: f64,
    /// Seed of the torch-compatible generator shared by all stages; random when omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Images to generate.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output PNG; with several images `-<i>` is inserted before the extension.
    #[arg(long, default_value = "image.png")]
    output: PathBuf,
}

/// The largest latent area (per image, batch included via CFG) we agree to allocate: the real
/// UNet's attention at the first SimpleCrossAttn level holds (h/2·w/2)² scores per head.
const MAX_LATENT_PIXELS: usize = 192 * 192;

fn validate(a: &GenerateArgs) -> Result<()> {
    for (name, v) in [
        ("--steps", a.steps),
        ("--prior-steps", a.prior_steps),
        ("--num-images", a.num_images),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    if a.prior_steps < 2 {
        bail!("--prior-steps must be at least 2 (the prior scheduler spaces steps over 0..999)");
    }
    for (name, g) in [
        ("--guidance", a.guidance),
        ("--prior-guidance", a.prior_guidance),
    ] {
        if !g.is_finite() || g < 0.0 {
            bail!("{name} must be a finite number ≥ 0, got {g}");
        }
    }
    if a.width == 0 || a.height == 0 {
        bail!("--width and --height must be positive");
    }
    let (lh, lw) = (latent_size(a.height, 8), latent_size(a.width, 8));
    if lh * lw > MAX_LATENT_PIXELS {
        bail!(
            "{}x{} is too large: its activations would not fit in memory on this machine (at most {} latent pixels, i.e. about 1536x1536)",
            a.width,
            a.height,
            MAX_LATENT_PIXELS
        );
    }
    if let Some(dir) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output directory {} does not exist", dir.display());
        }
    }
    Ok(())
}

fn progress(stage: &'static str) -> impl FnMut(usize, usize) {
    let start = Instant::now();
    move |i, n| {
        let elapsed = start.elapsed().as_secs_f64();
        let eta = elapsed / i as f64 * (n - i) as f64;
        let width = 30;
        let done = width * i / n;
        eprint!(
            "\r{stage:>8} [{}{}] {i}/{n} {elapsed:.1}s, ETA {eta:.1}s ",
            "#".repeat(done),
            "-".repeat(width - done)
        );
        if i == n {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    validate(a)?;
    let model_dir = resolve_model_dir(&a.model)?;
    let prior_dir = resolve_model_dir(&a.prior)?;
    let index = ModelIndex::load(&model_dir)?;
    let v21 = match index.class_name.as_str() {
        "KandinskyV22Pipeline" => false,
        "KandinskyPipeline" => true,
        other => bail!(
            "{} holds a '{}' pipeline; text-to-image needs a KandinskyPipeline (2.1) or KandinskyV22Pipeline (2.2) decoder",
            model_dir.display(),
            other
        ),
    };
    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ (std::process::id() as u64) << 32
    });
    eprintln!("seed {seed}");
    let device = Device::Cpu;
    let mut generator = TorchGenerator::new(seed);

    // Stages load one after another; the prior and its encoders are dropped before decoding.
    let (image_embeds, negative_embeds) = {
        let prior = KandinskyPriorPipeline::load(&prior_dir, DType::F32, &device)
            .with_context(|| format!("loading the prior from {}", prior_dir.display()))?;
        let params = PriorParams {
            steps: a.prior_steps,
            guidance_scale: a.prior_guidance,
            num_images_per_prompt: a.num_images,
        };
        prior.call(
            std::slice::from_ref(&a.prompt),
            a.negative_prompt.as_deref(),
            params,
            &mut generator,
            None,
            &mut progress("prior"),
        )?
    };
    let params = DecoderParams {
        height: a.height,
        width: a.width,
        steps: a.steps,
        guidance_scale: a.guidance,
    };
    let context = || format!("loading the decoder from {}", model_dir.display());
    let images = if v21 {
        // As diffusers' KandinskyCombinedPipeline: the decoder's M-CLIP sees the prompt, and its
        // unconditional text is "" (the negative prompt acts through the prior).
        let decoder =
            KandinskyPipeline::load(&model_dir, DType::F32, &device).with_context(context)?;
        let prompts = vec![a.prompt.clone()];
        decoder.call(
            &prompts,
            None,
            &image_embeds,
            &negative_embeds,
            params,
            &mut generator,
            None,
            &mut progress("decoder"),
        )?
    } else {
        let decoder =
            KandinskyV22Pipeline::load(&model_dir, DType::F32, &device).with_context(context)?;
        decoder.call(
            &image_embeds,
            &negative_embeds,
            params,
            &mut generator,
            None,
            &mut progress("decoder"),
        )?
    };
    let parameters = format!(
        "{}\nNegative prompt: {}\nSteps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Prior: {}, Sampler: {}",
        a.prompt,
        a.negative_prompt.as_deref().unwrap_or(""),
        a.steps,
        a.prior_steps,
        a.guidance,
        a.prior_guidance,
        seed,
        a.width,
        a.height,
        a.model,
        a.prior,
        if v21 { "DDIM (model default)" } else { "DDPM (model default)" }
    );
    let rgb = to_rgb8(&images)?;
    for (i, (w, h, pixels)) in rgb.iter().enumerate() {
        let path = numbered_path(&a.output, i, rgb.len());
        save_png(&path, *w, *h, pixels, &[("parameters", &parameters)])?;
        println!("wrote {} ({w}x{h})", path.display());
    }
    Ok(())
}
