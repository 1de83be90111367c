//! The combined pipelines of diffusers (`pipelines/auto_pipeline.py`,
//! `pipelines/kandinsky*/pipeline_kandinsky*_combined.py`): a prior directory and a decoder
//! directory behind one entry, one request type per mode of the paper's demo, checked in one
//! place before any weight is loaded, then the prior stage and the decoder stage with one shared
//! generator, so the same seed gives diffusers' images.
//!
//! ```no_run
//! use kandinsky::pipelines::auto_pipeline::{AutoPipeline, LoadOptions, Request, TextToImage};
//! use kandinsky::utils::torch_utils::TorchGenerator;
//!
//! # fn main() -> kandinsky::Result<()> {
//! let dirs = kandinsky::loading::small_model_dirs(false)?;
//! let mut pipe = AutoPipeline::from_pretrained(&dirs.decoder, &dirs.prior, LoadOptions::default())?;
//! let request = Request::new(TextToImage::new("a large blue square in the centre on a yellow background"));
//! let mut generator = TorchGenerator::new(1);
//! let images = pipe.generate(request, &mut generator, &mut |stage, step, steps| {
//!     eprintln!("{stage:?} {step}/{steps}");
//! })?;
//! kandinsky::vae_image_processor::save_png("image.png".as_ref(), &images[0], &[])?;
//! # Ok(())
//! # }
//! ```

use crate::error::{Error, Result};
use crate::loading::{component_dir, ModelIndex};
use crate::models::{UNet2DConditionConfig, VQModelConfig};
use crate::pipelines::decoder::{
    check_mask_size, latent_size, prepare_mask_and_masked_image, DecoderCore, DecoderParams,
};
use crate::pipelines::kandinsky::pipeline_kandinsky::KandinskyPipeline;
use crate::pipelines::kandinsky::pipeline_kandinsky_prior::{
    check_mix_inputs, KandinskyPriorPipeline, MixInput, PriorOutput, PriorParams,
};
use crate::pipelines::kandinsky2_2::pipeline_kandinsky2_2::KandinskyV22Pipeline;
use crate::pipelines::{check_strength, CancelFlag, Preview};
use crate::schedulers::{with_class, SchedulerClass, SchedulerConfig};
use crate::utils::torch_utils::TorchGenerator;
use crate::vae_image_processor::{
    extend_canvas, overlay_unmasked, prepare_hint, prepare_image, resize_rgb8, to_rgb8, Margins,
    Rgb8,
};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// The largest latent area per image we agree to allocate: the real UNet's attention at its first
/// SimpleCrossAttn level holds (h/2·w/2)² scores per head.
pub const MAX_LATENT_PIXELS: usize = 192 * 192;

/// The default of [`LoadOptions::batch_latent_pixels`]: a larger batch runs in parts of at most
/// this many latent pixels (the linear activations of the largest single image).
pub const MAX_BATCH_LATENT_PIXELS: usize = MAX_LATENT_PIXELS;

/// Pixels of a ControlNet hint per latent pixel: diffusers' `ImageHintTimeEmbedding` reduces its
/// hint 8 times to the latent's size, whatever the MoVQ's factor.
pub const HINT_BLOCK_FACTOR: usize = 8;

/// Kandinsky 2.1 (the decoder also reads the prompt through M-CLIP) or 2.2 (image embedding only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Kandinsky 2.1.
    V2_1,
    /// Kandinsky 2.2.
    V2_2,
}

/// The kind of decoder a model directory holds, which decides the modes it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderKind {
    /// `KandinskyPipeline` (2.1) / `KandinskyV22Pipeline` (2.2): text-to-image, image-to-image,
    /// mixing and variations.
    TextToImage,
    /// `KandinskyInpaintPipeline` / `KandinskyV22InpaintPipeline`: inpainting and outpainting.
    Inpaint,
    /// `KandinskyV22ControlnetPipeline`: ControlNet depth.
    Controlnet,
}

impl DecoderKind {
    /// `(kind, version)` of a decoder's `model_index.json` class.
    pub fn from_class_name(class: &str) -> Option<(Self, Version)> {
        use {DecoderKind::*, Version::*};
        Some(match class {
            "KandinskyPipeline" | "KandinskyImg2ImgPipeline" => (TextToImage, V2_1),
            "KandinskyV22Pipeline" | "KandinskyV22Img2ImgPipeline" => (TextToImage, V2_2),
            "KandinskyInpaintPipeline" => (Inpaint, V2_1),
            "KandinskyV22InpaintPipeline" => (Inpaint, V2_2),
            "KandinskyV22ControlnetPipeline" | "KandinskyV22ControlnetImg2ImgPipeline" => {
                (Controlnet, V2_2)
            }
            _ => return None,
        })
    }

