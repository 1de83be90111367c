//! diffusers `pipelines/kandinsky/pipeline_kandinsky_prior.py` (and its 2.2 copy
//! `kandinsky2_2/pipeline_kandinsky2_2_prior.py`, identical in what it computes): text → CLIP
//! image embedding with the diffusion prior, plus the zero-image negative embedding.

use crate::clip_image_processor::ClipImageProcessor;
use crate::error::{Error, Result};
use crate::loading::{cache, component_dir, WeightStore};
use crate::models::clip::{ClipTextModelWithProjection, ClipVisionModelWithProjection};
use crate::models::transformers::prior_transformer::PriorTransformer;
use crate::pipelines::{
    check_cancelled, check_strength, get_timesteps, prepare_latents, CancelFlag,
};
use crate::schedulers::{from_config, SchedulerConfig};
use crate::tokenization::PromptTokenizer;
use crate::utils::torch_utils::TorchGenerator;
use crate::vae_image_processor::Rgb8;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The prior pipeline's components (a `*-prior` model directory).
pub struct KandinskyPriorPipeline {
    prior: PriorTransformer,
    text_encoder: ClipTextModelWithProjection,
    tokenizer: PromptTokenizer,
    image_encoder: LazyImageEncoder,
    image_processor: ClipImageProcessor,
    scheduler: SchedulerConfig,
    device: Device,
    cancel: Option<CancelFlag>,
}

/// The image encoder, loaded on first use: text-to-image needs only its zero-image embedding,
/// which the disk cache usually holds.
struct LazyImageEncoder {
    dir: PathBuf,
    dtype: DType,
    device: Device,
    model: OnceLock<ClipVisionModelWithProjection>,
}

impl LazyImageEncoder {
    fn get(&self) -> Result<&ClipVisionModelWithProjection> {
        if let Some(m) = self.model.get() {
            return Ok(m);
        }
        let m = ClipVisionModelWithProjection::load(&self.dir, self.dtype, &self.device)?;
        Ok(self.model.get_or_init(|| m))
    }

    /// The cache key: the encoder's weights and config, and the compute dtype.
    fn zero_key(&self) -> Result<String> {
        let mut files = WeightStore::from_dir(&self.dir)?.paths();
        files.push(self.dir.join("config.json"));
        cache::content_key(&files, &format!("zero_image_embeds-{:?}", self.dtype))
    }

    fn zero_image_embeds(&self) -> Result<Tensor> {
        if let Some(m) = self.model.get() {
            return m.zero_image_embeds();
        }
        let key = self.zero_key().ok();
        if let Some(t) = key
            .as_deref()
            .and_then(|k| cache::load_tensor(k, &self.device))
        {
            return Ok(t);
        }
        let t = self.get()?.zero_image_embeds()?;
        if let Some(k) = &key {
            // A cache that cannot be written costs only the recomputation next time.
            let _ = cache::store_tensor(k, &t);
        }
        Ok(t)
    }
}

/// One input of [`KandinskyPriorPipeline::interpolate`].
#[derive(Debug, Clone)]
pub enum MixInput {
    /// A prompt: its embedding is sampled with the prior.
    Text(String),
    /// An image: its CLIP image embedding.
    Image(Rgb8),
}

/// The inputs of [`KandinskyPriorPipeline::interpolate`]: at least one, every weight finite.
pub(crate) fn check_mix_inputs(inputs: &[(MixInput, f64)]) -> Result<()> {
    if inputs.is_empty() {
        return Err(Error::InvalidArgument("nothing to mix".into()));
    }
    if let Some((_, weight)) = inputs.iter().find(|(_, w)| !w.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "mixing weight {weight} is not finite"
        )));
    }
    Ok(())
}

/// `(image_embeds, negative_image_embeds)`, each `(B, E)`.
pub type PriorOutput = (Tensor, Tensor);

/// Sampling settings of a prior call (diffusers' defaults: 25 steps, guidance 4).
#[derive(Debug, Clone, Copy)]
pub struct PriorParams {
    /// Inference steps.
    pub steps: usize,
    /// Classifier-free guidance scale (enabled when > 1).
    pub guidance_scale: f64,
    /// Images per prompt.
    pub num_images_per_prompt: usize,
}

impl Default for PriorParams {
    fn default() -> Self {
        Self {
            steps: 25,
            guidance_scale: 4.0,
            num_images_per_prompt: 1,
        }
    }
}

