//! Every generation mode: an image embedding from the prior stage (a prompt, a prompt started from
//! an image's embedding, a weighted mix of prompts and images, or one image), then the decoder
//! (from noise, from a noised image, inpainting, or ControlNet). Stages load one after the other;
//! the prior and its encoders are dropped before the decoder is loaded.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky::image_io::{
    extend_canvas, load_hint, numbered_path, prepare_image, read_rgb8, save_png, to_rgb8,
};
use kandinsky::loading::{component_dir, preset, read_tensor, resolve_model_dir, ModelIndex};
use kandinsky::models::{UNet2DConditionConfig, VQModelConfig};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_inpaint::prepare_mask_and_masked_image;
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::{
    KandinskyPriorPipeline, MixInput, PriorParams,
};
use kandinsky::pipelines::kandinsky2_2::pipeline_kandinsky2_2::{
    latent_size, DecoderParams, KandinskyV22Pipeline,
};
use kandinsky::schedulers::SchedulerConfig;
use kandinsky::utils::torch_utils::TorchGenerator;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--scheduler`: the decoder's sampler.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerChoice {
    /// The model directory's own `scheduler/` (DDIM for 2.1, DDPM for 2.2).
    Default,
    /// DDIM (η = 0).
    Ddim,
    /// DDPM (ancestral).
    Ddpm,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler`): good images in 20–30 steps.
    #[value(name = "dpm++2m", alias = "dpmpp2m")]
    DpmPlusPlus2M,
}

impl SchedulerChoice {
    fn class_name(self) -> Option<&'static str> {
        match self {
            SchedulerChoice::Default => None,
            SchedulerChoice::Ddim => Some("DDIMScheduler"),
            SchedulerChoice::Ddpm => Some("DDPMScheduler"),
            SchedulerChoice::DpmPlusPlus2M => Some("DPMSolverMultistepScheduler"),
        }
    }
}

/// Flags shared by every generation mode.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Decoder model: a directory in diffusers layout, a hub id in the Hugging Face cache, or a
    /// preset (kandinsky-2-1, kandinsky-2-1-inpaint, kandinsky-2-2, kandinsky-2-2-inpaint,
    /// kandinsky-2-2-controlnet-depth). Default: our small model shipped in `models/small`
    /// (its `decoder`, or `decoder-inpaint` for inpainting and outpainting).
    #[arg(long)]
    model: Option<String>,
    /// Prior model: a directory or a hub id; a preset's own prior when omitted, and
    /// `models/small/prior` when `--model` is omitted too.
    #[arg(long)]
    prior: Option<String>,
    /// Image width in pixels (rounded up to a multiple of 64; inpainting and ControlNet need a
    /// multiple of 64). Default: the decoder's native size (UNet `sample_size` × the MoVQ
    /// factor: 512 for Kandinsky 2.1/2.2, 64 for the small model), or 512 when its config has
    /// none.
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (as `--width`).
    #[arg(long)]
    height: Option<usize>,
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
    /// Decoder sampler.
    #[arg(long, value_enum, default_value_t = SchedulerChoice::Default)]
    scheduler: SchedulerChoice,
    /// The decoder's initial latents `(B, 4, h, w)` (a safetensors file with one tensor, or one
    /// named `latents`), as diffusers' decoder pipelines' `latents`; modes that start from noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// The prior's initial latents `(B, E)`, as the combined pipelines' `latents`; modes whose
    /// prior stage samples one prompt from noise.
    #[arg(long)]
    prior_latents: Option<PathBuf>,
    /// Output PNG; with several images `-<i>` is inserted before the extension.
    #[arg(long, default_value = "image.png")]
    output: PathBuf,
}

/// A prompt and its negative.
#[derive(clap::Args)]
pub struct PromptArgs {
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt (the prior samples its embedding as the negative).
    #[arg(long)]
    negative_prompt: Option<String>,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompt: PromptArgs,
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
    #[command(flatten)]
    prompt: PromptArgs,
    /// The starting image (resized to the output size).
    #[arg(long)]
    image: PathBuf,
    /// How much of the schedule to run: 0 keeps the image, 1 ignores it.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    strength: f64,
    /// Start the prior from the image's CLIP embedding too (2.2 `PriorEmb2EmbPipeline`), with this
    /// strength in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    prior_strength: Option<f64>,
}

