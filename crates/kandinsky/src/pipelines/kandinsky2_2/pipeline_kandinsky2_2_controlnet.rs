//! diffusers `pipelines/kandinsky2_2/pipeline_kandinsky2_2_controlnet.py` and
//! `pipeline_kandinsky2_2_controlnet_img2img.py`: `KandinskyV22ControlnetPipeline` and
//! `KandinskyV22ControlnetImg2ImgPipeline` (a ControlNet-depth decoder: the UNet's `image_hint`
//! embedding reads a hint image, e.g. a depth map).

use super::pipeline_kandinsky2_2::KandinskyV22Pipeline;
use crate::error::{Error, Result};
use crate::pipelines::decoder::{DecoderParams, DecoderRun, Init};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

impl KandinskyV22Pipeline {
    /// `KandinskyV22ControlnetPipeline.__call__` with `hint (1 or B, 3, H, W)` in [0, 1], 8 pixels
    /// per latent pixel (the output size for the real MoVQ, `H`, `W` multiples of 64); with `image = Some((image,
    /// strength))` the ControlNet image-to-image pipeline (diffusers' default strength 0.3);
    /// `latents` replaces the initial noise of the text-to-image variant.
    #[allow(clippy::too_many_arguments)]
    pub fn controlnet(
        &self,
        hint: &Tensor,
        image: Option<(&Tensor, f64)>,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let init = match (image, latents) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "latents cannot be given for image-to-image (the start is the noised image)"
                        .into(),
                ))
            }
            (Some((image, strength)), None) => self.core.image_init(image, b, strength, false)?,
            (None, latents) => Init::Noise(latents),
        };
        let mut run = DecoderRun::new((image_embeds, negative_image_embeds), params, init);
        run.hint = Some(hint);
        self.run(run, generator, progress)
    }
}
