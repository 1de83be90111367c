//! diffusers `pipelines/kandinsky2_2/pipeline_kandinsky2_2.py`: `KandinskyV22Pipeline`, image
//! embedding → latent (UNet, DDPM) → image (MoVQ).

use crate::error::{Error, Result};
use crate::loading::component_dir;
use crate::models::{UNet2DConditionModel, UNetConditioning, VQModel};
use crate::pipelines::kandinsky::pipeline_kandinsky_prior::repeat_interleave;
use crate::pipelines::prepare_latents;
use crate::schedulers::{from_config, SchedulerConfig};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// Sampling settings of a decoder call (diffusers' defaults: 512², 100 steps, guidance 4).
#[derive(Debug, Clone, Copy)]
pub struct DecoderParams {
    /// Requested image height (rounded up to a multiple of 64).
    pub height: usize,
    /// Requested image width (rounded up to a multiple of 64).
    pub width: usize,
    /// Inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale (enabled when > 1).
    pub guidance_scale: f64,
}

impl Default for DecoderParams {
    fn default() -> Self {
        Self {
            height: 512,
            width: 512,
            steps: 100,
            guidance_scale: 4.0,
        }
    }
}

/// `downscale_height_and_width(side, f)`: the latent side `ceil(side / f²) · f`, where
/// `f = 2^(levels - 1)` is the MoVQ's scale factor (8 for the real MoVQ: `ceil(side / 64) · 8`).
pub fn latent_size(side: usize, scale_factor: usize) -> usize {
    side.div_ceil(scale_factor * scale_factor) * scale_factor
}

/// The decoder pipeline's components (a 2.2 decoder model directory).
pub struct KandinskyV22Pipeline {
    unet: UNet2DConditionModel,
    movq: VQModel,
    scheduler: SchedulerConfig,
    device: Device,
}

impl KandinskyV22Pipeline {
    /// Loads `unet/`, `movq/` and `scheduler/` of a decoder directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            unet: UNet2DConditionModel::load(&component_dir(dir, "unet")?, dtype, device)?,
            movq: VQModel::load(&component_dir(dir, "movq")?, dtype, device)?,
            scheduler: SchedulerConfig::load(
                &component_dir(dir, "scheduler")?.join("scheduler_config.json"),
            )?,
            device: device.clone(),
        })
    }

    /// Pixels per latent pixel of the MoVQ.
    pub fn scale_factor(&self) -> usize {
        self.movq.scale_factor()
    }

    /// The MoVQ (image ⇄ latent).
    pub fn movq(&self) -> &VQModel {
        &self.movq
    }

    /// Replaces the scheduler configuration (e.g. `--scheduler`).
    pub fn set_scheduler(&mut self, config: SchedulerConfig) {
        self.scheduler = config;
    }

    /// `__call__` up to the decoded image: `(B, 3, H, W)` in [-1, 1] (before diffusers'
    /// `x·0.5 + 0.5` post-processing).
    pub fn call(
        &self,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.run(
            image_embeds,
            negative_image_embeds,
            params,
            generator,
            Init::Noise(latents),
            None,
            progress,
        )
    }

    /// The decoder run of every 2.2 mode; `hint (1 or B, 3, H, W)` in [0, 1] for ControlNet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        init: Init,
        hint: Option<&Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let cfg = params.guidance_scale > 1.0;
        let cond = if cfg {
            Tensor::cat(&[negative_image_embeds, image_embeds], 0)?
        } else {
            image_embeds.clone()
        };
        let hint = match hint {
            Some(h) => {
                let f = self.movq.scale_factor();
                let (hh, hw) = (
                    latent_size(params.height, f) * 8,
                    latent_size(params.width, f) * 8,
                );
                let (hb, hc, ih, iw) = h.dims4()?;
                if hc != 3 || (ih, iw) != (hh, hw) || (hb != 1 && hb != b) {
                    return Err(Error::InvalidArgument(format!(
                        "the hint must be (1 or {b}, 3, {hh}, {hw}) for a {}x{} image, found {:?}",
                        params.width,
                        params.height,
                        h.dims()
                    )));
                }
                let h = h.repeat((b / hb, 1, 1, 1))?;
                Some(if cfg { Tensor::cat(&[&h, &h], 0)? } else { h })
            }
            None => None,
        };
        let cond = UNetConditioning {
            image_embeds: Some(&cond),
            hint: hint.as_ref(),
            ..Default::default()
        };
        let x = denoise(
            &self.unet,
            &self.movq,
            &self.scheduler,
            &cond,
            b,
            params,
            generator,
            init,
            &self.device,
            progress,
        )?;
        self.movq.decode(&x, true)
    }
}

