//! The decoder loop shared by the 2.1 and 2.2 decoder pipelines (diffusers keeps a copy in each
//! `pipeline_kandinsky*.py`): sampling settings, where the loop starts (noise, a noised image, an
//! inpainting mask), classifier-free guidance, known-region blending and the mask preparation.

use crate::clip_image_processor::{resize_rgb8_reducing_gap, Filter};
use crate::error::{Error, Result};
use crate::loading::component_dir;
use crate::models::{UNet2DConditionModel, UNetConditioning, VQModel};
use crate::pipelines::kandinsky::pipeline_kandinsky_prior::repeat_interleave;
use crate::pipelines::{
    check_cancelled, check_strength, get_timesteps, prepare_latents, CancelFlag, Preview,
};
use crate::schedulers::{from_config, SchedulerConfig};
use crate::utils::torch_utils::TorchGenerator;
use crate::vae_image_processor::{normalize, Rgb8};
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

/// One run of the decoder loop: the image embeddings it is conditioned on, its settings, where it
/// starts and (2.2 ControlNet) the hint.
pub(crate) struct DecoderRun<'a> {
    /// `(B, E)` image embeddings.
    pub image_embeds: &'a Tensor,
    /// `(B, E)` negative image embeddings (used under CFG).
    pub negative_image_embeds: &'a Tensor,
    /// Size, steps and guidance.
    pub params: DecoderParams,
    /// The start of the loop.
    pub init: Init,
    /// The ControlNet hint `(1 or B, 3, H, W)` in [0, 1].
    pub hint: Option<&'a Tensor>,
}

impl<'a> DecoderRun<'a> {
    /// A run without a hint.
    pub fn new(
        (image_embeds, negative_image_embeds): (&'a Tensor, &'a Tensor),
        params: DecoderParams,
        init: Init,
    ) -> Self {
        Self {
            image_embeds,
            negative_image_embeds,
            params,
            init,
            hint: None,
        }
    }

    /// The batch size (rows of the image embeddings).
    pub fn batch(&self) -> Result<usize> {
        Ok(self.image_embeds.dim(0)?)
    }

    /// The image embeddings as the UNet sees them: `[negative, positive]` under CFG.
    pub fn image_condition(&self) -> Result<Tensor> {
        Ok(if self.params.guidance_scale > 1.0 {
            Tensor::cat(&[self.negative_image_embeds, self.image_embeds], 0)?
        } else {
            self.image_embeds.clone()
        })
    }
}

/// What both decoder pipelines hold: the UNet, the MoVQ, the scheduler configuration.
pub(crate) struct DecoderCore {
    pub unet: UNet2DConditionModel,
    pub movq: VQModel,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub cancel: Option<CancelFlag>,
    /// Set: the loop stops before its next step and the current latents are decoded (A1111's
    /// interrupt), instead of failing as a cancel does.
    pub interrupt: Option<CancelFlag>,
    pub preview: Option<Preview>,
}

impl DecoderCore {
    /// Loads `unet/`, `movq/` and `scheduler/` of a decoder directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            unet: UNet2DConditionModel::load(&component_dir(dir, "unet")?, dtype, device)?,
            movq: VQModel::load(&component_dir(dir, "movq")?, dtype, device)?,
            scheduler: SchedulerConfig::load(
                &component_dir(dir, "scheduler")?.join("scheduler_config.json"),
            )?,
            device: device.clone(),
            cancel: None,
            interrupt: None,
            preview: None,
        })
    }

    /// The image-to-image start: `strength` checked, `image` encoded with the MoVQ and repeated
    /// to the batch `b`.
    pub fn image_init(
        &self,
        image: &Tensor,
        b: usize,
        strength: f64,
        q_sample_2_1: bool,
    ) -> Result<Init> {
        check_strength("strength", strength)?;
        let encoded = self.movq.encode(image)?;
        let latents = repeat_interleave(&encoded, b / encoded.dim(0)?.max(1))?;
        Ok(Init::Image {
            latents,
            strength,
            q_sample_2_1,
        })
    }

    /// The inpainting start: `image (1, 3, H, W)` in [-1, 1] encoded with the MoVQ; `mask
    /// (1, 1, H, W)` (1 = keep) resized to the latent (nearest) and eroded by [`prepare_mask`].
    pub fn mask_init(
        &self,
        image: &Tensor,
        mask: &Tensor,
        blend: bool,
        latents: Option<Tensor>,
    ) -> Result<Init> {
        let image_latents = self.movq.encode(image)?;
        let (_, _, h, w) = image_latents.dims4()?;
        let mask = crate::models::nn::interpolate_nearest(mask, h, w)?;
        let mask = prepare_mask(&mask)?;
        Ok(Init::Inpaint {
            image_latents,
            mask,
            blend,
            latents,
        })
    }

    /// Latents from the generator (or the caller), then for every timestep the UNet on `[x, x]`
    /// (CFG) or `x`, guidance, and a scheduler step. Returns the final latents `(b, C, h, w)`.
    pub(crate) fn denoise(
        &self,
        cond: &UNetConditioning,
        run: DecoderRun,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (b, params, device) = (run.batch()?, run.params, &self.device);
        let cfg = params.guidance_scale > 1.0;
        let mut scheduler = from_config(&self.scheduler)?;
        scheduler.set_timesteps(params.steps)?;
        let f = self.movq.scale_factor();
        let (h, w) = (latent_size(params.height, f), latent_size(params.width, f));
        let c = self.movq.latent_channels();
        let mut ts = scheduler.timesteps().to_vec();
        // Inpainting: (masked image latents, mask) for the UNet input, and what the 2.2 pipeline
        // re-imposes after each step (the image latents, the mask, the initial noise).
        let mut inpaint = None;
        // `latents * scheduler.init_noise_sigma` (1 except for the Euler schedulers).
        let sigma0 = scheduler.init_noise_sigma();
        let scaled =
            |x: Tensor| -> Result<Tensor> { Ok(if sigma0 == 1.0 { x } else { (x * sigma0)? }) };
        let mut x = match run.init {
            Init::Noise(latents) => {
                scaled(prepare_latents(&[b, c, h, w], latents, generator, device)?)?
            }
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
                let x = scaled(prepare_latents(&[b, c, h, w], latents, generator, device)?)?;
                let known = image_latents.repeat((b, 1, 1, 1))?;
                inpaint = Some((extra, blend.then(|| (known, mask, x.clone()))));
                x
            }
            Init::Image {
                latents,
                strength,
                q_sample_2_1,
            } => {
                ts = get_timesteps(&ts, strength, "strength")?;
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
            check_cancelled(self.cancel.as_ref())?;
            if self
                .interrupt
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
            {
                break;
            }
            // diffusers' Kandinsky pipelines skip `scale_model_input`, which only the Euler
            // schedulers need; without it their first input would be ~σ_max times too large.
            let xs = scheduler.scale_model_input(&x, t)?;
            let input = if cfg {
                Tensor::cat(&[&xs, &xs], 0)?
            } else {
                xs
            };
            let input = match &inpaint {
                Some((extra, _)) => Tensor::cat(&[&input, extra], 1)?,
                None => input,
            };
            let out = self
                .unet
                .forward(&input, scheduler.model_timestep(t), cond)?;
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
            if let Some(p) = &self.preview {
                if p.every > 0 && (i + 1) % p.every == 0 && i + 1 < ts.len() {
                    let image = self.movq.decode(&x.narrow(0, 0, 1)?, true)?;
                    if let Some(image) = crate::vae_image_processor::to_rgb8(&image)?.pop() {
                        (p.sink)(i + 1, ts.len(), image);
                    }
                }
            }
        }
        if let Some((_, Some((known, mask, _)))) = &inpaint {
            x = blend_known(&x, known, mask)?;
        }
        Ok(x)
    }
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