    /// What a mode needing this kind asks for, in an error message.
    fn requirement(self) -> &'static str {
        match self {
            DecoderKind::TextToImage => "a text-to-image decoder (KandinskyPipeline or KandinskyV22Pipeline, e.g. kandinsky-2-2)",
            DecoderKind::Inpaint => "an inpainting decoder (KandinskyInpaintPipeline or KandinskyV22InpaintPipeline, e.g. kandinsky-2-2-inpaint)",
            DecoderKind::Controlnet => "a ControlNet decoder (KandinskyV22ControlnetPipeline, e.g. kandinsky-2-2-controlnet-depth)",
        }
    }
}

/// What [`AutoPipeline::from_pretrained`] learns from the model directories' configs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The decoder directory.
    pub decoder_dir: PathBuf,
    /// The prior directory.
    pub prior_dir: PathBuf,
    /// The decoder's `model_index.json` class.
    pub class_name: String,
    /// 2.1 or 2.2.
    pub version: Version,
    /// The kind of decoder.
    pub kind: DecoderKind,
    /// Pixels per latent pixel of the MoVQ (`2^(levels - 1)`).
    pub scale_factor: usize,
    /// The decoder's native image side: UNet `sample_size` × the MoVQ factor (512 when the
    /// config has none).
    pub native_size: usize,
}

/// How the stages are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of every network.
    pub dtype: DType,
    /// Device of every network.
    pub device: Device,
    /// Keep both stages in memory between requests (a server); otherwise each stage is loaded
    /// when it runs and freed after, so the prior is gone before the decoder loads.
    pub keep_loaded: bool,
    /// The most latent pixels one run holds over its whole batch ([`Plan::images_per_run`]);
    /// lower it where memory is short.
    pub batch_latent_pixels: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            keep_loaded: false,
            batch_latent_pixels: MAX_BATCH_LATENT_PIXELS,
        }
    }
}

/// Sampling settings shared by every mode (diffusers' combined pipelines' defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerationParams {
    /// Image width in pixels (rounded up to the latent grid); the decoder's native size when
    /// `None`.
    pub width: Option<usize>,
    /// Image height in pixels, as `width`.
    pub height: Option<usize>,
    /// Decoder steps.
    pub steps: usize,
    /// Prior steps (at least 2).
    pub prior_steps: usize,
    /// Decoder guidance scale (CFG when > 1).
    pub guidance: f64,
    /// Prior guidance scale (CFG when > 1).
    pub prior_guidance: f64,
    /// Images to generate.
    pub num_images: usize,
    /// The decoder's sampler; the model's own scheduler when `None`.
    pub scheduler: Option<SchedulerClass>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            width: None,
            height: None,
            steps: 100,
            prior_steps: 25,
            guidance: 4.0,
            prior_guidance: 4.0,
            num_images: 1,
            scheduler: None,
        }
    }
}

/// A prompt and its negative (the prior samples the negative's embedding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prompt {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: Option<String>,
}

impl From<&str> for Prompt {
    fn from(prompt: &str) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
        }
    }
}

/// Text to image.
#[derive(Debug, Clone)]
pub struct TextToImage {
    /// The prompt.
    pub prompt: Prompt,
    /// The decoder's initial latents `(B, C, h, w)` instead of noise.
    pub latents: Option<Tensor>,
    /// The prior's initial latents `(B, E)` instead of noise.
    pub prior_latents: Option<Tensor>,
}

impl TextToImage {
    /// A text-to-image request from noise.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: Prompt {
                prompt: prompt.into(),
                negative_prompt: None,
            },
            latents: None,
            prior_latents: None,
        }
    }
}

/// Image to image: the decoder starts from the noised image; with `prior_strength` the prior
/// also starts from the image's CLIP embedding (2.2's `PriorEmb2EmbPipeline`).
#[derive(Debug, Clone)]
pub struct ImageToImage {
    /// The prompt.
    pub prompt: Prompt,
    /// The starting image (resized to the output size).
    pub image: Rgb8,
    /// How much of the schedule to run, in (0, 1]: 0 keeps the image, 1 ignores it.
    pub strength: f64,
    /// The prior's strength from the image's embedding, in (0, 1].
    pub prior_strength: Option<f64>,
    /// The prior's initial latents (without `prior_strength`).
    pub prior_latents: Option<Tensor>,
}

/// Inpainting: repaint where the mask is white (an inpainting decoder).
#[derive(Debug, Clone)]
pub struct Inpainting {
    /// The prompt.
    pub prompt: Prompt,
    /// The image to edit.
    pub image: Rgb8,
    /// The mask, same size as the image: white = repaint, black = keep.
    pub mask: Rgb8,
    /// Keep the unmasked part of the image as AUTOMATIC1111 does ([`overlay_unmasked`] with
    /// this mask blur σ in pixels); `None` returns the decoder's output as diffusers does, where
    /// the kept part also changes a little (the 2.1 pipeline does not blend known regions).
    pub mask_blur: Option<f64>,
    /// The decoder's initial latents.
    pub latents: Option<Tensor>,
    /// The prior's initial latents.
    pub prior_latents: Option<Tensor>,
}