#[derive(clap::Args)]
pub struct VariationsArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The image to make variations of.
    #[arg(long)]
    image: PathBuf,
}

#[derive(clap::Args)]
pub struct InpaintArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The image to edit.
    #[arg(long)]
    image: PathBuf,
    /// The mask, same size as the image: white = repaint, black = keep.
    #[arg(long)]
    mask: PathBuf,
}

#[derive(clap::Args)]
pub struct OutpaintArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The image to extend; the output is the image plus the margins.
    #[arg(long)]
    image: PathBuf,
    /// Pixels to add on the left.
    #[arg(long, default_value_t = 0)]
    left: usize,
    /// Pixels to add on the right.
    #[arg(long, default_value_t = 0)]
    right: usize,
    /// Pixels to add on top.
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Pixels to add at the bottom.
    #[arg(long, default_value_t = 0)]
    bottom: usize,
}

#[derive(clap::Args)]
pub struct ControlnetArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The hint image (a depth map: near = bright), resized to the output size.
    #[arg(long)]
    hint: PathBuf,
    /// Start from this image (ControlNet image-to-image) instead of noise.
    #[arg(long)]
    image: Option<PathBuf>,
    /// With `--image`: how much of the schedule to run.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    strength: f64,
    /// With `--image`: start the prior from the image's CLIP embedding (emb2emb) with this strength.
    #[arg(long, allow_negative_numbers = true)]
    prior_strength: Option<f64>,
}

/// The largest latent area per image we agree to allocate: the real UNet's attention at its first
/// SimpleCrossAttn level holds (h/2·w/2)² scores per head.
const MAX_LATENT_PIXELS: usize = 192 * 192;

/// An RGB8 image read from a file.
type Rgb8 = (usize, usize, Vec<u8>);

/// What the prior stage does.
enum PriorStage {
    Text {
        prompt: String,
        negative: Option<String>,
    },
    /// 2.2 emb2emb: the prompt, starting from an image's CLIP embedding.
    FromImage {
        prompt: String,
        negative: Option<String>,
        image: Rgb8,
        strength: f64,
    },
    Mix(Vec<(MixInput, f64)>),
}

/// Where the decoder starts and what it is conditioned on.
enum DecoderStart {
    Noise,
    Image {
        image: PathBuf,
        strength: f64,
    },
    Inpaint {
        image: Rgb8,
        mask: Rgb8,
    },
    Controlnet {
        hint: PathBuf,
        image: Option<(PathBuf, f64)>,
    },
}

/// The decoder pipeline classes a mode accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    /// `KandinskyPipeline` (2.1) / `KandinskyV22Pipeline` (2.2): text-to-image and image-to-image.
    Plain,
    /// `KandinskyInpaintPipeline` / `KandinskyV22InpaintPipeline`.
    Inpaint,
    /// `KandinskyV22ControlnetPipeline`.
    Controlnet,
}

/// `(family, is 2.1)` of a decoder's `model_index.json` class.
fn family_of(class: &str) -> Option<(Family, bool)> {
    Some(match class {
        "KandinskyPipeline" | "KandinskyImg2ImgPipeline" => (Family::Plain, true),
        "KandinskyV22Pipeline" | "KandinskyV22Img2ImgPipeline" => (Family::Plain, false),
        "KandinskyInpaintPipeline" => (Family::Inpaint, true),
        "KandinskyV22InpaintPipeline" => (Family::Inpaint, false),
        "KandinskyV22ControlnetPipeline" | "KandinskyV22ControlnetImg2ImgPipeline" => {
            (Family::Controlnet, false)
        }
        _ => return None,
    })
}

struct Job {
    prior: PriorStage,
    start: DecoderStart,
    /// The 2.1 decoder's M-CLIP prompt ("" for mixing and variations, as diffusers).
    decoder_prompt: String,
    /// The first lines of the PNG's `parameters` text.
    record: String,
    /// Output size when the mode fixes it (outpainting's canvas).
    size: Option<(usize, usize)>,
}

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
    if a.width == Some(0) || a.height == Some(0) {
        bail!("--width and --height must be positive");
    }
    if let Some(dir) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !dir.is_dir() {
            bail!("output directory {} does not exist", dir.display());
        }
    }
    Ok(())
}

