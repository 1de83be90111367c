//! Stage (a): a small CLIP (text and vision towers) trained contrastively on English and Russian
//! captions of the synthetic world (symmetric InfoNCE with a learned temperature, as CLIP). The
//! towers are diffusers/transformers' `CLIPTextModelWithProjection` and
//! `CLIPVisionModelWithProjection`, so the prior pipeline loads them unchanged.

use super::checkpoint;
use super::shapes::{caption_sample, grouped_example, planar_batch, training_examples, Example};
use super::tokenizer::reduce_clip_vocabulary;
use super::trainer::{parse_config, run_loop, TrainOptions, TrainReport};
use candle_core::{DType, Device, Tensor, D};
use kandinsky::error::{Error, Result};
use kandinsky::loading::{ParamStore, Weights};
use kandinsky::models::clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
};
use std::path::PathBuf;

/// The text tower: the real CLIP BPE vocabulary (byte-level, so Russian works), 64 wide, 3 layers;
/// [`train_clip`] reduces the vocabulary to the captions' tokens.
pub const SMALL_CLIP_TEXT_CONFIG: &str = r#"{
  "architectures": ["CLIPTextModelWithProjection"],
  "model_type": "clip_text_model",
  "vocab_size": 49408,
  "hidden_size": 64,
  "intermediate_size": 256,
  "projection_dim": 64,
  "num_hidden_layers": 3,
  "num_attention_heads": 4,
  "max_position_embeddings": 77,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05,
  "bos_token_id": 49406,
  "eos_token_id": 49407,
  "pad_token_id": 49407
}"#;

/// The vision tower: 64×64 images in 8×8 patches, 64 wide, 3 layers.
pub const SMALL_CLIP_VISION_CONFIG: &str = r#"{
  "architectures": ["CLIPVisionModelWithProjection"],
  "model_type": "clip_vision_model",
  "hidden_size": 64,
  "intermediate_size": 256,
  "projection_dim": 64,
  "num_hidden_layers": 3,
  "num_attention_heads": 4,
  "num_channels": 3,
  "image_size": 64,
  "patch_size": 8,
  "hidden_act": "quick_gelu",
  "layer_norm_eps": 1e-05
}"#;

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Examples per colour group in a contrastive batch (see [`grouped_example`]).
pub const CLIP_GROUP: u64 = 8;

/// Synthetic images as CLIP pixel values `(B, 3, S, S)` (`/255`, CLIP mean/std) and their
/// captions: examples `first..first + batch`.
pub fn clip_batch(
    seed: u64,
    first: u64,
    batch: usize,
    side: usize,
) -> Result<(Tensor, Vec<String>)> {
    pixels_and_captions(training_examples(seed, first, batch, side), side)
}

/// The examples as CLIP pixel values and their captions.
fn pixels_and_captions(examples: Vec<Example>, side: usize) -> Result<(Tensor, Vec<String>)> {
    Ok((
        clip_pixels(&examples, side)?,
        examples.into_iter().map(|e| e.caption).collect(),
    ))
}