/// Outpainting: the image grown by margins (filled with its edge pixels) and the new area
/// inpainted; the output size is the grown canvas.
#[derive(Debug, Clone)]
pub struct Outpainting {
    /// The prompt.
    pub prompt: Prompt,
    /// The image to extend.
    pub image: Rgb8,
    /// Pixels to add on each side.
    pub margins: Margins,
    /// Keep the original image, as [`Inpainting::mask_blur`].
    pub mask_blur: Option<f64>,
    /// The decoder's initial latents.
    pub latents: Option<Tensor>,
    /// The prior's initial latents.
    pub prior_latents: Option<Tensor>,
}

/// A weighted mix of prompts and images (`prior.interpolate`), then the decoder.
#[derive(Debug, Clone)]
pub struct Mixing {
    /// The inputs and their weights (not normalised, as in diffusers).
    pub inputs: Vec<(MixInput, f64)>,
    /// The decoder's initial latents.
    pub latents: Option<Tensor>,
}

/// Variations of an image: its CLIP image embedding, then the decoder.
#[derive(Debug, Clone)]
pub struct Variations {
    /// The image.
    pub image: Rgb8,
    /// The decoder's initial latents.
    pub latents: Option<Tensor>,
}

/// The starting image of ControlNet image-to-image.
#[derive(Debug, Clone)]
pub struct ControlnetImage {
    /// The image.
    pub image: Rgb8,
    /// How much of the schedule to run, in (0, 1].
    pub strength: f64,
    /// The prior's strength from the image's embedding (emb2emb), in (0, 1].
    pub prior_strength: Option<f64>,
}

/// ControlNet depth (2.2): the decoder follows a hint image, from noise or from an image.
#[derive(Debug, Clone)]
pub struct Controlnet {
    /// The prompt.
    pub prompt: Prompt,
    /// The hint (a depth map: near = bright), resized to 8 pixels per latent pixel
    /// ([`HINT_BLOCK_FACTOR`]: the output size for Kandinsky 2.2's MoVQ).
    pub hint: Rgb8,
    /// Start from this image instead of noise.
    pub image: Option<ControlnetImage>,
    /// The decoder's initial latents (from noise only).
    pub latents: Option<Tensor>,
    /// The prior's initial latents (without a prior strength).
    pub prior_latents: Option<Tensor>,
}

/// One mode of the paper's demo with its inputs.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Text to image.
    TextToImage(TextToImage),
    /// Image to image.
    ImageToImage(ImageToImage),
    /// Inpainting.
    Inpainting(Inpainting),
    /// Outpainting.
    Outpainting(Outpainting),
    /// Mixing of prompts and images.
    Mixing(Mixing),
    /// Image variations.
    Variations(Variations),
    /// ControlNet depth.
    Controlnet(Controlnet),
}

macro_rules! mode_from {
    ($($ty:ident),*) => {$(
        impl From<$ty> for Mode {
            fn from(m: $ty) -> Self {
                Mode::$ty(m)
            }
        }
    )*};
}
mode_from!(
    TextToImage,
    ImageToImage,
    Inpainting,
    Outpainting,
    Mixing,
    Variations,
    Controlnet
);

impl Mode {
    /// Whether initial latents (decoder or prior) are given.
    pub fn has_latents(&self) -> bool {
        match self {
            Mode::TextToImage(m) => m.latents.is_some() || m.prior_latents.is_some(),
            Mode::ImageToImage(m) => m.prior_latents.is_some(),
            Mode::Inpainting(m) => m.latents.is_some() || m.prior_latents.is_some(),
            Mode::Outpainting(m) => m.latents.is_some() || m.prior_latents.is_some(),
            Mode::Mixing(m) => m.latents.is_some(),
            Mode::Variations(m) => m.latents.is_some(),
            Mode::Controlnet(m) => m.latents.is_some() || m.prior_latents.is_some(),
        }
    }

    /// The decoder kind this mode runs on.
    pub fn decoder_kind(&self) -> DecoderKind {
        match self {
            Mode::Inpainting(_) | Mode::Outpainting(_) => DecoderKind::Inpaint,
            Mode::Controlnet(_) => DecoderKind::Controlnet,
            _ => DecoderKind::TextToImage,
        }
    }

    /// The prompt, for the modes that have one.
    pub fn prompt(&self) -> Option<&Prompt> {
        match self {
            Mode::TextToImage(m) => Some(&m.prompt),
            Mode::ImageToImage(m) => Some(&m.prompt),
            Mode::Inpainting(m) => Some(&m.prompt),
            Mode::Outpainting(m) => Some(&m.prompt),
            Mode::Controlnet(m) => Some(&m.prompt),
            Mode::Mixing(_) | Mode::Variations(_) => None,
        }
    }
}

/// A generation request: a mode and the sampling settings.
#[derive(Debug, Clone)]
pub struct Request {
    /// The mode and its inputs.
    pub mode: Mode,
    /// Size, steps, guidance, batch and sampler.
    pub params: GenerationParams,
}

