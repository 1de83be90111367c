//! transformers `models/xlm_roberta/modeling_xlm_roberta.py`: `XLMRobertaModel`, the encoder of
//! the Kandinsky 2.1 M-CLIP text encoder (post-LN BERT with fairseq position ids).

use super::nn::{attention_masked, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::loading::Weights;
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// `XLMRobertaConfig` fields used by the model (transformers' defaults for the rest).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct XlmRobertaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Must be `gelu` (exact).
    pub hidden_act: String,
    /// Position table size.
    pub max_position_embeddings: usize,
    /// Token type table size.
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding id (also the position padding index).
    pub pad_token_id: u32,
    /// Must be `absolute`.
    pub position_embedding_type: String,
}

impl Default for XlmRobertaConfig {
    /// `xlm-roberta-base`'s settings: what each key omitted from `config.json` takes.
    fn default() -> Self {
        Self {
            vocab_size: 250002,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 514,
            type_vocab_size: 1,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            position_embedding_type: "absolute".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
}

impl Layer {
    fn new(w: &Weights, c: &XlmRobertaConfig) -> Result<Self> {
        let d = c.hidden_size;
        let a = w.pp("attention");
        Ok(Self {
            query: Linear::new(&a.pp("self").pp("query"), d, d, true)?,
            key: Linear::new(&a.pp("self").pp("key"), d, d, true)?,
            value: Linear::new(&a.pp("self").pp("value"), d, d, true)?,
            attn_out: Linear::new(&a.pp("output").pp("dense"), d, d, true)?,
            attn_norm: LayerNorm::new(&a.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
            intermediate: Linear::new(
                &w.pp("intermediate").pp("dense"),
                d,
                c.intermediate_size,
                true,
            )?,
            output: Linear::new(&w.pp("output").pp("dense"), c.intermediate_size, d, true)?,
            out_norm: LayerNorm::new(&w.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?)
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let o = attention_masked(&q, &k, &v, 1.0 / (hd as f64).sqrt(), Some(mask))?;
        let o = self
            .attn_out
            .forward(&o.transpose(1, 2)?.reshape((b, n, c))?)?;
        let x = self.attn_norm.forward(&(o + x)?)?;
        let h = self
            .output
            .forward(&super::nn::gelu(&self.intermediate.forward(&x)?)?)?;
        self.out_norm.forward(&(h + x)?)
    }
}

/// `XLMRobertaModel` (with its unused pooler, so the state dict loads completely).
#[derive(Debug, Clone)]
pub struct XlmRobertaModel {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<Layer>,
    pad_token_id: u32,
}

impl XlmRobertaModel {
    /// Builds the model under `w` (`embeddings.*`, `encoder.layer.*`, `pooler.*`).
    pub fn new(w: &Weights, c: &XlmRobertaConfig) -> Result<Self> {
        if c.hidden_act != "gelu" {
            return Err(Error::unsupported("hidden_act", &c.hidden_act));
        }
        if c.position_embedding_type != "absolute" {
            return Err(Error::unsupported(
                "position_embedding_type",
                &c.position_embedding_type,
            ));
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(Error::unsupported(
                "num_attention_heads",
                c.num_attention_heads,
            ));
        }
        let e = w.pp("embeddings");
        let d = c.hidden_size;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(&w.pp("encoder").pp("layer").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        // The pooler is part of the checkpoint but unused by M-CLIP; it is still loaded so that a
        // wrong checkpoint is caught by name and shape.
        Linear::new(&w.pp("pooler").pp("dense"), d, d, true)?;
        Ok(Self {
            word_embeddings: e.pp("word_embeddings").get((c.vocab_size, d), "weight")?,
            position_embeddings: e
                .pp("position_embeddings")
                .get((c.max_position_embeddings, d), "weight")?,
            token_type_embeddings: e
                .pp("token_type_embeddings")
                .get((c.type_vocab_size, d), "weight")?,
            embeddings_norm: LayerNorm::new(&e.pp("LayerNorm"), d, c.layer_norm_eps)?,
            layers,
            pad_token_id: c.pad_token_id,
        })
    }

    /// The token embedding matrix `(vocab_size, hidden)` (`embeddings.word_embeddings.weight`).
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings
    }

    /// `last_hidden_state (B, L, hidden)` for ids `(B, L)` and the tokenizer mask `(B, L)`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let device = input_ids.device();
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        // fairseq positions: padding_idx + cumsum(non-pad) on tokens, padding_idx on pads.
        let max_pos = self.position_embeddings.dim(0)?;
        let mut pos = Vec::with_capacity(b * n);
        for row in &ids {
            let mut count = 0u32;
            for &id in row {
                if id == self.pad_token_id {
                    pos.push(self.pad_token_id);
                } else {
                    count += 1;
                    pos.push(self.pad_token_id + count);
                }
            }
        }
        if let Some(&p) = pos.iter().max() {
            if p as usize >= max_pos {
                return Err(Error::InvalidArgument(format!(
                    "{n} tokens exceed the text encoder's positions"
                )));
            }
        }
        let pos = Tensor::from_vec(pos, (b * n,), device)?;
        let words = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?;
        let positions = self.position_embeddings.index_select(&pos, 0)?;
        let tt = self.token_type_embeddings.narrow(0, 0, 1)?;
        let h = (words + positions)?
            .broadcast_add(&tt)?
            .reshape((b, n, ()))?;
        let mut h = self.embeddings_norm.forward(&h)?;
        let keep: Vec<Vec<f32>> = attention_mask.to_dtype(DType::F32)?.to_vec2()?;
        let mask: Vec<f32> = keep
            .iter()
            .flat_map(|r| {
                r.iter()
                    .map(|&m| if m == 0.0 { f32::NEG_INFINITY } else { 0.0 })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, n), device)?.to_dtype(h.dtype())?;
        for layer in &self.layers {
            h = layer.forward(&h, &mask)?;
        }
        Ok(h)
    }
}