fn check_strength(name: &str, s: f64) -> Result<()> {
    if !(s > 0.0 && s <= 1.0) {
        bail!("{name} must be in (0, 1], got {s}");
    }
    Ok(())
}

fn read_image(path: &Path, what: &str) -> Result<Rgb8> {
    read_rgb8(path).with_context(|| format!("reading the {what}"))
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

/// Where our small model lives: `models/small` of this repository (found at build time, so
/// the binary works offline from any directory of the checkout).
pub const SMALL_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/small");

/// A component directory of the small model (`prior`, `decoder`, `decoder-inpaint`), checked to
/// exist.
pub fn small_model(part: &str) -> Result<PathBuf> {
    let dir = Path::new(SMALL_MODEL).join(part);
    if !dir.join("model_index.json").is_file() {
        bail!(
            "the default model is missing ({} has no model_index.json); pass --model and --prior, or restore models/small",
            dir.display()
        );
    }
    Ok(dir)
}

/// `given` resolved as a directory or hub id, or the small model's `part` when it is omitted.
pub fn given_or_small(given: Option<&str>, part: &str) -> Result<PathBuf> {
    match given {
        Some(g) => Ok(resolve_model_dir(g)?),
        None => small_model(part),
    }
}

/// The model and prior directories: `--model` as a directory, a hub id or a preset name, or
/// the small model when it is omitted.
fn model_dirs(a: &CommonArgs, family: Family) -> Result<(PathBuf, PathBuf)> {
    let Some(model) = &a.model else {
        let decoder = match family {
            Family::Plain => "decoder",
            Family::Inpaint => "decoder-inpaint",
            Family::Controlnet => bail!(
                "there is no default ControlNet model (the small model is 2.1-style); pass --model kandinsky-2-2-controlnet-depth or a directory"
            ),
        };
        let prior = given_or_small(a.prior.as_deref(), "prior")?;
        return Ok((small_model(decoder)?, prior));
    };
    let named = preset(model).filter(|_| !Path::new(model).is_dir());
    let model = named.map_or(model.as_str(), |p| p.decoder);
    let prior = match (&a.prior, named) {
        (Some(p), _) => p.as_str(),
        (None, Some(p)) => p.prior,
        (None, None) => bail!("--prior is required unless --model is a preset name or omitted"),
    };
    Ok((resolve_model_dir(model)?, resolve_model_dir(prior)?))
}

fn run_job(a: &CommonArgs, job: Job, family: Family) -> Result<()> {
    validate(a)?;
    let (model_dir, prior_dir) = model_dirs(a, family)?;
    let index = ModelIndex::load(&model_dir)?;
    let (found, v21) = family_of(&index.class_name).with_context(|| {
        format!(
            "{} holds a '{}' pipeline, not a Kandinsky decoder",
            model_dir.display(),
            index.class_name
        )
    })?;
    if found != family {
        let need = match family {
            Family::Plain => "a text-to-image decoder (KandinskyPipeline or KandinskyV22Pipeline, e.g. kandinsky-2-2)",
            Family::Inpaint => "an inpainting decoder (KandinskyInpaintPipeline or KandinskyV22InpaintPipeline, e.g. kandinsky-2-2-inpaint)",
            Family::Controlnet => "a ControlNet decoder (KandinskyV22ControlnetPipeline, e.g. kandinsky-2-2-controlnet-depth)",
        };
        bail!(
            "{} holds a '{}' pipeline; this mode needs {need}",
            model_dir.display(),
            index.class_name
        );
    }
    // Everything that can be checked is checked before the (slow) prior runs.
    let movq_config = VQModelConfig::load(&component_dir(&model_dir, "movq")?)?;
    let f = 1usize << movq_config.block_out_channels.len().saturating_sub(1);
    let (width, height) = match job.size {
        Some((w, h)) => {
            if a.width.is_some_and(|x| x != w) || a.height.is_some_and(|x| x != h) {
                bail!("the output size of outpainting is the image plus the margins ({w}x{h}); do not pass --width/--height");
            }
            (w, h)
        }
        None => {
            let unet = UNet2DConditionConfig::load(&component_dir(&model_dir, "unet")?)?;
            let native = unet.sample_size.map_or(512, |s| s * f);
            (a.width.unwrap_or(native), a.height.unwrap_or(native))
        }
    };
    if latent_size(height, f) * latent_size(width, f) > MAX_LATENT_PIXELS {
        bail!(
            "{width}x{height} is too large: its activations would not fit in memory on this machine (at most {}x{} pixels with this MoVQ)",
            192 * f,
            192 * f
        );
    }
    let grid = f * f;
    if matches!(
        job.start,
        DecoderStart::Inpaint { .. } | DecoderStart::Controlnet { .. }
    ) && (!width.is_multiple_of(grid) || !height.is_multiple_of(grid))
    {
        bail!(
            "{width}x{height}: this mode needs a width and height that are multiples of {grid} (try {}x{})",
            width.div_ceil(grid) * grid,
            height.div_ceil(grid) * grid
        );
    }
    let decoder_config = match a.scheduler.class_name() {
        None => None,
        Some(class) => {
            let path = component_dir(&model_dir, "scheduler")?.join("scheduler_config.json");
            // `Class.from_config(model_scheduler.config)`: the model's betas, the keys the new
            // class takes, its own defaults for the rest.
            Some(kandinsky::schedulers::with_class(
                &SchedulerConfig::load(&path)?,
                class,
            )?)
        }
    };
    let device = Device::Cpu;
    let prior_latents = a
        .prior_latents
        .as_deref()
        .map(|p| read_tensor(p, &device))
        .transpose()?;
    let latents = a
        .latents
        .as_deref()
        .map(|p| read_tensor(p, &device))
        .transpose()?;
    if prior_latents.is_some() && !matches!(job.prior, PriorStage::Text { .. }) {
        bail!("--prior-latents applies to modes whose prior samples one prompt from noise (not mix, variations or --prior-strength)");
    }
    if latents.is_some()
        && matches!(
            job.start,
            DecoderStart::Image { .. } | DecoderStart::Controlnet { image: Some(_), .. }
        )
    {
        bail!("--latents does not apply to image-to-image (the start is the noised image)");
    }

    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
    });
    eprintln!("seed {seed}");
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
        match &job.prior {
            PriorStage::Text { prompt, negative } => prior.call(
                std::slice::from_ref(prompt),
                negative.as_deref(),
                params,
                &mut generator,
                prior_latents,
                &mut bar,
            )?,
            PriorStage::FromImage {
                prompt,
                negative,
                image,
                strength,
            } => prior.emb2emb(
                std::slice::from_ref(prompt),
                negative.as_deref(),
                (image.0, image.1, &image.2),
                *strength,
                params,
                &mut generator,
                &mut bar,
            )?,
            PriorStage::Mix(inputs) => {
                prior.interpolate(inputs, params, "", None, &mut generator, &mut bar)?
            }
        }
    };
    let dp = DecoderParams {
        height,
        width,
        steps: a.steps,
        guidance_scale: a.guidance,
    };
    let images = decode(
        &model_dir,
        v21,
        &job,
        dp,
        decoder_config,
        (&image_embeds, &negative_embeds),
        latents,
        &mut generator,
    )?;
    let sampler = match a.scheduler {
        SchedulerChoice::Default if v21 => "DDIM (model default)",
        SchedulerChoice::Default => "DDPM (model default)",
        SchedulerChoice::Ddim => "DDIM",
        SchedulerChoice::Ddpm => "DDPM",
        SchedulerChoice::DpmPlusPlus2M => "DPM++ 2M",
    };
    let parameters = format!(
        "{}\nSteps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {seed}, Size: {width}x{height}, Model: {}, Prior: {}, Sampler: {sampler}",
        job.record,
        a.steps,
        a.prior_steps,
        a.guidance,
        a.prior_guidance,
        a.model.as_deref().unwrap_or("small (models/small)"),
        a.prior.as_deref().unwrap_or(if a.model.is_some() {
            "(preset)"
        } else {
            "small (models/small/prior)"
        }),
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
    model_dir: &Path,
    v21: bool,
    job: &Job,
    dp: DecoderParams,
    scheduler: Option<SchedulerConfig>,
    (embeds, negative): (&Tensor, &Tensor),
    latents: Option<Tensor>,
    generator: &mut TorchGenerator,
) -> Result<Tensor> {
    let device = Device::Cpu;
    let context = || format!("loading the decoder from {}", model_dir.display());
    let mut bar = progress("decoder");
    let inpaint_inputs = |image: &Rgb8, mask: &Rgb8| {
        prepare_mask_and_masked_image(
            (image.0, image.1, &image.2),
            (mask.0, mask.1, &mask.2),
            dp.width,
            dp.height,
            &device,
        )
    };
    if v21 {
        // As diffusers' combined pipelines: the decoder's M-CLIP sees the prompt ("" for mixing),
        // and its unconditional text is "" (a negative prompt acts through the prior).
        let mut d =
            KandinskyPipeline::load(model_dir, DType::F32, &device).with_context(context)?;
        if let Some(s) = scheduler {
            d.set_scheduler(s);
        }
        let prompts = vec![job.decoder_prompt.clone()];
        return Ok(match &job.start {
            DecoderStart::Noise => d.call(
                &prompts, None, embeds, negative, dp, generator, latents, &mut bar,
            )?,
            DecoderStart::Image { image, strength } => {
                let image = prepare_image(image, dp.width, dp.height, d.scale_factor(), &device)?;
                d.img2img(
                    &prompts, None, &image, embeds, negative, dp, *strength, generator, &mut bar,
                )?
            }
            DecoderStart::Inpaint { image, mask } => {
                let (mask, image) = inpaint_inputs(image, mask)?;
                d.inpaint(
                    &prompts, None, &image, &mask, embeds, negative, dp, generator, latents,
                    &mut bar,
                )?
            }
            DecoderStart::Controlnet { .. } => unreachable!("ControlNet decoders are 2.2"),
        });
    }
    let mut d = KandinskyV22Pipeline::load(model_dir, DType::F32, &device).with_context(context)?;
    if let Some(s) = scheduler {
        d.set_scheduler(s);
    }
    Ok(match &job.start {
        DecoderStart::Noise => d.call(embeds, negative, dp, generator, latents, &mut bar)?,
        DecoderStart::Image { image, strength } => {
            let image = prepare_image(image, dp.width, dp.height, d.scale_factor(), &device)?;
            d.img2img(&image, embeds, negative, dp, *strength, generator, &mut bar)?
        }
        DecoderStart::Inpaint { image, mask } => {
            let (mask, image) = inpaint_inputs(image, mask)?;
            d.inpaint(
                &image, &mask, embeds, negative, dp, generator, latents, &mut bar,
            )?
        }
        DecoderStart::Controlnet { hint, image } => {
            let hint = load_hint(hint, dp.width, dp.height, &device)?;
            let image = match image {
                Some((path, strength)) => Some((
                    prepare_image(path, dp.width, dp.height, d.scale_factor(), &device)?,
                    *strength,
                )),
                None => None,
            };
            d.controlnet(
                &hint,
                image.as_ref().map(|(i, s)| (i, *s)),
                embeds,
                negative,
                dp,
                generator,
                latents,
                &mut bar,
            )?
        }
    })
}

