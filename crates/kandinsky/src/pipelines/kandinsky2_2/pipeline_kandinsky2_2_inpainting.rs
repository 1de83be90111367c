//! diffusers `pipelines/kandinsky2_2/pipeline_kandinsky2_2_inpainting.py`:
//! `KandinskyV22InpaintPipeline`. Masks are prepared as in 2.1
//! ([`crate::pipelines::decoder::prepare_mask_and_masked_image`]).

use super::pipeline_kandinsky2_2::KandinskyV22Pipeline;
use crate::error::Result;
use crate::pipelines::decoder::{DecoderParams, DecoderRun};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::Tensor;

impl KandinskyV22Pipeline {
    /// `KandinskyV22InpaintPipeline.__call__`: as the 2.1 inpainting (masked image latents and
    /// mask as extra UNet inputs), plus, after every step, the known region replaced by the image
    /// latents noised to the next timestep, and by the clean latents at the end.
    #[allow(clippy::too_many_arguments)]
    pub fn inpaint(
        &self,
        image: &Tensor,
        mask: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        // 2.2 re-imposes the known region after every step.
        let init = self.core.mask_init(image, mask, true, latents)?;
        let run = DecoderRun::new((image_embeds, negative_image_embeds), params, init);
        self.run(run, generator, progress)
    }
}
