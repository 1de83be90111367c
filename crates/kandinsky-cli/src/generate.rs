//! Every generation mode: flags → a library [`Request`], the progress bar, PNG writing. The
//! pipeline itself (model kinds, sizes, stages) is `kandinsky::pipelines::auto_pipeline`.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use kandinsky::loading::{
    given_or_small, read_tensor, small_named_dirs, PipelineDirs, SMALL_MODEL_NAMES,
};
use kandinsky::pipelines::auto_pipeline::{
    AutoPipeline, Controlnet, ControlnetImage, DecoderKind, GenerationParams, ImageToImage,
    Inpainting, Mixing, Mode, Outpainting, Prompt, Request, Stage, TextToImage, Variations,
    Version,
};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::MixInput;
use kandinsky::schedulers::SchedulerClass;
use kandinsky::utils::torch_utils::TorchGenerator;
use kandinsky::vae_image_processor::{numbered_path, read_rgb8, save_png, Margins, Rgb8};
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
    /// Euler (`EulerDiscreteScheduler`).
    Euler,
    /// Euler ancestral (`EulerAncestralDiscreteScheduler`, A1111's "Euler a").
    #[value(name = "euler-a")]
    EulerA,
}

impl SchedulerChoice {
    pub(crate) fn class(self) -> Option<SchedulerClass> {
        match self {
            SchedulerChoice::Default => None,
            SchedulerChoice::Ddim => Some(SchedulerClass::Ddim),
            SchedulerChoice::Ddpm => Some(SchedulerClass::Ddpm),
            SchedulerChoice::DpmPlusPlus2M => Some(SchedulerClass::DpmSolverMultistep),
            SchedulerChoice::Euler => Some(SchedulerClass::EulerDiscrete),
            SchedulerChoice::EulerA => Some(SchedulerClass::EulerAncestralDiscrete),
        }
    }
}

/// Flags shared by every generation mode.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Decoder model: a directory in diffusers layout, a hub id in the Hugging Face cache, a
    /// preset (kandinsky-2-1, kandinsky-2-1-inpaint, kandinsky-2-2, kandinsky-2-2-inpaint,
    /// kandinsky-2-2-controlnet-depth), or one of our small models shipped in `models/small`:
    /// `small` (Kandinsky 2.1) or `small-2-2` (its 2.2 sibling), whose decoder for the mode
    /// (text-to-image, inpainting, the depth ControlNet) is picked. Default: `small`
    /// (`small-2-2` for the ControlNet).
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

/// The sampling settings of commands that run many generations (`batch`, `eval`).
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Decoder steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Prior steps.
    #[arg(long, default_value_t = 25)]
    pub prior_steps: usize,
    /// Decoder guidance.
    #[arg(long, default_value_t = 4.0)]
    pub guidance: f64,
    /// Prior guidance.
    #[arg(long, default_value_t = 4.0)]
    pub prior_guidance: f64,
}