fn record(p: &PromptArgs) -> String {
    format!(
        "{}\nNegative prompt: {}",
        p.prompt,
        p.negative_prompt.as_deref().unwrap_or("")
    )
}

fn text_stage(p: &PromptArgs) -> PriorStage {
    PriorStage::Text {
        prompt: p.prompt.clone(),
        negative: p.negative_prompt.clone(),
    }
}

/// The prior stage of a mode with a starting image: emb2emb when `--prior-strength` is given.
fn prior_from(
    p: &PromptArgs,
    image: Option<&Path>,
    prior_strength: Option<f64>,
) -> Result<PriorStage> {
    match (prior_strength, image) {
        (None, _) => Ok(text_stage(p)),
        (Some(_), None) => bail!("--prior-strength needs --image"),
        (Some(s), Some(path)) => {
            check_strength("--prior-strength", s)?;
            Ok(PriorStage::FromImage {
                prompt: p.prompt.clone(),
                negative: p.negative_prompt.clone(),
                image: read_image(path, "image")?,
                strength: s,
            })
        }
    }
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let job = Job {
        prior: text_stage(&a.prompt),
        start: DecoderStart::Noise,
        decoder_prompt: a.prompt.prompt.clone(),
        record: record(&a.prompt),
        size: None,
    };
    run_job(&a.common, job, Family::Plain)
}