/// `prepare_mask_and_masked_image` for PIL inputs: the image resized to `width × height`
/// (Pillow bicubic, `reducing_gap=1`) as `(1, 3, H, W)` in [-1, 1], and the mask resized (Pillow
/// Lanczos), turned to luminance (`convert("L")`), `/255`, binarised at 0.5 and inverted to the
/// model's keep-mask `(1, 1, H, W)` (1 = keep). Returns `(mask, image)`. Image and mask must have
/// the same size. Mask convention of diffusers ≥ 0.19: white (1) = repaint, black (0) = keep.
pub fn prepare_mask_and_masked_image(
    image: &Rgb8,
    mask: &Rgb8,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    check_mask_size(image, mask)?;
    let resize = |img: &Rgb8, filter, gap| {
        resize_rgb8_reducing_gap(img.width, img.height, &img.data, width, height, filter, gap)
    };
    let rgb = resize(image, Filter::Bicubic, Some(1.0));
    let image = normalize(rgb, width, height, device)?;
    let keep: Vec<f32> = resize(mask, Filter::Lanczos, None)
        .chunks_exact(3)
        .map(|p| {
            if crate::vae_image_processor::pillow_luma(p) as f32 / 255.0 >= 0.5 {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(keep, (1, 1, height, width), device)?;
    Ok((mask, image))
}

/// An inpainting mask must have its image's size.
pub(crate) fn check_mask_size(image: &Rgb8, mask: &Rgb8) -> Result<()> {
    if (image.width, image.height) != (mask.width, mask.height) {
        return Err(Error::InvalidArgument(format!(
            "the mask is {}x{} but the image is {}x{}: they must have the same size",
            mask.width, mask.height, image.width, image.height
        )));
    }
    Ok(())
}

/// `prepare_mask`: erodes the keep region (1) of `(B, 1, h, w)` masks: every 0 clears its
/// neighbours above, left, above-left, below, right and below-right (6 of 8, read from the
/// original mask), growing the region to repaint by about one latent pixel.
pub fn prepare_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let old = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut new = old.clone();
    for plane in 0..b * c {
        let o = &old[plane * h * w..(plane + 1) * h * w];
        let n = &mut new[plane * h * w..(plane + 1) * h * w];
        for i in 0..h {
            for j in 0..w {
                if o[i * w + j] == 1.0 {
                    continue;
                }
                let mut clear = |y: usize, x: usize| n[y * w + x] = 0.0;
                if i != 0 {
                    clear(i - 1, j);
                }
                if j != 0 {
                    clear(i, j - 1);
                }
                if i != 0 && j != 0 {
                    clear(i - 1, j - 1);
                }
                if i + 1 != h {
                    clear(i + 1, j);
                }
                if j + 1 != w {
                    clear(i, j + 1);
                }
                if i + 1 != h && j + 1 != w {
                    clear(i + 1, j + 1);
                }
            }
        }
    }
    Ok(Tensor::from_vec(new, (b, c, h, w), mask.device())?.to_dtype(mask.dtype())?)
}