impl KandinskyV22Pipeline {
    /// `KandinskyV22Img2ImgPipeline.__call__`: `image (1, 3, H, W)` in [-1, 1] is encoded with the
    /// MoVQ, noised to the timestep `strength` selects, and denoised for the rest of the
    /// schedule (diffusers' defaults: strength 0.3, guidance 4).
    #[allow(clippy::too_many_arguments)]
    pub fn img2img(
        &self,
        image: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        strength: f64,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let init = Init::from_image(&self.movq, image, b, strength, false)?;
        self.run(
            image_embeds,
            negative_image_embeds,
            params,
            generator,
            init,
            None,
            progress,
        )
    }
}

/// Where the decoder loop starts.
pub(crate) enum Init {
    /// From noise (`randn`, or the caller's latents).
    Noise(Option<Tensor>),
    /// From an encoded image noised to the first timestep kept by `strength` (image-to-image).
    Image {
        /// `movq.encode(image)`, repeated to the batch.
        latents: Tensor,
        /// Fraction of the schedule to run, in (0, 1].
        strength: f64,
        /// The 2.1 pipeline's noising: timestep `int(1000 · strength) - 2` of a linear
        /// 1e-4…0.02 schedule (the original `q_sample`), not the scheduler's.
        q_sample_2_1: bool,
    },
    /// Inpainting: the UNet also sees the masked image latents and the mask (9 input channels).
    Inpaint {
        /// `movq.encode(image)`, `(1, C, h, w)`.
        image_latents: Tensor,
        /// The keep-mask at latent size after `prepare_mask`, `(1, 1, h, w)`: 1 = keep.
        mask: Tensor,
        /// The 2.2 pipeline's per-step re-imposition of the (noised) known region.
        blend: bool,
        /// The caller's initial latents instead of `randn`.
        latents: Option<Tensor>,
    },
}

impl Init {
    /// The image-to-image start: `strength` checked, `image` encoded with the MoVQ and repeated
    /// to the batch `b`.
    pub(crate) fn from_image(
        movq: &VQModel,
        image: &Tensor,
        b: usize,
        strength: f64,
        q_sample_2_1: bool,
    ) -> Result<Self> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "strength must be in (0, 1], got {strength}"
            )));
        }
        let encoded = movq.encode(image)?;
        let latents = repeat_interleave(&encoded, b / encoded.dim(0)?.max(1))?;
        Ok(Init::Image {
            latents,
            strength,
            q_sample_2_1,
        })
    }
}

impl Init {
    /// The inpainting start: `image (1, 3, H, W)` in [-1, 1] encoded with the MoVQ; `mask
    /// (1, 1, H, W)` (1 = keep) resized to the latent (nearest) and eroded by `prepare_mask`.
    pub(crate) fn from_mask(
        movq: &VQModel,
        image: &Tensor,
        mask: &Tensor,
        blend: bool,
        latents: Option<Tensor>,
    ) -> Result<Self> {
        let image_latents = movq.encode(image)?;
        let (_, _, h, w) = image_latents.dims4()?;
        let mask = crate::models::nn::interpolate_nearest(mask, h, w)?;
        let mask = crate::pipelines::kandinsky::pipeline_kandinsky_inpaint::prepare_mask(&mask)?;
        Ok(Init::Inpaint {
            image_latents,
            mask,
            blend,
            latents,
        })
    }
}