pub fn run_img2img(a: &Img2ImgArgs) -> Result<()> {
    check_strength("--strength", a.strength)?;
    if !a.image.is_file() {
        bail!("image {} not found", a.image.display());
    }
    let job = Job {
        prior: prior_from(&a.prompt, Some(&a.image), a.prior_strength)?,
        start: DecoderStart::Image {
            image: a.image.clone(),
            strength: a.strength,
        },
        decoder_prompt: a.prompt.prompt.clone(),
        record: format!(
            "{}\nImage: {}, Strength: {}{}",
            record(&a.prompt),
            a.image.display(),
            a.strength,
            a.prior_strength
                .map_or(String::new(), |s| format!(", Prior strength: {s}"))
        ),
        size: None,
    };
    run_job(&a.common, job, Family::Plain)
}

pub fn run_inpaint(a: &InpaintArgs) -> Result<()> {
    let image = read_image(&a.image, "image")?;
    let mask = read_image(&a.mask, "mask")?;
    if (image.0, image.1) != (mask.0, mask.1) {
        bail!(
            "the mask is {}x{} but the image is {}x{}: they must have the same size",
            mask.0,
            mask.1,
            image.0,
            image.1
        );
    }
    let job = Job {
        prior: text_stage(&a.prompt),
        start: DecoderStart::Inpaint { image, mask },
        decoder_prompt: a.prompt.prompt.clone(),
        record: format!(
            "{}\nImage: {}, Mask: {}",
            record(&a.prompt),
            a.image.display(),
            a.mask.display()
        ),
        size: None,
    };
    run_job(&a.common, job, Family::Inpaint)
}

