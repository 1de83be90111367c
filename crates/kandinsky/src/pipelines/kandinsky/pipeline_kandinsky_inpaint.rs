//! diffusers `pipelines/kandinsky/pipeline_kandinsky_inpaint.py`: `KandinskyInpaintPipeline`
//! (2.1 inpainting). Its mask handling, shared with 2.2, is in [`crate::pipelines::decoder`].

use super::pipeline_kandinsky::KandinskyPipeline;
use crate::error::Result;
use crate::pipelines::decoder::{DecoderParams, DecoderRun};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

impl KandinskyPipeline {
    /// `KandinskyInpaintPipeline.__call__`: `image (1, 3, H, W)` in [-1, 1] and its keep-mask
    /// `(1, 1, H, W)` from [`crate::pipelines::decoder::prepare_mask_and_masked_image`] (`latents` replaces the initial noise); the UNet (9 input channels) sees the
    /// masked image latents and the mask at every step. `H` and `W` must be multiples of the
    /// latent grid (64 for the real MoVQ).
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        image: &Tensor,
        mask: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        // 2.1 does not re-impose the known region after each step.
        let init = self.core.mask_init(image, mask, false, latents)?;
        let run = DecoderRun::new((image_embeds, negative_image_embeds), params, init);
        self.run((prompts, negative_prompt), run, generator, progress)
    }
}