impl KandinskyPriorPipeline {
    /// Loads a prior model directory (`prior/`, `text_encoder/`, `tokenizer/`, `image_encoder/`,
    /// `scheduler/`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            prior: PriorTransformer::load(&component_dir(dir, "prior")?, dtype, device)?,
            text_encoder: ClipTextModelWithProjection::load(
                &component_dir(dir, "text_encoder")?,
                dtype,
                device,
            )?,
            tokenizer: PromptTokenizer::clip_from_dir(&component_dir(dir, "tokenizer")?)?,
            image_encoder: LazyImageEncoder {
                dir: component_dir(dir, "image_encoder")?,
                dtype,
                device: device.clone(),
                model: OnceLock::new(),
            },
            image_processor: {
                let p = dir.join("image_processor").join("preprocessor_config.json");
                if p.is_file() {
                    ClipImageProcessor::load(&p)?
                } else {
                    ClipImageProcessor::default()
                }
            },
            scheduler: SchedulerConfig::load(
                &component_dir(dir, "scheduler")?.join("scheduler_config.json"),
            )?,
            device: device.clone(),
            cancel: None,
        })
    }

    /// A flag that, once set, stops the next sampling step with [`Error::Cancelled`].
    pub fn set_cancel_flag(&mut self, flag: CancelFlag) {
        self.cancel = Some(flag);
    }

    /// The CLIP image encoder (for variations and mixing), loaded on first use.
    pub fn image_encoder(&self) -> Result<&ClipVisionModelWithProjection> {
        self.image_encoder.get()
    }

    /// Whether the image encoder has been loaded (a text-to-image run with a cached zero-image
    /// embedding never loads it).
    pub fn image_encoder_loaded(&self) -> bool {
        self.image_encoder.model.get().is_some()
    }

    /// The CLIP image embedding `(1, E)` of an RGB8 image, preprocessed as transformers does.
    pub fn embed_image(&self, width: usize, height: usize, rgb: &[u8]) -> Result<Tensor> {
        let pixels = self
            .image_processor
            .preprocess(width, height, rgb, &self.device)?
            .unsqueeze(0)?;
        Ok(self.image_encoder.get()?.forward(&pixels)?.image_embeds)
    }

    /// `interpolate`: the weighted sum (weights not normalised) of the embeddings of texts (each
    /// sampled with the prior, consuming `generator`) and images; the negative is the prior run
    /// on `negative_prompt` — its zero-image negative when that is `""`, as diffusers does (the
    /// run still draws from the generator). One embedding per image (`num_images_per_prompt`),
    /// as the 2.2 pipeline computes it.
    pub fn interpolate(
        &self,
        inputs: &[(MixInput, f64)],
        params: PriorParams,
        negative_prompt: &str,
        negative_prior_prompt: Option<&str>,
        generator: &mut TorchGenerator,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<PriorOutput> {
        check_mix_inputs(inputs)?;
        let n = params.num_images_per_prompt;
        let mut acc: Option<Tensor> = None;
        for (input, weight) in inputs {
            let emb = match input {
                MixInput::Text(t) => {
                    self.call(
                        std::slice::from_ref(t),
                        negative_prior_prompt,
                        params,
                        generator,
                        None,
                        progress,
                    )?
                    .0
                }
                MixInput::Image(image) => self
                    .embed_image(image.width, image.height, &image.data)?
                    .repeat((n, 1))?,
            };
            let emb = (emb * *weight)?;
            acc = Some(match acc {
                Some(a) => (a + emb)?,
                None => emb,
            });
        }
        let image_embeds = acc.expect("inputs is not empty");
        let zero = self.call(
            &[negative_prompt.to_string()],
            negative_prior_prompt,
            params,
            generator,
            None,
            progress,
        )?;
        let negative = if negative_prompt.is_empty() {
            zero.1
        } else {
            zero.0
        };
        Ok((image_embeds, negative))
    }

    /// `get_zero_embed(batch)`: the zero-image embedding repeated `batch` times. It comes from
    /// the on-disk cache (`loading::cache`) when the same image-encoder weights computed it
    /// before; otherwise the encoder is loaded, computes it, and the cache keeps it.
    pub fn zero_image_embeds(&self, batch: usize) -> Result<Tensor> {
        Ok(self.image_encoder.zero_image_embeds()?.repeat((batch, 1))?)
    }

    /// `_encode_prompt`: `(text_embeds, last_hidden_state, mask)` for `prompts`, each repeated
    /// `n` times; with CFG the unconditional rows (`""` or `negative`) come first.
    fn encode_prompt(
        &self,
        prompts: &[String],
        n: usize,
        cfg: bool,
        negative: Option<&[String]>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let encode = |texts: &[String]| -> Result<(Tensor, Tensor, Tensor)> {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tok = self.tokenizer.encode(&refs, &self.device)?;
            let out = self.text_encoder.forward(&tok.input_ids, None)?;
            let rep = |t: &Tensor| repeat_interleave(t, n);
            Ok((
                rep(&out.text_embeds)?,
                rep(&out.last_hidden_state)?,
                rep(&tok.attention_mask)?,
            ))
        };
        let (e, h, m) = encode(prompts)?;
        if !cfg {
            return Ok((e, h, m));
        }
        let uncond: Vec<String> = match negative {
            Some(neg) => neg.to_vec(),
            None => vec![String::new(); prompts.len()],
        };
        let (ue, uh, um) = encode(&uncond)?;
        Ok((
            Tensor::cat(&[ue, e], 0)?,
            Tensor::cat(&[uh, h], 0)?,
            Tensor::cat(&[um, m], 0)?,
        ))
    }

    /// `__call__`: samples image embeddings for `prompts`. With a negative prompt the negative
    /// embedding is the prior's sample for it; otherwise the zero-image embedding. `latents`, if
    /// given, replaces the initial noise `(B, E)`.
    pub fn call(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        params: PriorParams,
        generator: &mut TorchGenerator,
        latents: Option<Tensor>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<PriorOutput> {
        self.sample(
            prompts,
            negative_prompt,
            params,
            generator,
            PriorInit::Noise(latents),
            progress,
        )
    }

    /// The sampling loop of `__call__` and of the 2.2 `PriorEmb2EmbPipeline`.
    pub(crate) fn sample(
        &self,
        prompts: &[String],
        negative_prompt: Option<&str>,
        params: PriorParams,
        generator: &mut TorchGenerator,
        init: PriorInit,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<PriorOutput> {
        if params.num_images_per_prompt == 0 {
            return Err(Error::InvalidArgument(
                "the number of images must be at least 1".into(),
            ));
        }
        let mut all: Vec<String> = prompts.to_vec();
        let negatives: Option<Vec<String>> =
            negative_prompt.map(|n| vec![n.to_string(); 2 * prompts.len()]);
        if let Some(n) = negative_prompt {
            all.extend(std::iter::repeat_n(n.to_string(), prompts.len()));
        }
        let batch = all.len() * params.num_images_per_prompt;
        let cfg = params.guidance_scale > 1.0;
        let (embeds, hidden, mask) = self.encode_prompt(
            &all,
            params.num_images_per_prompt,
            cfg,
            negatives.as_deref(),
        )?;
        let mut scheduler = from_config(&self.scheduler)?;
        scheduler.set_timesteps(params.steps)?;
        let e = self.prior.config().embedding_dim;
        let mut ts = scheduler.timesteps().to_vec();
        let mut x = match init {
            PriorInit::Noise(latents) => {
                prepare_latents(&[batch, e], latents, generator, &self.device)?
            }
            PriorInit::Embedding { embeds, strength } => {
                check_strength("prior strength", strength)?;
                // `get_timesteps`, then the embedding (unnormalised, as diffusers) noised to the
                // first kept timestep.
                ts = get_timesteps(&ts, strength, "prior strength")?;
                let rows = embeds.dim(0)?;
                if rows == 0 || !batch.is_multiple_of(rows) {
                    return Err(Error::InvalidArgument(format!(
                        "{rows} image embeddings for a batch of {batch}"
                    )));
                }
                let start = embeds.repeat((batch / rows, 1))?;
                let noise = generator.randn(start.shape(), &self.device)?;
                scheduler.add_noise(&start, &noise, ts[0])?
            }
        }
        .to_dtype(embeds.dtype())?;
        for (i, &t) in ts.iter().enumerate() {
            check_cancelled(self.cancel.as_ref())?;
            let input = if cfg {
                Tensor::cat(&[&x, &x], 0)?
            } else {
                x.clone()
            };
            let pred = self
                .prior
                .forward(&input, t as f64, &embeds, Some(&hidden), Some(&mask))?;
            let pred = if cfg {
                let u = pred.narrow(0, 0, batch)?;
                let c = pred.narrow(0, batch, batch)?;
                (&u + ((c - &u)? * params.guidance_scale)?)?
            } else {
                pred
            };
            x = scheduler.step(&pred, t, &x, generator)?;
            progress(i + 1, ts.len());
        }
        let embeds = self.prior.post_process_latents(&x)?;
        match negative_prompt {
            None => {
                let zero = self.zero_image_embeds(batch)?;
                Ok((embeds, zero))
            }
            Some(_) => {
                let half = batch / 2;
                Ok((embeds.narrow(0, 0, half)?, embeds.narrow(0, half, half)?))
            }
        }
    }
}

/// Where the prior's sampling starts.
pub(crate) enum PriorInit {
    /// From `randn` (or the caller's latents).
    Noise(Option<Tensor>),
    /// From image embeddings `(k, E)` (repeated to the batch) noised to the timestep `strength`
    /// selects (2.2 emb2emb).
    Embedding {
        /// The CLIP image embeddings, one row per image (already repeated per image).
        embeds: Tensor,
        /// Fraction of the schedule to run, in (0, 1].
        strength: f64,
    },
}

/// `torch.repeat_interleave(t, n, dim=0)`.
pub(crate) fn repeat_interleave(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let mut rows = Vec::with_capacity(t.dim(0)? * n);
    for i in 0..t.dim(0)? {
        let row = t.narrow(0, i, 1)?;
        rows.extend(std::iter::repeat_n(row, n));
    }
    Ok(Tensor::cat(&rows, 0)?)
}
