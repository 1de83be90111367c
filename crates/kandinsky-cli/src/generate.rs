//! `kandinsky generate`, `mix`, `variations`: an image embedding from the prior stage (a prompt,
//! a weighted mix of prompts and images, or one image), then the decoder. Stages load one after
//! the other; the prior and its encoders are dropped before decoding.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky::image_io::{numbered_path, prepare_image, read_rgb8, save_png, to_rgb8};
use kandinsky::loading::{resolve_model_dir, ModelIndex};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, MixInput, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::{
    latent_size, DecoderParams, KandinskyV22Pipeline,
};
use kandinsky::utils::torch_utils::TorchGenerator;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags shared by every generation mode.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Decoder model: a directory in diffusers layout or a hub id in the Hugging Face cache.
    #[arg(long)]
    model: String,
    /// Prior model: a directory or a hub id.
    #[arg(long)]
    prior: String,
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
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
    guidance: f64,
    /// Prior guidance scale (CFG when > 1).
    #[arg(long, default_value_t = 4.0, allow_negative_numbers = true)]
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

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (the prior samples its embedding as the negative).
    #[arg(long)]
    negative_prompt: Option<String>,
}

#[derive(clap::Args)]
pub struct MixArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A prompt or an image file to mix; repeat for each input.
    #[arg(long = "input", required = true)]
    inputs: Vec<String>,
    /// The weight of each input, in order (not normalised, as in diffusers).
    #[arg(long = "weight", required = true, allow_negative_numbers = true)]
    weights: Vec<f64>,
}

#[derive(clap::Args)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (the prior samples its embedding as the negative).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// The starting image (resized to the output size).
    #[arg(long)]
    image: PathBuf,
    /// How much of the schedule to run: 0 keeps the image, 1 ignores it.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    strength: f64,
}

#[derive(clap::Args)]
pub struct VariationsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The image to make variations of.
    #[arg(long)]
    image: PathBuf,
}

/// The largest latent area per image we agree to allocate: the real UNet's attention at its first
/// SimpleCrossAttn level holds (h/2·w/2)² scores per head.
const MAX_LATENT_PIXELS: usize = 192 * 192;