pub fn run_outpaint(a: &OutpaintArgs) -> Result<()> {
    if a.left + a.right + a.top + a.bottom == 0 {
        bail!("give at least one margin to extend: --left, --right, --top or --bottom");
    }
    let (w, h, rgb) = read_image(&a.image, "image")?;
    let (cw, ch, canvas, mask) = extend_canvas((w, h, &rgb), a.left, a.top, a.right, a.bottom);
    let job = Job {
        prior: text_stage(&a.prompt),
        start: DecoderStart::Inpaint {
            image: (cw, ch, canvas),
            mask: (cw, ch, mask),
        },
        decoder_prompt: a.prompt.prompt.clone(),
        record: format!(
            "{}\nImage: {}, Outpaint: left {} right {} top {} bottom {}",
            record(&a.prompt),
            a.image.display(),
            a.left,
            a.right,
            a.top,
            a.bottom
        ),
        size: Some((cw, ch)),
    };
    run_job(&a.common, job, Family::Inpaint)
}

pub fn run_controlnet(a: &ControlnetArgs) -> Result<()> {
    if !a.hint.is_file() {
        bail!("hint image {} not found", a.hint.display());
    }
    read_image(&a.hint, "hint")?;
    let image = match &a.image {
        Some(path) => {
            check_strength("--strength", a.strength)?;
            read_image(path, "image")?;
            Some((path.clone(), a.strength))
        }
        None => None,
    };
    let job = Job {
        prior: prior_from(&a.prompt, a.image.as_deref(), a.prior_strength)?,
        start: DecoderStart::Controlnet {
            hint: a.hint.clone(),
            image,
        },
        decoder_prompt: a.prompt.prompt.clone(),
        record: format!("{}\nHint: {}", record(&a.prompt), a.hint.display()),
        size: None,
    };
    run_job(&a.common, job, Family::Controlnet)
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
            let (w, h, rgb) = read_image(path, "mix input")?;
            MixInput::Image(w, h, rgb)
        } else {
            MixInput::Text(input.clone())
        };
        inputs.push((item, w));
    }
    let job = Job {
        prior: PriorStage::Mix(inputs),
        start: DecoderStart::Noise,
        decoder_prompt: String::new(),
        record: format!("Mix: {:?} with weights {:?}", a.inputs, a.weights),
        size: None,
    };
    run_job(&a.common, job, Family::Plain)
}

pub fn run_variations(a: &VariationsArgs) -> Result<()> {
    let (w, h, rgb) = read_image(&a.image, "image")?;
    let job = Job {
        prior: PriorStage::Mix(vec![(MixInput::Image(w, h, rgb), 1.0)]),
        start: DecoderStart::Noise,
        decoder_prompt: String::new(),
        record: format!("Variations of {}", a.image.display()),
        size: None,
    };
    run_job(&a.common, job, Family::Plain)
}