/// The examples' images as CLIP pixel values (`/255`, CLIP mean/std), `(B, 3, S, S)`.
pub fn clip_pixels(examples: &[Example], side: usize) -> Result<Tensor> {
    planar_batch(examples, side, |c, v| {
        (v as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
    })
}

/// The name of the vision tower's position embeddings in the CLIP training store.
const VISION_POSITIONS: &str = "vision.vision_model.embeddings.position_embedding.weight";

/// The vision tower's starting position embeddings: for the patch at grid cell `(y, x)`, sines
/// and cosines of `y` (first half of the width) and of `x` (second half) at frequencies from
/// π/grid (whose cosine is one monotone ramp across the image) up to π; for the class token, those
/// of the off-grid cell `(-1, -1)`. With random starting embeddings CLIP still told positions
/// apart at chance after 2,000 steps, and after 3,000 it only knew `x − y` (left read as bottom,
/// right as top); a 2-D layout from the start makes "which axis" free to learn. The embeddings
/// stay trainable, as CLIP's.
pub fn patch_position_init(c: &ClipVisionConfig) -> Result<Tensor> {
    let grid = c.image_size / c.patch_size;
    let d = c.hidden_size;
    let quarter = d / 4;
    let omegas: Vec<f64> = (0..quarter)
        .map(|k| {
            let t = if quarter > 1 {
                k as f64 / (quarter - 1) as f64
            } else {
                0.0
            };
            std::f64::consts::PI / grid as f64 * (grid as f64).powf(t)
        })
        .collect();
    // A zero class-token row would leave that token constant (its embedding starts as all ones),
    // so `pre_layrnorm` would zero it and layer 0's queries and keys of it get no gradient.
    let cells = std::iter::once((-1.0, -1.0))
        .chain((0..grid * grid).map(|i| ((i / grid) as f64, (i % grid) as f64)));
    let mut data = vec![0f32; (1 + grid * grid) * d];
    for (row, (y, x)) in data.chunks_exact_mut(d).zip(cells) {
        for (k, omega) in omegas.iter().enumerate() {
            for (axis, v) in [(0, y), (1, x)] {
                let a = v * omega;
                row[axis * 2 * quarter + k] = a.sin() as f32;
                row[axis * 2 * quarter + quarter + k] = a.cos() as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (1 + grid * grid, d), &Device::Cpu)?)
}

/// The two towers and CLIP's learned temperature (`logit_scale`, not part of either tower's
/// state dict).
pub struct Clip {
    /// Text tower.
    pub text: ClipTextModelWithProjection,
    /// Vision tower.
    pub vision: ClipVisionModelWithProjection,
    /// `log(1/τ)`, initialised to log(1/0.07) as CLIP.
    pub logit_scale: Tensor,
}

impl Clip {
    /// Builds both towers (names prefixed `text.` / `vision.` in the store) and the temperature.
    pub fn new(
        params: &ParamStore,
        text: &ClipTextConfig,
        vision: &ClipVisionConfig,
    ) -> Result<Self> {
        params.init_if_absent(VISION_POSITIONS, patch_position_init(vision)?)?;
        let w = Weights::trainable(params);
        let logit_scale = w.get(1, "logit_scale")?;
        Ok(Self {
            text: ClipTextModelWithProjection::new(&w.pp("text"), text)?,
            vision: ClipVisionModelWithProjection::new(&w.pp("vision"), vision)?,
            // A vector named like a norm scale starts at 1; shift it to log(1/0.07).
            logit_scale: (logit_scale + ((1.0f64 / 0.07).ln() - 1.0))?,
        })
    }

    /// Symmetric InfoNCE of a batch; returns `(loss, accuracy of image→text retrieval)`.
    pub fn loss(&self, pixels: &Tensor, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let img = self.vision.forward(pixels)?.image_embeds;
        let txt = self.text.forward(ids, None)?.text_embeds;
        let norm = |t: &Tensor| -> Result<Tensor> {
            Ok(t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?)
        };
        let (img, txt) = (norm(&img)?, norm(&txt)?);
        let logits = img
            .matmul(&txt.t()?)?
            .broadcast_mul(&self.logit_scale.exp()?)?;
        let b = logits.dim(0)?;
        let targets = Tensor::arange(0u32, b as u32, logits.device())?;
        let ce =
            |l: &Tensor| -> Result<Tensor> { Ok(candle_nn::loss::cross_entropy(l, &targets)?) };
        let loss = ((ce(&logits)? + ce(&logits.t()?.contiguous()?)?)? * 0.5)?;
        let acc = logits
            .argmax(D::Minus1)?
            .eq(&targets)?
            .to_dtype(DType::F32)?
            .mean_all()?;
        Ok((loss, acc))
    }
}

/// Captions per scene and language the CLIP vocabulary is reduced to.
const VOCABULARY_CAPTIONS: usize = 8;

/// Trains (or resumes) the CLIP towers and exports `out_dir/text_encoder/` and
/// `out_dir/image_encoder/` (transformers layout, `model.safetensors`). The text tower's
/// vocabulary is the real CLIP BPE vocabulary of `vocabulary` (`vocab.json`, `merges.txt`)
/// reduced to the world's captions ([`reduce_clip_vocabulary`]), written to `out_dir/tokenizer/`
/// for the stages after it.
pub fn train_clip(
    opts: &TrainOptions,
    vocabulary: &std::path::Path,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    let tok_dir = opts.out_dir.join("tokenizer");
    let size = reduce_clip_vocabulary(vocabulary, &caption_sample(VOCABULARY_CAPTIONS), &tok_dir)
        .map_err(|e| {
        e.within(format!(
            "reducing the CLIP vocabulary {}",
            vocabulary.display()
        ))
    })?;
    let tokenizer = &super::prior::clip_tokenizer(&tok_dir)?;
    let mut text_value = parse_config(SMALL_CLIP_TEXT_CONFIG, "clip text")?;
    text_value["vocab_size"] = size.into();
    text_value["bos_token_id"] = (size - 2).into();
    text_value["eos_token_id"] = (size - 1).into();
    text_value["pad_token_id"] = (size - 1).into();
    let vision_value = parse_config(SMALL_CLIP_VISION_CONFIG, "clip vision")?;
    let json_err = |what: &str| {
        let path = PathBuf::from(format!("({what} config)"));
        move |source| Error::Json { path, source }
    };
    let text_cfg: ClipTextConfig =
        serde_json::from_value(text_value.clone()).map_err(json_err("clip text"))?;
    let vision_cfg: ClipVisionConfig =
        serde_json::from_value(vision_value.clone()).map_err(json_err("clip vision"))?;
    run_loop(
        opts,
        |params| Clip::new(params, &text_cfg, &vision_cfg),
        |clip, step| {
            let first = step * opts.batch as u64;
            let examples = (first..first + opts.batch as u64)
                .map(|i| grouped_example(opts.seed, i, opts.image_size, CLIP_GROUP))
                .collect();
            let (pixels, captions) = pixels_and_captions(examples, opts.image_size)?;
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            let tok = tokenizer.encode(&refs, &Device::Cpu)?;
            clip.loss(&pixels, &tok.input_ids)
        },
        |params| {
            let all = params.tensors();
            let part = |prefix: &str| {
                all.iter()
                    .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
                    .collect::<std::collections::HashMap<_, _>>()
            };
            checkpoint::export_component(
                &opts.out_dir.join("text_encoder"),
                &text_value,
                &part("text."),
                "model.safetensors",
            )?;
            checkpoint::export_component(
                &opts.out_dir.join("image_encoder"),
                &vision_value,
                &part("vision."),
                "model.safetensors",
            )
        },
        log,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_positions_start_two_dimensional() {
        let cfg: ClipVisionConfig = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
        let e = patch_position_init(&cfg).unwrap().to_vec2::<f32>().unwrap();
        let grid = cfg.image_size / cfg.patch_size;
        let half = cfg.hidden_size / 2;
        assert_eq!(e.len(), 1 + grid * grid);
        assert!(
            (1..e.len()).all(|i| e[i] != e[0]),
            "class token differs from every patch"
        );
        let cell = |y: usize, x: usize| &e[1 + y * grid + x];
        for y in 0..grid {
            for x in 0..grid {
                // The first half encodes the row only, the second the column only, so a transposed
                // cell (x, y) differs from (y, x) unless they are the same cell.
                assert_eq!(cell(y, x)[..half], cell(y, 0)[..half]);
                assert_eq!(cell(y, x)[half..], cell(0, x)[half..]);
                if x != y {
                    assert_ne!(cell(y, x), cell(x, y));
                }
            }
        }
        // The cosine of the lowest frequency is a monotone ramp along each axis.
        let quarter = half / 2;
        let ramp: Vec<f32> = (0..grid).map(|x| cell(0, x)[half + quarter]).collect();
        assert!(ramp.windows(2).all(|w| w[1] < w[0]), "{ramp:?}");
    }

    #[test]
    fn a_checkpoint_keeps_its_position_embeddings() {
        let name = VISION_POSITIONS;
        let trained = Tensor::full(0.5f32, (65, 64), &Device::Cpu).unwrap();
        let init = [(name.to_string(), trained)].into_iter().collect();
        let params = ParamStore::with_init(0, init, &Device::Cpu);
        let text: ClipTextConfig = serde_json::from_str(SMALL_CLIP_TEXT_CONFIG).unwrap();
        let vision: ClipVisionConfig = serde_json::from_str(SMALL_CLIP_VISION_CONFIG).unwrap();
        Clip::new(&params, &text, &vision).unwrap();
        let got = params.tensors()[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(got.iter().all(|&v| v == 0.5));
        let fresh = ParamStore::new(0, &Device::Cpu);
        Clip::new(&fresh, &text, &vision).unwrap();
        let got = fresh.tensors()[name].to_vec2::<f32>().unwrap();
        assert_eq!(
            got,
            patch_position_init(&vision)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
    }
}