/// The decoder loop shared by the 2.1 and 2.2 pipelines: latents from the generator (or the
/// caller), then for every timestep the UNet on `[x, x]` (CFG) or `x`, guidance, and a scheduler
/// step. Returns the final latents `(b, C, h, w)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn denoise(
    unet: &UNet2DConditionModel,
    movq: &VQModel,
    scheduler: &SchedulerConfig,
    cond: &UNetConditioning,
    b: usize,
    params: DecoderParams,
    generator: &mut TorchGenerator,
    init: Init,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let cfg = params.guidance_scale > 1.0;
    let mut scheduler = from_config(scheduler)?;
    scheduler.set_timesteps(params.steps)?;
    let f = movq.scale_factor();
    let (h, w) = (latent_size(params.height, f), latent_size(params.width, f));
    let c = movq.latent_channels();
    let mut ts = scheduler.timesteps().to_vec();
    // Inpainting: (masked image latents, mask) for the UNet input, and what the 2.2 pipeline
    // re-imposes after each step (the image latents, the mask, the initial noise).
    let mut inpaint = None;
    let mut x = match init {
        Init::Noise(latents) => prepare_latents(&[b, c, h, w], latents, generator, device)?,
        Init::Inpaint {
            image_latents,
            mask,
            blend,
            latents,
        } => {
            let (_, _, lh, lw) = image_latents.dims4()?;
            if (lh, lw) != (h, w) {
                return Err(Error::InvalidArgument(format!(
                    "inpainting needs a width and height that are multiples of {}, got {}x{}",
                    f * f,
                    params.width,
                    params.height
                )));
            }
            let masked = image_latents.broadcast_mul(&mask)?;
            let reps = if cfg { 2 * b } else { b };
            let extra = Tensor::cat(
                &[
                    masked.repeat((reps, 1, 1, 1))?,
                    mask.repeat((reps, 1, 1, 1))?,
                ],
                1,
            )?;
            let x = prepare_latents(&[b, c, h, w], latents, generator, device)?;
            let known = image_latents.repeat((b, 1, 1, 1))?;
            inpaint = Some((extra, blend.then(|| (known, mask, x.clone()))));
            x
        }
        Init::Image {
            latents,
            strength,
            q_sample_2_1,
        } => {
            // `get_timesteps`: skip the first (1 - strength) of the schedule.
            let n = ts.len();
            let init_steps = ((n as f64 * strength) as usize).min(n);
            if init_steps == 0 {
                return Err(Error::InvalidArgument(format!(
                    "strength {strength} with {n} steps leaves no denoising step"
                )));
            }
            ts = ts[n - init_steps..].to_vec();
            let noise = generator.randn(latents.shape(), device)?;
            if q_sample_2_1 {
                let t = (1000.0 * strength) as i64 - 2;
                if t < 0 {
                    return Err(Error::InvalidArgument(format!(
                        "strength {strength} is too small"
                    )));
                }
                let betas = crate::schedulers::linspace_f32(1e-4, 0.02, 1000);
                let ac = crate::schedulers::alphas_cumprod(&betas);
                crate::schedulers::add_noise_with(&ac, &latents, &noise, t as usize)?
            } else {
                scheduler.add_noise(&latents, &noise, ts[0])?
            }
        }
    };
    for (i, &t) in ts.iter().enumerate() {
        let input = if cfg {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let input = match &inpaint {
            Some((extra, _)) => Tensor::cat(&[&input, extra], 1)?,
            None => input,
        };
        let out = unet.forward(&input, t as f64, cond)?;
        let out = guide(&out, c, b, cfg, params.guidance_scale)?;
        let out = if scheduler.uses_learned_variance() {
            out
        } else {
            out.narrow(1, 0, c)?
        };
        x = scheduler.step(&out, t, &x, generator)?;
        if let Some((_, Some((known, mask, noise)))) = &inpaint {
            let known = match ts.get(i + 1) {
                Some(&next) => scheduler.add_noise(known, noise, next)?,
                None => known.clone(),
            };
            x = blend_known(&x, &known, mask)?;
        }
        progress(i + 1, ts.len());
    }
    if let Some((_, Some((known, mask, _)))) = &inpaint {
        x = blend_known(&x, known, mask)?;
    }
    Ok(x)
}

/// `mask · known + (1 - mask) · x`.
fn blend_known(x: &Tensor, known: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let keep = known.broadcast_mul(mask)?;
    let inv = mask.affine(-1.0, 1.0)?;
    Ok((keep + x.broadcast_mul(&inv)?)?)
}

/// Classifier-free guidance on the ε channels; the variance channels of the conditional half.
pub(crate) fn guide(out: &Tensor, c: usize, b: usize, cfg: bool, g: f64) -> Result<Tensor> {
    if !cfg {
        return Ok(out.clone());
    }
    let eps = out.narrow(1, 0, c)?;
    let (u, t) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
    let guided = (&u + ((t - &u)? * g)?)?;
    let extra = out.dim(1)? - c;
    if extra == 0 {
        return Ok(guided);
    }
    let var_text = out.narrow(1, c, extra)?.narrow(0, b, b)?;
    Ok(Tensor::cat(&[guided, var_text], 1)?)
}