fn validate(a: &CommonArgs) -> Result<()> {
    for (name, v) in [("--steps", a.steps), ("--num-images", a.num_images)] {
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
    if latent_size(a.height, 8) * latent_size(a.width, 8) > MAX_LATENT_PIXELS {
        bail!(
            "{}x{} is too large: its activations would not fit in memory on this machine (at most about 1536x1536)",
            a.width,
            a.height
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

/// What the prior stage does.
enum PriorStage<'a> {
    Text {
        prompt: &'a str,
        negative: Option<&'a str>,
    },
    Mix(Vec<(MixInput, f64)>),
}

/// Where the decoder starts: noise, or an image to edit with a strength.
enum DecoderStart<'a> {
    Noise,
    Image { path: &'a Path, strength: f64 },
}

fn run_modes(
    a: &CommonArgs,
    stage: PriorStage,
    start: DecoderStart,
    decoder_prompt: &str,
    record: &str,
) -> Result<()> {
    validate(a)?;
    if let DecoderStart::Image { path, strength } = start {
        if !(strength > 0.0 && strength <= 1.0) {
            bail!("--strength must be in (0, 1], got {strength}");
        }
        if !path.is_file() {
            bail!("image {} not found", path.display());
        }
    }
    let model_dir = resolve_model_dir(&a.model)?;
    let prior_dir = resolve_model_dir(&a.prior)?;
    let v21 = match ModelIndex::load(&model_dir)?.class_name.as_str() {
        "KandinskyV22Pipeline" => false,
        "KandinskyPipeline" => true,
        other => bail!(
            "{} holds a '{other}' pipeline; this mode needs a KandinskyPipeline (2.1) or KandinskyV22Pipeline (2.2) decoder",
            model_dir.display()
        ),
    };
    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
    });
    eprintln!("seed {seed}");
    let device = Device::Cpu;
    let mut generator = TorchGenerator::new(seed);
    let params = PriorParams {
        steps: a.prior_steps,
        guidance_scale: a.prior_guidance,
        num_images_per_prompt: a.num_images,
    };
    let (image_embeds, negative_embeds) = {
        let prior = KandinskyPriorPipeline::load(&prior_dir, DType::F32, &device)
            .with_context(|| format!("loading the prior from {}", prior_dir.display()))?;
        let mut bar = progress("prior");
        match stage {
            PriorStage::Text { prompt, negative } => prior.call(
                &[prompt.to_string()],
                negative,
                params,
                &mut generator,
                None,
                &mut bar,
            )?,
            PriorStage::Mix(inputs) => {
                prior.interpolate(&inputs, params, "", None, &mut generator, &mut bar)?
            }
        }
    };
    let images = decode(
        a,
        &model_dir,
        v21,
        decoder_prompt,
        start,
        &image_embeds,
        &negative_embeds,
        &mut generator,
    )?;
    let parameters = format!(
        "{record}\nSteps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Prior: {}, Sampler: {}",
        a.steps,
        a.prior_steps,
        a.guidance,
        a.prior_guidance,
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

#[allow(clippy::too_many_arguments)]
fn decode(
    a: &CommonArgs,
    model_dir: &Path,
    v21: bool,
    prompt: &str,
    start: DecoderStart,
    image_embeds: &Tensor,
    negative_embeds: &Tensor,
    generator: &mut TorchGenerator,
) -> Result<Tensor> {
    let device = Device::Cpu;
    let params = DecoderParams {
        height: a.height,
        width: a.width,
        steps: a.steps,
        guidance_scale: a.guidance,
    };
    let context = || format!("loading the decoder from {}", model_dir.display());
    let mut bar = progress("decoder");
    match (v21, start) {
        (true, start) => {
            // As diffusers' combined pipelines: the decoder's M-CLIP sees the prompt ("" for
            // mixing), and its unconditional text is "" (a negative prompt acts through the prior).
            let decoder =
                KandinskyPipeline::load(model_dir, DType::F32, &device).with_context(context)?;
            let prompts = vec![prompt.to_string()];
            Ok(match start {
                DecoderStart::Noise => decoder.call(
                    &prompts,
                    None,
                    image_embeds,
                    negative_embeds,
                    params,
                    generator,
                    None,
                    &mut bar,
                )?,
                DecoderStart::Image { path, strength } => {
                    let image =
                        prepare_image(path, a.width, a.height, decoder.scale_factor(), &device)?;
                    decoder.img2img(
                        &prompts,
                        None,
                        &image,
                        image_embeds,
                        negative_embeds,
                        params,
                        strength,
                        generator,
                        &mut bar,
                    )?
                }
            })
        }
        (false, start) => {
            let decoder =
                KandinskyV22Pipeline::load(model_dir, DType::F32, &device).with_context(context)?;
            Ok(match start {
                DecoderStart::Noise => decoder.call(
                    image_embeds,
                    negative_embeds,
                    params,
                    generator,
                    None,
                    &mut bar,
                )?,
                DecoderStart::Image { path, strength } => {
                    let image =
                        prepare_image(path, a.width, a.height, decoder.scale_factor(), &device)?;
                    decoder.img2img(
                        &image,
                        image_embeds,
                        negative_embeds,
                        params,
                        strength,
                        generator,
                        &mut bar,
                    )?
                }
            })
        }
    }
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let record = format!(
        "{}\nNegative prompt: {}",
        a.prompt,
        a.negative_prompt.as_deref().unwrap_or("")
    );
    let stage = PriorStage::Text {
        prompt: &a.prompt,
        negative: a.negative_prompt.as_deref(),
    };
    run_modes(&a.common, stage, DecoderStart::Noise, &a.prompt, &record)
}

pub fn run_img2img(a: &Img2ImgArgs) -> Result<()> {
    let record = format!(
        "{}\nNegative prompt: {}\nImage: {}, Strength: {}",
        a.prompt,
        a.negative_prompt.as_deref().unwrap_or(""),
        a.image.display(),
        a.strength
    );
    let stage = PriorStage::Text {
        prompt: &a.prompt,
        negative: a.negative_prompt.as_deref(),
    };
    let start = DecoderStart::Image {
        path: &a.image,
        strength: a.strength,
    };
    run_modes(&a.common, stage, start, &a.prompt, &record)
}

pub fn run_mix(a: &MixArgs) -> Result<()> {
    if a.inputs.len() != a.weights.len() {
        bail!(
            "{} --input values but {} --weight values: give one weight per input",
            a.inputs.len(),
            a.weights.len()
        );
    }
    let mut inputs = Vec::new();
    for (input, &w) in a.inputs.iter().zip(&a.weights) {
        if !w.is_finite() {
            bail!("--weight {w} is not a finite number");
        }
        let path = Path::new(input);
        let item = if path.is_file() {
            let (w, h, rgb) = read_rgb8(path)?;
            MixInput::Image(w, h, rgb)
        } else {
            MixInput::Text(input.clone())
        };
        inputs.push((item, w));
    }
    let record = format!("Mix: {:?} with weights {:?}", a.inputs, a.weights);
    run_modes(
        &a.common,
        PriorStage::Mix(inputs),
        DecoderStart::Noise,
        "",
        &record,
    )
}

pub fn run_variations(a: &VariationsArgs) -> Result<()> {
    let (w, h, rgb) = read_rgb8(&a.image)?;
    let record = format!("Variations of {}", a.image.display());
    run_modes(
        &a.common,
        PriorStage::Mix(vec![(MixInput::Image(w, h, rgb), 1.0)]),
        DecoderStart::Noise,
        "",
        &record,
    )
}