impl Request {
    /// A request with the default settings.
    pub fn new(mode: impl Into<Mode>) -> Self {
        Self {
            mode: mode.into(),
            params: GenerationParams::default(),
        }
    }
}

/// What [`AutoPipeline::check`] derives from a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Output width in pixels (before rounding to the latent grid).
    pub width: usize,
    /// Output height in pixels.
    pub height: usize,
    /// Images one run holds in memory at once ([`LoadOptions::batch_latent_pixels`]): a request for more
    /// runs in parts with [`AutoPipeline::generate_chunked`].
    pub images_per_run: usize,
}

/// Which stage a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The image prior (text → CLIP image embedding).
    Prior,
    /// The decoder (embedding → latent → image).
    Decoder,
}

/// The progress callback: `(stage, step, steps)` after every denoising step.
pub type Progress<'a> = &'a mut dyn FnMut(Stage, usize, usize);

fn invalid(message: String) -> Error {
    Error::InvalidArgument(message)
}

/// A prior started from an image's embedding (`prior_strength`) does not start from latents.
fn check_prior_start(prior_strength: Option<f64>, prior_latents: &Option<Tensor>) -> Result<()> {
    if let Some(s) = prior_strength {
        check_strength("prior strength", s)?;
        if prior_latents.is_some() {
            return Err(invalid(
                "prior latents apply when the prior samples from noise, not with a prior strength"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// The decoder of either version.
enum Decoder {
    V21(Box<KandinskyPipeline>),
    V22(Box<KandinskyV22Pipeline>),
}

impl Decoder {
    /// The UNet, MoVQ, scheduler and cancel flag both versions share.
    fn core_mut(&mut self) -> &mut DecoderCore {
        match self {
            Decoder::V21(d) => &mut d.core,
            Decoder::V22(d) => &mut d.core,
        }
    }
}

/// Where the decoder starts, from the mode's inputs (the same for both versions).
enum Start {
    /// From noise, or the caller's latents.
    Noise(Option<Tensor>),
    /// From the image `(1, 3, H, W)`, with the strength.
    Image(Tensor, f64),
    /// Inpainting: the keep-mask and the image from `prepare_mask_and_masked_image`.
    Inpaint {
        mask: Tensor,
        image: Tensor,
        latents: Option<Tensor>,
    },
    /// ControlNet: the hint, and the image with its strength for image-to-image.
    Controlnet {
        hint: Tensor,
        image: Option<(Tensor, f64)>,
        latents: Option<Tensor>,
    },
}

/// A Kandinsky 2.1 / 2.2 prior + decoder pair, every mode behind [`AutoPipeline::generate`].
pub struct AutoPipeline {
    info: ModelInfo,
    options: LoadOptions,
    /// The model's own decoder scheduler.
    scheduler: SchedulerConfig,
    prior: Option<KandinskyPriorPipeline>,
    decoder: Option<Decoder>,
    cancel: Option<CancelFlag>,
    interrupt: Option<CancelFlag>,
    preview: Option<Preview>,
}

impl AutoPipeline {
    /// Reads the decoder's `model_index.json`, UNet, MoVQ and scheduler configs (no weights yet:
    /// each stage loads when it first runs) and checks that the prior directory exists.
    pub fn from_pretrained(
        decoder_dir: &Path,
        prior_dir: &Path,
        options: LoadOptions,
    ) -> Result<Self> {
        let index = ModelIndex::load(decoder_dir)?;
        let (kind, version) = DecoderKind::from_class_name(&index.class_name).ok_or_else(|| {
            invalid(format!(
                "{} holds a '{}' pipeline, not a Kandinsky decoder",
                decoder_dir.display(),
                index.class_name
            ))
        })?;
        let movq = VQModelConfig::load(&component_dir(decoder_dir, "movq")?)?;
        let scale_factor = movq.scale_factor();
        let unet = UNet2DConditionConfig::load(&component_dir(decoder_dir, "unet")?)?;
        let native_size = unet.sample_size.map_or(512, |s| s * scale_factor);
        let scheduler = SchedulerConfig::load(
            &component_dir(decoder_dir, "scheduler")?.join("scheduler_config.json"),
        )?;
        if !prior_dir.is_dir() {
            return Err(Error::NotFound {
                what: "prior model directory".into(),
                path: prior_dir.to_path_buf(),
            });
        }
        Ok(Self {
            info: ModelInfo {
                decoder_dir: decoder_dir.to_path_buf(),
                prior_dir: prior_dir.to_path_buf(),
                class_name: index.class_name,
                version,
                kind,
                scale_factor,
                native_size,
            },
            options,
            scheduler,
            prior: None,
            decoder: None,
            cancel: None,
            interrupt: None,
            preview: None,
        })
    }

    /// What the configs say about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A flag that, once set, stops the run before its next denoising step with
    /// [`Error::Cancelled`] (clear it before the next request).
    pub fn set_cancel_flag(&mut self, flag: CancelFlag) {
        // Stages already loaded (kept between requests) get it too.
        if let Some(prior) = &mut self.prior {
            prior.set_cancel_flag(flag.clone());
        }
        if let Some(decoder) = &mut self.decoder {
            decoder.core_mut().cancel = Some(flag.clone());
        }
        self.cancel = Some(flag);
    }

    /// A flag that, once set, ends the decoder's loop before its next step and decodes the
    /// latents as they are (AUTOMATIC1111's interrupt: an unfinished image instead of an error).
    /// The prior stage runs to its end.
    pub fn set_interrupt_flag(&mut self, flag: CancelFlag) {
        if let Some(decoder) = &mut self.decoder {
            decoder.core_mut().interrupt = Some(flag.clone());
        }
        self.interrupt = Some(flag);
    }

    /// Live previews of the decoder's latents (see [`Preview`]); `None` turns them off.
    pub fn set_preview(&mut self, preview: Option<Preview>) {
        if let Some(decoder) = &mut self.decoder {
            decoder.core_mut().preview = preview.clone();
        }
        self.preview = preview;
    }

    /// Whether both stages are in memory (with [`LoadOptions::keep_loaded`], after a first run).
    pub fn is_loaded(&self) -> bool {
        self.prior.is_some() && self.decoder.is_some()
    }

    /// Checks a request against the model, before any weight is loaded or any step runs: the
    /// settings, the inputs of the mode, the decoder kind, the size (latent grid, memory bound).
    pub fn check(&self, request: &Request) -> Result<Plan> {
        let p = &request.params;
        for (name, v) in [("steps", p.steps), ("the number of images", p.num_images)] {
            if v == 0 {
                return Err(invalid(format!("{name} must be at least 1")));
            }
        }
        if p.prior_steps < 2 {
            return Err(invalid(
                "prior steps must be at least 2 (the prior scheduler spaces steps over 0..999)"
                    .into(),
            ));
        }
        for (name, g) in [
            ("guidance", p.guidance),
            ("prior guidance", p.prior_guidance),
        ] {
            if !g.is_finite() || g < 0.0 {
                return Err(invalid(format!(
                    "{name} must be a finite number ≥ 0, got {g}"
                )));
            }
        }
        if p.width == Some(0) || p.height == Some(0) {
            return Err(invalid("width and height must be positive".into()));
        }
        let mut fixed_size = None;
        match &request.mode {
            Mode::TextToImage(_) | Mode::Variations(_) => {}
            Mode::ImageToImage(m) => {
                check_strength("strength", m.strength)?;
                check_prior_start(m.prior_strength, &m.prior_latents)?;
            }
            Mode::Inpainting(m) => {
                check_mask_size(&m.image, &m.mask)?;
                check_mask_blur(m.mask_blur)?;
            }
            Mode::Outpainting(m) => {
                let g = m.margins;
                check_mask_blur(m.mask_blur)?;
                if g.left + g.right + g.top + g.bottom == 0 {
                    return Err(invalid(
                        "give at least one margin to extend: left, right, top or bottom".into(),
                    ));
                }
                let size = (
                    m.image.width + g.left + g.right,
                    m.image.height + g.top + g.bottom,
                );
                if p.width.is_some_and(|x| x != size.0) || p.height.is_some_and(|x| x != size.1) {
                    return Err(invalid(format!("the output size of outpainting is the image plus the margins ({}x{}); do not pass a width or height", size.0, size.1)));
                }
                fixed_size = Some(size);
            }
            Mode::Mixing(m) => check_mix_inputs(&m.inputs)?,
            Mode::Controlnet(m) => {
                if let Some(image) = &m.image {
                    check_strength("strength", image.strength)?;
                    if m.latents.is_some() {
                        return Err(invalid("latents do not apply to image-to-image (the start is the noised image)".into()));
                    }
                    check_prior_start(image.prior_strength, &m.prior_latents)?;
                }
            }
        }
        let need = request.mode.decoder_kind();
        if need != self.info.kind {
            return Err(invalid(format!(
                "{} holds a '{}' pipeline; this mode needs {}",
                self.info.decoder_dir.display(),
                self.info.class_name,
                need.requirement()
            )));
        }
        let f = self.info.scale_factor;
        let native = self.info.native_size;
        let (width, height) =
            fixed_size.unwrap_or((p.width.unwrap_or(native), p.height.unwrap_or(native)));
        if latent_size(height, f) * latent_size(width, f) > MAX_LATENT_PIXELS {
            return Err(invalid(format!(
                "{width}x{height} is too large: its activations would not fit in memory on this machine (at most {}x{} pixels with this MoVQ)",
                192 * f,
                192 * f
            )));
        }
        let grid = f * f;
        if need != DecoderKind::TextToImage
            && (!width.is_multiple_of(grid) || !height.is_multiple_of(grid))
        {
            return Err(invalid(format!(
                "{width}x{height}: this mode needs a width and height that are multiples of {grid} (try {}x{})",
                width.div_ceil(grid) * grid,
                height.div_ceil(grid) * grid
            )));
        }
        let latent_pixels = latent_size(height, f) * latent_size(width, f);
        let images_per_run = (self.options.batch_latent_pixels / latent_pixels.max(1)).max(1);
        if p.num_images > images_per_run && request.mode.has_latents() {
            return Err(invalid(format!(
                "{} images of {width}x{height} do not fit in one run (at most {images_per_run}), and given latents are for one run: ask for fewer images",
                p.num_images
            )));
        }
        Ok(Plan {
            width,
            height,
            images_per_run,
        })
    }

    /// Runs a request: [`Self::check`], the prior stage, then the decoder stage, both drawing
    /// from `generator` in diffusers' order. Returns one image per `num_images`.
    pub fn generate(
        &mut self,
        request: Request,
        generator: &mut TorchGenerator,
        progress: Progress,
    ) -> Result<Vec<Rgb8>> {
        let plan = self.check(&request)?;
        let Request { mode, params } = request;
        // What the overlay needs after decoding: the input image, its mask and the blur.
        let overlay = match &mode {
            Mode::Inpainting(m) => m.mask_blur.map(|b| (m.image.clone(), m.mask.clone(), b)),
            Mode::Outpainting(m) => m.mask_blur.map(|b| {
                let (canvas, mask) = extend_canvas(&m.image, m.margins);
                (canvas, mask, b)
            }),
            _ => None,
        };
        let embeds = self.prior_stage(&mode, &params, generator, progress)?;
        if !self.options.keep_loaded {
            self.prior = None;
        }
        let images = self.decoder_stage(mode, &params, plan, &embeds, generator, progress);
        if !self.options.keep_loaded {
            self.decoder = None;
        }
        let images = to_rgb8(&images?)?;
        match overlay {
            None => Ok(images),
            Some((original, mask, blur)) => images
                .iter()
                .map(|generated| {
                    let fit = |img: &Rgb8| resize_rgb8(img, generated.width, generated.height);
                    overlay_unmasked(&fit(&original), generated, &fit(&mask), blur)
                })
                .collect(),
        }
    }

    /// Checks every weight file of both stages against its config from the headers alone
    /// ([`crate::loading::verify_weights`]): a missing, truncated or mismatched checkpoint is
    /// found in milliseconds, before the prior runs, rather than after it.
    pub fn verify(&self) -> Result<()> {
        use crate::loading::{read_json, verify_weights};
        use crate::models::clip::{
            ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig,
            ClipVisionModelWithProjection,
        };
        use crate::models::transformers::prior_transformer::{
            PriorTransformer, PriorTransformerConfig,
        };
        use crate::models::{UNet2DConditionModel, VQModel};
        use crate::pipelines::kandinsky::text_encoder::{MClipConfig, MultilingualClip};
        let config = |dir: &Path| dir.join("config.json");
        let p = &self.info.prior_dir;
        let prior = || -> Result<()> {
            let d = component_dir(p, "prior")?;
            let c: PriorTransformerConfig = read_json(&config(&d))?;
            verify_weights(&d, |w| PriorTransformer::new(w, &c))?;
            let d = component_dir(p, "text_encoder")?;
            let c: ClipTextConfig = read_json(&config(&d))?;
            verify_weights(&d, |w| ClipTextModelWithProjection::new(w, &c))?;
            let d = component_dir(p, "image_encoder")?;
            let c: ClipVisionConfig = read_json(&config(&d))?;
            verify_weights(&d, |w| ClipVisionModelWithProjection::new(w, &c))
        };
        prior().map_err(|e| stage_error("prior", p, e))?;
        let d = &self.info.decoder_dir;
        let decoder = || -> Result<()> {
            let u = component_dir(d, "unet")?;
            let c = UNet2DConditionConfig::load(&u)?;
            verify_weights(&u, |w| UNet2DConditionModel::new(w, &c))?;
            let m = component_dir(d, "movq")?;
            let c = VQModelConfig::load(&m)?;
            verify_weights(&m, |w| VQModel::new(w, &c))?;
            if self.info.version == Version::V2_1 {
                let t = component_dir(d, "text_encoder")?;
                let c: MClipConfig = read_json(&config(&t))?;
                verify_weights(&t, |w| MultilingualClip::new(w, &c))?;
            }
            Ok(())
        };
        decoder().map_err(|e| stage_error("decoder", d, e))
    }

    /// [`Self::generate`] for any number of images, in runs of at most
    /// [`Plan::images_per_run`] (both stages kept loaded between them), each image handed to
    /// `on_image` with its index as soon as its run ends, so memory stays bounded however many
    /// are asked for. A request that fits in one run gives exactly [`Self::generate`]'s images;
    /// a larger one draws each run from `generator` in turn.
    pub fn generate_chunked(
        &mut self,
        request: Request,
        generator: &mut TorchGenerator,
        progress: Progress,
        on_image: &mut dyn FnMut(usize, Rgb8) -> Result<()>,
    ) -> Result<()> {
        let plan = self.check(&request)?;
        let n = request.params.num_images;
        if n <= plan.images_per_run {
            for (i, image) in self
                .generate(request, generator, progress)?
                .into_iter()
                .enumerate()
            {
                on_image(i, image)?;
            }
            return Ok(());
        }
        let keep = self.options.keep_loaded;
        self.options.keep_loaded = true;
        let mut run = || -> Result<()> {
            let mut done = 0;
            while done < n {
                let mut part = request.clone();
                part.params.num_images = (n - done).min(plan.images_per_run);
                let images = self.generate(part, generator, progress)?;
                let count = images.len();
                for (i, image) in images.into_iter().enumerate() {
                    on_image(done + i, image)?;
                }
                done += count;
            }
            Ok(())
        };
        let result = run();
        self.options.keep_loaded = keep;
        if !keep {
            self.prior = None;
            self.decoder = None;
        }
        result
    }

    fn prior(&mut self) -> Result<&KandinskyPriorPipeline> {
        if self.prior.is_none() {
            let dir = &self.info.prior_dir;
            let mut prior =
                KandinskyPriorPipeline::load(dir, self.options.dtype, &self.options.device)
                    .map_err(|e| stage_error("prior", dir, e))?;
            if let Some(flag) = &self.cancel {
                prior.set_cancel_flag(flag.clone());
            }
            self.prior = Some(prior);
        }
        Ok(self.prior.as_ref().expect("loaded above"))
    }

    fn decoder(&mut self) -> Result<&mut Decoder> {
        if self.decoder.is_none() {
            let (dir, dtype, device) = (
                &self.info.decoder_dir,
                self.options.dtype,
                &self.options.device,
            );
            let err = |e| stage_error("decoder", dir, e);
            let mut decoder = match self.info.version {
                Version::V2_1 => Decoder::V21(Box::new(
                    KandinskyPipeline::load(dir, dtype, device).map_err(err)?,
                )),
                Version::V2_2 => Decoder::V22(Box::new(
                    KandinskyV22Pipeline::load(dir, dtype, device).map_err(err)?,
                )),
            };
            decoder.core_mut().cancel = self.cancel.clone();
            decoder.core_mut().preview = self.preview.clone();
            decoder.core_mut().interrupt = self.interrupt.clone();
            self.decoder = Some(decoder);
        }
        Ok(self.decoder.as_mut().expect("loaded above"))
    }

    /// `(image_embeds, negative_image_embeds)` of the mode's prior stage.
    fn prior_stage(
        &mut self,
        mode: &Mode,
        params: &GenerationParams,
        generator: &mut TorchGenerator,
        progress: Progress,
    ) -> Result<PriorOutput> {
        let prior_params = PriorParams {
            steps: params.prior_steps,
            guidance_scale: params.prior_guidance,
            num_images_per_prompt: params.num_images,
        };
        let prior = self.prior()?;
        let bar = &mut |i, n| progress(Stage::Prior, i, n);
        let text = |p: &Prompt,
                    latents: &Option<Tensor>,
                    generator: &mut TorchGenerator,
                    bar: &mut dyn FnMut(usize, usize)| {
            prior.call(
                std::slice::from_ref(&p.prompt),
                p.negative_prompt.as_deref(),
                prior_params,
                generator,
                latents.clone(),
                bar,
            )
        };
        let from_image = |p: &Prompt,
                          image: &Rgb8,
                          strength: f64,
                          generator: &mut TorchGenerator,
                          bar: &mut dyn FnMut(usize, usize)| {
            prior.emb2emb(
                std::slice::from_ref(&p.prompt),
                p.negative_prompt.as_deref(),
                image,
                strength,
                prior_params,
                generator,
                bar,
            )
        };
        match mode {
            Mode::TextToImage(TextToImage {
                prompt,
                prior_latents,
                ..
            })
            | Mode::Inpainting(Inpainting {
                prompt,
                prior_latents,
                ..
            })
            | Mode::Outpainting(Outpainting {
                prompt,
                prior_latents,
                ..
            }) => text(prompt, prior_latents, generator, bar),
            Mode::ImageToImage(m) => match m.prior_strength {
                Some(s) => from_image(&m.prompt, &m.image, s, generator, bar),
                None => text(&m.prompt, &m.prior_latents, generator, bar),
            },
            Mode::Controlnet(m) => match &m.image {
                Some(ControlnetImage {
                    image,
                    prior_strength: Some(s),
                    ..
                }) => from_image(&m.prompt, image, *s, generator, bar),
                _ => text(&m.prompt, &m.prior_latents, generator, bar),
            },
            Mode::Mixing(m) => prior.interpolate(&m.inputs, prior_params, "", None, generator, bar),
            Mode::Variations(m) => prior.interpolate(
                &[(MixInput::Image(m.image.clone()), 1.0)],
                prior_params,
                "",
                None,
                generator,
                bar,
            ),
        }
    }

    /// The decoded images `(B, 3, H, W)` in [-1, 1].
    fn decoder_stage(
        &mut self,
        mode: Mode,
        params: &GenerationParams,
        plan: Plan,
        (embeds, negative): &PriorOutput,
        generator: &mut TorchGenerator,
        progress: Progress,
    ) -> Result<Tensor> {
        let dp = DecoderParams {
            height: plan.height,
            width: plan.width,
            steps: params.steps,
            guidance_scale: params.guidance,
        };
        // `Class.from_config(model_scheduler.config)`: the model's betas, the keys the new class
        // takes, its own defaults for the rest. Set on every run: a kept decoder may hold the
        // previous request's.
        let scheduler = match params.scheduler {
            None => self.scheduler.clone(),
            Some(class) => with_class(&self.scheduler, class.class_name())?,
        };
        let device = self.options.device.clone();
        let scale_factor = self.info.scale_factor;
        let image = |image: &Rgb8| prepare_image(image, dp.width, dp.height, scale_factor, &device);
        let inpaint = |image: &Rgb8, mask: &Rgb8, latents| -> Result<Start> {
            let (mask, image) =
                prepare_mask_and_masked_image(image, mask, dp.width, dp.height, &device)?;
            Ok(Start::Inpaint {
                mask,
                image,
                latents,
            })
        };
        // As diffusers' combined pipelines: the 2.1 decoder's M-CLIP sees the prompt ("" for
        // mixing and variations), and its unconditional text is "" (a negative prompt acts
        // through the prior).
        let prompts = vec![mode.prompt().map_or(String::new(), |p| p.prompt.clone())];
        let start = match mode {
            Mode::TextToImage(TextToImage { latents, .. })
            | Mode::Mixing(Mixing { latents, .. })
            | Mode::Variations(Variations { latents, .. }) => Start::Noise(latents),
            Mode::ImageToImage(m) => Start::Image(image(&m.image)?, m.strength),
            Mode::Inpainting(m) => inpaint(&m.image, &m.mask, m.latents)?,
            Mode::Outpainting(m) => {
                let (canvas, mask) = extend_canvas(&m.image, m.margins);
                inpaint(&canvas, &mask, m.latents)?
            }
            Mode::Controlnet(m) => Start::Controlnet {
                // diffusers' hint block downsamples 8 times: image-sized under Kandinsky 2.2's
                // MoVQ (also 8), twice the image's size under our small model's (4).
                hint: prepare_hint(
                    &m.hint,
                    dp.width / scale_factor * HINT_BLOCK_FACTOR,
                    dp.height / scale_factor * HINT_BLOCK_FACTOR,
                    &device,
                )?,
                image: match &m.image {
                    Some(i) => Some((image(&i.image)?, i.strength)),
                    None => None,
                },
                latents: m.latents,
            },
        };
        let decoder = self.decoder()?;
        decoder.core_mut().scheduler = scheduler;
        let bar = &mut |i, n| progress(Stage::Decoder, i, n);
        match (&*decoder, start) {
            (Decoder::V21(d), Start::Noise(latents)) => d.call(
                &prompts, None, embeds, negative, dp, generator, latents, bar,
            ),
            (Decoder::V21(d), Start::Image(image, strength)) => d.img2img(
                &prompts, None, &image, embeds, negative, dp, strength, generator, bar,
            ),
            (
                Decoder::V21(d),
                Start::Inpaint {
                    mask,
                    image,
                    latents,
                },
            ) => d.inpaint(
                &prompts, None, &image, &mask, embeds, negative, dp, generator, latents, bar,
            ),
            (Decoder::V21(_), Start::Controlnet { .. }) => {
                unreachable!("ControlNet decoders are 2.2 (checked)")
            }
            (Decoder::V22(d), Start::Noise(latents)) => {
                d.call(embeds, negative, dp, generator, latents, bar)
            }
            (Decoder::V22(d), Start::Image(image, strength)) => {
                d.img2img(&image, embeds, negative, dp, strength, generator, bar)
            }
            (
                Decoder::V22(d),
                Start::Inpaint {
                    mask,
                    image,
                    latents,
                },
            ) => d.inpaint(&image, &mask, embeds, negative, dp, generator, latents, bar),
            (
                Decoder::V22(d),
                Start::Controlnet {
                    hint,
                    image,
                    latents,
                },
            ) => d.controlnet(
                &hint,
                image.as_ref().map(|(i, s)| (i, *s)),
                embeds,
                negative,
                dp,
                generator,
                latents,
                bar,
            ),
        }
    }
}

/// A mask blur is a finite σ ≥ 0 when given.
fn check_mask_blur(blur: Option<f64>) -> Result<()> {
    match blur {
        Some(b) if !(b.is_finite() && b >= 0.0) => Err(invalid(format!(
            "mask blur must be a finite number ≥ 0, got {b}"
        ))),
        _ => Ok(()),
    }
}

/// A load failure of a stage, saying which stage and where.
fn stage_error(stage: &str, dir: &Path, e: Error) -> Error {
    e.within(format!("loading the {stage} from {}", dir.display()))
}
