//! diffusers `pipelines/kandinsky2_2/pipeline_kandinsky2_2.py`: `KandinskyV22Pipeline`, image
//! embedding → latent (UNet, DDPM) → image (MoVQ); and `pipeline_kandinsky2_2_img2img.py`.

use crate::error::{Error, Result};
use crate::models::{UNetConditioning, VQModel};
use crate::pipelines::decoder::{latent_size, DecoderCore, DecoderParams, DecoderRun, Init};
use crate::pipelines::CancelFlag;
use crate::schedulers::SchedulerConfig;
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The decoder pipeline's components (a 2.2 decoder model directory).
pub struct KandinskyV22Pipeline {
    pub(crate) core: DecoderCore,
}

impl KandinskyV22Pipeline {
    /// Loads `unet/`, `movq/` and `scheduler/` of a decoder directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            core: DecoderCore::load(dir, dtype, device)?,
        })
    }

    /// Pixels per latent pixel of the MoVQ.
    pub fn scale_factor(&self) -> usize {
        self.core.movq.scale_factor()
    }

    /// The MoVQ (image ⇄ latent).
    pub fn movq(&self) -> &VQModel {
        &self.core.movq
    }

    /// Replaces the scheduler configuration (e.g. `--scheduler`).
    pub fn set_scheduler(&mut self, config: SchedulerConfig) {
        self.core.scheduler = config;
    }

    /// A flag that, once set, stops the next denoising step with [`Error::Cancelled`].
    pub fn set_cancel_flag(&mut self, flag: CancelFlag) {
        self.core.cancel = Some(flag);
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
        let run = DecoderRun::new(
            (image_embeds, negative_image_embeds),
            params,
            Init::Noise(latents),
        );
        self.run(run, generator, progress)
    }

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
        let x = self.img2img_latents(
            image,
            image_embeds,
            negative_image_embeds,
            params,
            strength,
            generator,
            progress,
        )?;
        self.core.movq.decode(&x, true)
    }

    /// As [`Self::img2img`], returning the final latents `(B, C, h, w)` undecoded (diffusers'
    /// `output_type="latent"`).
    #[allow(clippy::too_many_arguments)]
    pub fn img2img_latents(
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
        let init = self.core.image_init(image, b, strength, false)?;
        let run = DecoderRun::new((image_embeds, negative_image_embeds), params, init);
        self.latents(run, generator, progress)
    }

    /// The decoder run of every 2.2 mode; `run.hint` `(1 or B, 3, H, W)` in [0, 1] for
    /// ControlNet.
    pub(crate) fn run(
        &self,
        run: DecoderRun,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let x = self.latents(run, generator, progress)?;
        self.core.movq.decode(&x, true)
    }

    /// [`Self::run`] up to the final latents.
    fn latents(
        &self,
        run: DecoderRun,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = run.batch()?;
        let params = run.params;
        let cfg = params.guidance_scale > 1.0;
        let hint = match run.hint {
            Some(h) => {
                let f = self.scale_factor();
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
        let image = run.image_condition()?;
        let cond = UNetConditioning {
            image_embeds: Some(&image),
            hint: hint.as_ref(),
            ..Default::default()
        };
        self.core.denoise(&cond, run, generator, progress)
    }
}
