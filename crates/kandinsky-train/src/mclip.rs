//! Stage (b): the M-CLIP text encoder (XLM-R + linear projection, diffusers' `MultilingualCLIP`)
//! distilled to the small CLIP's text embedding of the same caption (English and Russian), as
//! M-CLIP was distilled from CLIP. Its tokenizer is the real XLM-R vocabulary reduced to the
//! pieces the captions use ([`super::tokenizer`]).

use super::checkpoint;
use super::prior::{cosine, FrozenClip};
use super::shapes::training_example;
use super::tokenizer::{reduce_vocabulary, save_xlm_roberta, xlm_roberta_tokenizer};
use super::trainer::{run_loop, TrainOptions, TrainReport};
use candle_core::{Device, Tensor};
use kandinsky::error::{Error, Result};
use kandinsky::loading::Weights;
use kandinsky::pipelines::kandinsky::text_encoder::{MClipConfig, MultilingualClip};
use kandinsky::tokenization::PromptTokenizer;
use std::path::PathBuf;

/// The small M-CLIP config for a vocabulary of `vocab_size` pieces: 64 wide, 3 layers, projecting
/// to the 64-wide CLIP space.
pub fn small_mclip_config(vocab_size: usize) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["MultilingualCLIP"],
        "model_type": "M-CLIP",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "hidden_act": "gelu",
        "max_position_embeddings": 80,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-05,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "position_embedding_type": "absolute",
        "transformerDimensions": 64,
        "numDims": 64
    })
}

/// Weight of the token loss against the distillation MSE.
pub const TOKEN_LOSS_WEIGHT: f64 = 0.01;

/// The loss of a batch of captions: MSE between M-CLIP's and CLIP's text embeddings, plus
/// [`TOKEN_LOSS_WEIGHT`] × the cross-entropy of reading every real token back from its last
/// hidden state through the tied word embeddings; and the embeddings' mean cosine similarity.
///
/// The decoder UNet attends to M-CLIP's token states, not only to the pooled embedding. The real
/// M-CLIP's XLM-R was pretrained as a masked language model, so its token states carry the words;
/// distillation alone keeps only what CLIP's pooled embedding keeps, and the small CLIP's pooled
/// embedding dropped the position words (a linear probe read position at chance from the mean
/// token state), so the decoder could not learn where to draw. The tied read-out adds no
/// parameter to the exported model.
pub fn mclip_loss(
    mclip: &MultilingualClip,
    tokenizer: &PromptTokenizer,
    teacher: &FrozenClip,
    captions: &[String],
) -> Result<(Tensor, Tensor)> {
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let t = teacher.tokenizer.encode(&refs, &Device::Cpu)?;
    let target = teacher
        .text
        .forward(&t.input_ids, None)?
        .text_embeds
        .detach();
    let s = tokenizer.encode(&refs, &Device::Cpu)?;
    let (pred, hidden) = mclip.forward(&s.input_ids, &s.attention_mask)?;
    let cos = cosine(&pred.detach(), &target)?;
    let distill = (pred - target)?.sqr()?.mean_all()?;
    let (b, l, d) = hidden.dims3()?;
    let logits = hidden
        .reshape((b * l, d))?
        .matmul(&mclip.transformer().word_embeddings().t()?)?;
    // Padding positions are left out: the pipelines mask them everywhere.
    let mask = s
        .attention_mask
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?;
    let log_p = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
    let ids = s
        .input_ids
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?;
    let nll = log_p.gather(&ids.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
    let token = ((nll * &mask)?.sum_all()? / mask.sum_all()?)?;
    Ok(((distill + (token * TOKEN_LOSS_WEIGHT)?)?, cos))
}

/// Trains (or resumes) M-CLIP against a frozen CLIP and exports `out_dir/text_encoder/` and
/// `out_dir/tokenizer/`. `pieces` is the real XLM-R vocabulary (specials first, `<mask>` last).
pub fn train_mclip(
    opts: &TrainOptions,
    teacher: &FrozenClip,
    pieces: &[(String, f64)],
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    // The vocabulary: what 4,000 captions of the world use (a pure function of the grammar).
    let sample: Vec<String> = (0..4000)
        .map(|i| training_example(0, i, 8).caption)
        .collect();
    let vocab = reduce_vocabulary(pieces, &sample)?;
    let tok = xlm_roberta_tokenizer(vocab.clone())?;
    let tok_dir = opts.out_dir.join("tokenizer");
    save_xlm_roberta(&tok, &tok_dir)?;
    let tokenizer = PromptTokenizer::xlm_roberta_from_dir(&tok_dir)?;
    let value = small_mclip_config(vocab.len());
    let config: MClipConfig =
        serde_json::from_value(value.clone()).map_err(|source| Error::Json {
            path: PathBuf::from("(M-CLIP config)"),
            source,
        })?;
    run_loop(
        opts,
        |params| MultilingualClip::new(&Weights::trainable(params), &config),
        |mclip, step| {
            let captions: Vec<String> = (0..opts.batch as u64)
                .map(|i| training_example(opts.seed, step * opts.batch as u64 + i, 8).caption)
                .collect();
            mclip_loss(mclip, &tokenizer, teacher, &captions)
        },
        |params| {
            checkpoint::export_component(
                &opts.out_dir.join("text_encoder"),
                &value,
                &params.tensors(),
                "model.safetensors",
            )
        },
        log,
    )
}
