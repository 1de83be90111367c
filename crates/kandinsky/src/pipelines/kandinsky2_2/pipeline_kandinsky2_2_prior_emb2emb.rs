//! diffusers `pipelines/kandinsky2_2/pipeline_kandinsky2_2_prior_emb2emb.py`:
//! `KandinskyV22PriorEmb2EmbPipeline`, the prior started from an image's CLIP embedding instead
//! of noise (works with the 2.1 prior too: the networks are the same kind).

use crate::error::Result;
use crate::pipelines::kandinsky::pipeline_kandinsky_prior::{
    repeat_interleave, KandinskyPriorPipeline, PriorInit, PriorOutput, PriorParams,
};
use crate::utils::torch_utils::TorchGenerator;
use crate::vae_image_processor::Rgb8;

impl KandinskyPriorPipeline {
    /// `__call__(prompt, image, strength)`: the CLIP image embedding of an image (repeated per
    /// image), noised to the timestep `strength` selects with the prior's scheduler, then denoised
    /// for the rest of the schedule with the prompt. As diffusers, the embedding goes in
    /// unnormalised although the prior samples in its normalised space (diffusers' defaults:
    /// strength 0.3, 25 steps, guidance 4).
    #[allow(clippy::too_many_arguments)]
    pub fn emb2emb(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        image: &Rgb8,
        strength: f64,
        params: PriorParams,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<PriorOutput> {
        let embeds = self.embed_image(image.width, image.height, &image.data)?;
        let embeds = repeat_interleave(&embeds, params.num_images_per_prompt)?;
        self.sample(
            prompts,
            negative_prompt,
            params,
            generator,
            PriorInit::Embedding { embeds, strength },
            progress,
        )
    }
}
