//! diffusers `pipelines/kandinsky/pipeline_kandinsky.py`: `KandinskyPipeline` (2.1 text-to-image
//! decoder): M-CLIP prompt encoding + image embedding → latent (UNet, DDIM) → image (MoVQ).

use super::text_encoder::MultilingualClip;
use crate::error::{Error, Result};
use crate::loading::component_dir;
use crate::models::{UNetConditioning, VQModel};
use crate::pipelines::decoder::{DecoderCore, DecoderParams, DecoderRun, Init};
use crate::pipelines::CancelFlag;
use crate::schedulers::SchedulerConfig;
use crate::tokenization::PromptTokenizer;
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The 2.1 decoder pipeline's components (a `kandinsky-2-1` model directory).
pub struct KandinskyPipeline {
    text_encoder: MultilingualClip,
    tokenizer: PromptTokenizer,
    pub(crate) core: DecoderCore,
}

impl KandinskyPipeline {
    /// Loads `text_encoder/`, `tokenizer/`, `unet/`, `movq/` and `scheduler/`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            text_encoder: MultilingualClip::load(
                &component_dir(dir, "text_encoder")?,
                dtype,
                device,
            )?,
            tokenizer: PromptTokenizer::xlm_roberta_from_dir(&component_dir(dir, "tokenizer")?)?,
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

    /// Replaces the scheduler configuration.
    pub fn set_scheduler(&mut self, config: SchedulerConfig) {
        self.core.scheduler = config;
    }

    /// A flag that, once set, stops the next denoising step with [`Error::Cancelled`].
    pub fn set_cancel_flag(&mut self, flag: CancelFlag) {
        self.core.cancel = Some(flag);
    }

    /// `_encode_prompt`: `(prompt_embeds, hidden_states)`, unconditional rows first under CFG.
    fn encode_prompt(
        &self,
        prompts: &[String],
        cfg: bool,
        negative: Option<&str>,
    ) -> Result<(Tensor, Tensor)> {
        let encode = |texts: &[String]| -> Result<(Tensor, Tensor)> {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tok = self.tokenizer.encode(&refs, &self.core.device)?;
            self.text_encoder
                .forward(&tok.input_ids, &tok.attention_mask)
        };
        let (e, h) = encode(prompts)?;
        if !cfg {
            return Ok((e, h));
        }
        let uncond = vec![negative.unwrap_or("").to_string(); prompts.len()];
        let (ue, uh) = encode(&uncond)?;
        Ok((Tensor::cat(&[ue, e], 0)?, Tensor::cat(&[uh, h], 0)?))
    }

    /// `KandinskyImg2ImgPipeline.__call__`: as [`Self::call`], starting from `image (1, 3, H, W)`
    /// in [-1, 1] encoded with the MoVQ and noised with the 2.1 pipeline's own schedule (diffusers'
    /// defaults: strength 0.3, guidance 7).
    #[allow(clippy::too_many_arguments)]
    pub fn img2img(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        image: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        strength: f64,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let x = self.img2img_latents(
            prompts,
            negative_prompt,
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
        prompts: &[String],
        negative_prompt: Option<&str>,
        image: &Tensor,
        image_embeds: &Tensor,
        negative_image_embeds: &Tensor,
        params: DecoderParams,
        strength: f64,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let init = self.core.image_init(image, b, strength, true)?;
        let run = DecoderRun::new((image_embeds, negative_image_embeds), params, init);
        self.latents((prompts, negative_prompt), run, generator, progress)
    }

    /// `__call__` up to the decoded image `(B, 3, H, W)` in [-1, 1]. `prompts` has one entry per
    /// image embedding (the combined pipeline repeats the prompt to the batch).
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
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
        self.run((prompts, negative_prompt), run, generator, progress)
    }

    /// The decoder run of every 2.1 mode: the M-CLIP encoding of `(prompts, negative_prompt)`
    /// joins the image embeddings as the UNet's condition.
    pub(crate) fn run(
        &self,
        text: (&[String], Option<&str>),
        run: DecoderRun,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let x = self.latents(text, run, generator, progress)?;
        self.core.movq.decode(&x, true)
    }

    /// [`Self::run`] up to the final latents.
    fn latents(
        &self,
        (prompts, negative_prompt): (&[String], Option<&str>),
        run: DecoderRun,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let b = run.batch()?;
        if prompts.is_empty() || b % prompts.len() != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} prompts for {b} image embeddings",
                prompts.len()
            )));
        }
        let prompts: Vec<String> = prompts.iter().cycle().take(b).cloned().collect();
        let cfg = run.params.guidance_scale > 1.0;
        let (text_embeds, hidden) = self.encode_prompt(&prompts, cfg, negative_prompt)?;
        let image = run.image_condition()?;
        let cond = UNetConditioning {
            image_embeds: Some(&image),
            text_embeds: Some(&text_embeds),
            encoder_hidden_states: Some(&hidden),
            hint: None,
        };
        self.core.denoise(&cond, run, generator, progress)
    }
}