/// Writes one image and says so.
pub(crate) fn write_image(
    path: &Path,
    image: &Rgb8,
    text: &[(&str, &str)],
) -> kandinsky::Result<()> {
    save_png(path, image, text)?;
    println!(
        "wrote {} ({}x{})",
        path.display(),
        image.width,
        image.height
    );
    Ok(())
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

/// How inpainting and outpainting keep the unmasked part of the input.
#[derive(clap::Args)]
pub struct OverlayArgs {
    /// Paste the input back outside the mask, feathered by a Gaussian of this σ in pixels
    /// (AUTOMATIC1111's `mask_blur`, default 4): pixels outside the blurred mask keep their
    /// exact input values.
    #[arg(long, default_value_t = 4.0)]
    mask_blur: f64,
    /// Return the decoder's output as diffusers does (no paste-back; the kept part also changes
    /// a little).
    #[arg(long)]
    no_overlay: bool,
}

impl OverlayArgs {
    fn mask_blur(&self) -> Option<f64> {
        (!self.no_overlay).then_some(self.mask_blur)
    }

    fn record(&self) -> String {
        match self.mask_blur() {
            Some(b) => format!(", Mask blur: {b}"),
            None => ", Overlay: none".into(),
        }
    }
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
    #[command(flatten)]
    overlay: OverlayArgs,
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
    #[command(flatten)]
    overlay: OverlayArgs,
}

#[derive(clap::Args)]
pub struct ControlnetArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The hint image (a depth map: near = bright), resized to 8 pixels per latent pixel (the
    /// output size for Kandinsky 2.2, twice it for our small model).
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

fn read_image(path: &Path, what: &str) -> Result<Rgb8> {
    read_rgb8(path).with_context(|| format!("reading the {what}"))
}

fn read_latents(path: Option<&Path>) -> Result<Option<Tensor>> {
    Ok(path.map(|p| read_tensor(p, &Device::Cpu)).transpose()?)
}

/// A progress bar on stderr, restarted for each stage.
fn progress_bar() -> impl FnMut(Stage, usize, usize) {
    let mut current = None;
    let mut start = Instant::now();
    move |stage, i, n| {
        if current != Some(stage) {
            current = Some(stage);
            start = Instant::now();
        }
        let name = match stage {
            Stage::Prior => "prior",
            Stage::Decoder => "decoder",
        };
        let elapsed = start.elapsed().as_secs_f64();
        let eta = elapsed / i as f64 * (n - i) as f64;
        let width = 30;
        let done = width * i / n;
        eprint!(
            "\r{name:>8} [{}{}] {i}/{n} {elapsed:.1}s, ETA {eta:.1}s ",
            "#".repeat(done),
            "-".repeat(width - done)
        );
        if i == n {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

/// The model and prior directories: `--model` as a directory, a hub id or a preset name, or
/// the small model when it is omitted.
fn model_dirs(a: &CommonArgs, kind: DecoderKind) -> Result<PipelineDirs> {
    pipeline_dirs_of(a.model.as_deref(), a.prior.as_deref(), kind)
}

/// Text-to-image decoder and prior directories of `--model` / `--prior` (the small model's when
/// `model` is `None`), fetching presets and hub ids the cache lacks.
pub(crate) fn pipeline_dirs(model: Option<&str>, prior: Option<&str>) -> Result<PipelineDirs> {
    pipeline_dirs_of(model, prior, DecoderKind::TextToImage)
}

/// The directories of `model` (a small model's name, a directory, a hub id or a preset; the small
/// model when omitted, its 2.2 sibling for the ControlNet), the decoder of a small model being the
/// one the mode needs (`which`).
fn pipeline_dirs_of(
    model: Option<&str>,
    prior: Option<&str>,
    which: DecoderKind,
) -> Result<PipelineDirs> {
    let model = match model {
        Some(m) if !SMALL_MODEL_NAMES.contains(&m) || Path::new(m).is_dir() => m,
        _ => {
            let name = model.unwrap_or(if which == DecoderKind::Controlnet {
                "small-2-2"
            } else {
                "small"
            });
            let mut dirs = small_named_dirs(name, which)?;
            dirs.prior = given_or_small(prior, "prior")?;
            return Ok(dirs);
        }
    };
    crate::download::ensure_pipeline(model, prior)?
        .context("--prior is required unless --model is a preset name or omitted")
}

/// The mode's request, and the first lines of the PNG's `parameters` text.
struct Job {
    mode: Mode,
    record: String,
}

fn run_job(a: &CommonArgs, job: Job) -> Result<()> {
    crate::check_output_dir(&a.output)?;
    let dirs = model_dirs(a, job.mode.decoder_kind())?;
    let mut pipe =
        AutoPipeline::from_pretrained(&dirs.decoder, &dirs.prior, crate::load_options()?)?;
    let request = Request {
        mode: job.mode,
        params: GenerationParams {
            width: a.width,
            height: a.height,
            steps: a.steps,
            prior_steps: a.prior_steps,
            guidance: a.guidance,
            prior_guidance: a.prior_guidance,
            num_images: a.num_images,
            scheduler: a.scheduler.class(),
        },
    };
    // Everything that can be checked is checked before the (slow) prior runs: the request, and
    // every weight file's headers against its config.
    let plan = pipe.check(&request)?;
    pipe.verify()?;
    let seed = a.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
    });
    eprintln!("seed {seed}");
    let mut generator = TorchGenerator::new(seed);
    let n = a.num_images;
    if n > plan.images_per_run {
        eprintln!(
            "{n} images: in runs of {} (what fits in memory at once), each written when its run ends",
            plan.images_per_run
        );
    }
    let sampler = match (a.scheduler.class(), pipe.info().version) {
        (None, Version::V2_1) => "DDIM (model default)",
        (None, Version::V2_2) => "DDPM (model default)",
        (Some(class), _) => class.display_name(),
    };
    let parameters = format!(
        "{}\nSteps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Prior: {}, Sampler: {sampler}",
        job.record,
        a.steps,
        a.prior_steps,
        a.guidance,
        a.prior_guidance,
        plan.width,
        plan.height,
        a.model.as_deref().unwrap_or("small (models/small)"),
        a.prior.as_deref().unwrap_or(if a.model.is_some() {
            "(preset)"
        } else {
            "small (models/small/prior)"
        }),
    );
    pipe.generate_chunked(
        request,
        &mut generator,
        &mut progress_bar(),
        &mut |i, image| {
            write_image(
                &numbered_path(&a.output, i, n),
                &image,
                &[("parameters", &parameters)],
            )
        },
    )?;
    Ok(())
}

fn record(p: &PromptArgs) -> String {
    format!(
        "{}\nNegative prompt: {}",
        p.prompt,
        p.negative_prompt.as_deref().unwrap_or("")
    )
}

fn prompt(p: &PromptArgs) -> Prompt {
    Prompt {
        prompt: p.prompt.clone(),
        negative_prompt: p.negative_prompt.clone(),
    }
}

/// `--latents` for the modes that start from noise.
fn latents(a: &CommonArgs) -> Result<Option<Tensor>> {
    read_latents(a.latents.as_deref())
}

/// `--prior-latents` for the modes whose prior samples one prompt from noise.
fn prior_latents(a: &CommonArgs) -> Result<Option<Tensor>> {
    read_latents(a.prior_latents.as_deref())
}

/// Refuses a flag the mode has no use for.
fn refuse(given: bool, message: &str) -> Result<()> {
    if given {
        bail!("{message}");
    }
    Ok(())
}

const NO_PRIOR_LATENTS: &str = "--prior-latents applies to modes whose prior samples one prompt from noise (not mix, variations or --prior-strength)";
const NO_LATENTS: &str =
    "--latents does not apply to image-to-image (the start is the noised image)";

pub fn run(a: &GenerateArgs) -> Result<()> {
    let mode = TextToImage {
        prompt: prompt(&a.prompt),
        latents: latents(&a.common)?,
        prior_latents: prior_latents(&a.common)?,
    };
    let record = record(&a.prompt);
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_img2img(a: &Img2ImgArgs) -> Result<()> {
    refuse(a.common.latents.is_some(), NO_LATENTS)?;
    refuse(
        a.prior_strength.is_some() && a.common.prior_latents.is_some(),
        NO_PRIOR_LATENTS,
    )?;
    if !a.image.is_file() {
        bail!("image {} not found", a.image.display());
    }
    let mode = ImageToImage {
        prompt: prompt(&a.prompt),
        image: read_image(&a.image, "image")?,
        strength: a.strength,
        prior_strength: a.prior_strength,
        prior_latents: prior_latents(&a.common)?,
    };
    let record = format!(
        "{}\nImage: {}, Strength: {}{}",
        record(&a.prompt),
        a.image.display(),
        a.strength,
        a.prior_strength
            .map_or(String::new(), |s| format!(", Prior strength: {s}"))
    );
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_inpaint(a: &InpaintArgs) -> Result<()> {
    let mode = Inpainting {
        prompt: prompt(&a.prompt),
        image: read_image(&a.image, "image")?,
        mask: read_image(&a.mask, "mask")?,
        mask_blur: a.overlay.mask_blur(),
        latents: latents(&a.common)?,
        prior_latents: prior_latents(&a.common)?,
    };
    let record = format!(
        "{}\nImage: {}, Mask: {}{}",
        record(&a.prompt),
        a.image.display(),
        a.mask.display(),
        a.overlay.record()
    );
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_outpaint(a: &OutpaintArgs) -> Result<()> {
    let mode = Outpainting {
        prompt: prompt(&a.prompt),
        image: read_image(&a.image, "image")?,
        margins: Margins {
            left: a.left,
            top: a.top,
            right: a.right,
            bottom: a.bottom,
        },
        mask_blur: a.overlay.mask_blur(),
        latents: latents(&a.common)?,
        prior_latents: prior_latents(&a.common)?,
    };
    let record = format!(
        "{}\nImage: {}, Outpaint: left {} right {} top {} bottom {}{}",
        record(&a.prompt),
        a.image.display(),
        a.left,
        a.right,
        a.top,
        a.bottom,
        a.overlay.record()
    );
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_controlnet(a: &ControlnetArgs) -> Result<()> {
    if a.prior_strength.is_some() && a.image.is_none() {
        bail!("--prior-strength needs --image");
    }
    refuse(a.image.is_some() && a.common.latents.is_some(), NO_LATENTS)?;
    refuse(
        a.prior_strength.is_some() && a.common.prior_latents.is_some(),
        NO_PRIOR_LATENTS,
    )?;
    if !a.hint.is_file() {
        bail!("hint image {} not found", a.hint.display());
    }
    let image = match &a.image {
        Some(path) => Some(ControlnetImage {
            image: read_image(path, "image")?,
            strength: a.strength,
            prior_strength: a.prior_strength,
        }),
        None => None,
    };
    let mode = Controlnet {
        prompt: prompt(&a.prompt),
        hint: read_image(&a.hint, "hint")?,
        image,
        latents: latents(&a.common)?,
        prior_latents: prior_latents(&a.common)?,
    };
    let record = format!("{}\nHint: {}", record(&a.prompt), a.hint.display());
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_mix(a: &MixArgs) -> Result<()> {
    refuse(a.common.prior_latents.is_some(), NO_PRIOR_LATENTS)?;
    if a.inputs.len() != a.weights.len() {
        bail!(
            "{} --input values but {} --weight values: give one weight per input",
            a.inputs.len(),
            a.weights.len()
        );
    }
    let mut inputs = Vec::new();
    for (input, &w) in a.inputs.iter().zip(&a.weights) {
        let path = Path::new(input);
        let item = if path.is_file() {
            MixInput::Image(read_image(path, "mix input")?)
        } else {
            MixInput::Text(input.clone())
        };
        inputs.push((item, w));
    }
    let mode = Mixing {
        inputs,
        latents: latents(&a.common)?,
    };
    let record = format!("Mix: {:?} with weights {:?}", a.inputs, a.weights);
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}

pub fn run_variations(a: &VariationsArgs) -> Result<()> {
    refuse(a.common.prior_latents.is_some(), NO_PRIOR_LATENTS)?;
    let mode = Variations {
        image: read_image(&a.image, "image")?,
        latents: latents(&a.common)?,
    };
    let record = format!("Variations of {}", a.image.display());
    run_job(
        &a.common,
        Job {
            mode: mode.into(),
            record,
        },
    )
}
