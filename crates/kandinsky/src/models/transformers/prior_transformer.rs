//! diffusers `models/transformers/prior_transformer.py`: `PriorTransformer`, the Kandinsky image
//! prior (a causal transformer that denoises a CLIP image embedding conditioned on CLIP text).

use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::models::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::models::nn::{attention_masked, LayerNorm, Linear};
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

/// `prior/config.json`. Field names and defaults are diffusers'; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PriorTransformerConfig {
    /// Heads.
    pub num_attention_heads: usize,
    /// Channels per head.
    pub attention_head_dim: usize,
    /// Transformer blocks.
    pub num_layers: usize,
    /// CLIP embedding width.
    pub embedding_dim: usize,
    /// Text tokens.
    pub num_embeddings: usize,
    /// Extra tokens (text embedding, time, noisy embedding, prd).
    pub additional_embeddings: usize,
    /// Must be `silu`.
    pub time_embed_act_fn: String,
    /// `null` or `layer`.
    pub norm_in_type: Option<String>,
    /// `null` or `layer`.
    pub embedding_proj_norm_type: Option<String>,
    /// `linear` or `null`.
    pub encoder_hid_proj_type: Option<String>,
    /// `prd` or `null`.
    pub added_emb_type: Option<String>,
    /// Default: heads × head dim.
    pub time_embed_dim: Option<usize>,
    /// Default: `embedding_dim`.
    pub embedding_proj_dim: Option<usize>,
    /// Default: `embedding_dim`.
    pub clip_embed_dim: Option<usize>,
}

impl Default for PriorTransformerConfig {
    /// diffusers' `PriorTransformer` defaults.
    fn default() -> Self {
        Self {
            num_attention_heads: 32,
            attention_head_dim: 64,
            num_layers: 20,
            embedding_dim: 768,
            num_embeddings: 77,
            additional_embeddings: 4,
            time_embed_act_fn: "silu".into(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: Some("linear".into()),
            added_emb_type: Some("prd".into()),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

/// `BasicTransformerBlock` as the prior configures it: self-attention and a GELU feed-forward,
/// each pre-LayerNorm with a residual.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: usize,
}

impl Block {
    fn new(w: &Weights, dim: usize, heads: usize) -> Result<Self> {
        let a = w.pp("attn1");
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            to_q: Linear::new(&a.pp("to_q"), dim, dim, true)?,
            to_k: Linear::new(&a.pp("to_k"), dim, dim, true)?,
            to_v: Linear::new(&a.pp("to_v"), dim, dim, true)?,
            to_out: Linear::new(&a.pp("to_out").pp(0), dim, dim, true)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff_in: Linear::new(&w.pp("ff").pp("net").pp(0).pp("proj"), dim, 4 * dim, true)?,
            ff_out: Linear::new(&w.pp("ff").pp("net").pp(2), 4 * dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let h = self.norm1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?)
        };
        let q = split(self.to_q.forward(&h)?)?;
        let k = split(self.to_k.forward(&h)?)?;
        let v = split(self.to_v.forward(&h)?)?;
        let o = attention_masked(&q, &k, &v, 1.0 / (hd as f64).sqrt(), mask)?;
        let x = (x + self
            .to_out
            .forward(&o.transpose(1, 2)?.reshape((b, n, c))?)?)?;
        let h = self.ff_out.forward(&crate::models::nn::gelu(
            &self.ff_in.forward(&self.norm3.forward(&x)?)?,
        )?)?;
        Ok((x + h)?)
    }
}

/// `PriorTransformer`.
#[derive(Debug, Clone)]
pub struct PriorTransformer {
    time_embedding: TimestepEmbedding,
    proj_in: Linear,
    embedding_proj_norm: Option<LayerNorm>,
    embedding_proj: Linear,
    encoder_hidden_states_proj: Option<Linear>,
    positional_embedding: Tensor,
    prd_embedding: Option<Tensor>,
    norm_in: Option<LayerNorm>,
    blocks: Vec<Block>,
    norm_out: LayerNorm,
    proj_to_clip_embeddings: Linear,
    clip_mean: Tensor,
    clip_std: Tensor,
    config: PriorTransformerConfig,
    /// Activation dtype (the weights' compute dtype).
    dtype: DType,
}

fn optional_layer_norm(
    w: &Weights,
    key: &str,
    value: &Option<String>,
    dim: usize,
) -> Result<Option<LayerNorm>> {
    match value.as_deref() {
        None => Ok(None),
        Some("layer") => Ok(Some(LayerNorm::new(w, dim, 1e-5)?)),
        Some(other) => Err(Error::unsupported(key, other)),
    }
}

impl PriorTransformer {
    /// Builds the prior, loading every tensor by its diffusers name.
    pub fn new(w: &Weights, c: &PriorTransformerConfig) -> Result<Self> {
        if c.time_embed_act_fn != "silu" {
            return Err(Error::unsupported(
                "time_embed_act_fn",
                &c.time_embed_act_fn,
            ));
        }
        let inner = c.num_attention_heads * c.attention_head_dim;
        let e = c.embedding_dim;
        let proj_dim = c.embedding_proj_dim.unwrap_or(e);
        let clip_dim = c.clip_embed_dim.unwrap_or(e);
        let encoder_hidden_states_proj = match c.encoder_hid_proj_type.as_deref() {
            None => None,
            Some("linear") => Some(Linear::new(
                &w.pp("encoder_hidden_states_proj"),
                e,
                inner,
                true,
            )?),
            Some(other) => return Err(Error::unsupported("encoder_hid_proj_type", other)),
        };
        let prd_embedding = match c.added_emb_type.as_deref() {
            None => None,
            Some("prd") => Some(w.get((1, 1, inner), "prd_embedding")?),
            Some(other) => return Err(Error::unsupported("added_emb_type", other)),
        };
        let blocks = (0..c.num_layers)
            .map(|i| {
                Block::new(
                    &w.pp("transformer_blocks").pp(i),
                    inner,
                    c.num_attention_heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dtype: w.dtype(),
            time_embedding: TimestepEmbedding::new(
                &w.pp("time_embedding"),
                inner,
                c.time_embed_dim.unwrap_or(inner),
                inner,
            )?,
            proj_in: Linear::new(&w.pp("proj_in"), e, inner, true)?,
            embedding_proj_norm: optional_layer_norm(
                &w.pp("embedding_proj_norm"),
                "embedding_proj_norm_type",
                &c.embedding_proj_norm_type,
                proj_dim,
            )?,
            embedding_proj: Linear::new(&w.pp("embedding_proj"), proj_dim, inner, true)?,
            encoder_hidden_states_proj,
            positional_embedding: w.get(
                (1, c.num_embeddings + c.additional_embeddings, inner),
                "positional_embedding",
            )?,
            prd_embedding,
            norm_in: optional_layer_norm(&w.pp("norm_in"), "norm_in_type", &c.norm_in_type, inner)?,
            blocks,
            norm_out: LayerNorm::new(&w.pp("norm_out"), inner, 1e-5)?,
            proj_to_clip_embeddings: Linear::new(
                &w.pp("proj_to_clip_embeddings"),
                inner,
                clip_dim,
                true,
            )?,
            // In f32, as the latents the pipeline post-processes.
            clip_mean: w.get((1, clip_dim), "clip_mean")?.to_dtype(DType::F32)?,
            clip_std: w.get((1, clip_dim), "clip_std")?.to_dtype(DType::F32)?,
            config: c.clone(),
        })
    }

    /// Loads a `prior/` component directory.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        let c: PriorTransformerConfig = crate::loading::read_json(&dir.join("config.json"))?;
        crate::loading::check_config_size(dir, |w| Self::new(w, &c))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &c)
    }

    /// The configuration.
    pub fn config(&self) -> &PriorTransformerConfig {
        &self.config
    }

    /// Predicts the (normalised) image embedding `(B, clip_dim)`.
    ///
    /// `hidden_states (B, E)`: the noisy embedding; `proj_embedding (B, E)`: CLIP `text_embeds`;
    /// `encoder_hidden_states (B, L, E)`: CLIP token states; `attention_mask (B, L)`: the tokenizer
    /// mask (1 = token). As in diffusers, the causal mask is applied only together with a text
    /// mask; without one no mask at all is used.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timestep: f64,
        proj_embedding: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = hidden_states.dim(0)?;
        self.forward_timesteps(
            hidden_states,
            &vec![timestep; b],
            proj_embedding,
            encoder_hidden_states,
            attention_mask,
        )
    }

    /// [`Self::forward`] with one timestep per sample (training).
    ///
    /// Inputs of any float dtype are cast to the model's compute dtype; the output is f32.
    pub fn forward_timesteps(
        &self,
        hidden_states: &Tensor,
        timesteps: &[f64],
        proj_embedding: &Tensor,
        encoder_hidden_states: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden_states = &hidden_states.to_dtype(self.dtype)?;
        let proj_embedding = &proj_embedding.to_dtype(self.dtype)?;
        let encoder_hidden_states = encoder_hidden_states
            .map(|t| t.to_dtype(self.dtype))
            .transpose()?;
        let encoder_hidden_states = encoder_hidden_states.as_ref();
        let b = hidden_states.dim(0)?;
        if timesteps.len() != b {
            return Err(Error::InvalidArgument(format!(
                "{} timesteps for a batch of {b}",
                timesteps.len()
            )));
        }
        let inner = self.positional_embedding.dim(2)?;
        let dtype = hidden_states.dtype();
        let t = timestep_embedding(timesteps, inner, true, 0.0, hidden_states.device())?
            .to_dtype(dtype)?;
        let time = self.time_embedding.forward(&t)?;
        let proj_embedding = match &self.embedding_proj_norm {
            Some(n) => n.forward(proj_embedding)?,
            None => proj_embedding.clone(),
        };
        let proj = self.embedding_proj.forward(&proj_embedding)?;
        let mut tokens = Vec::new();
        match (&self.encoder_hidden_states_proj, encoder_hidden_states) {
            (Some(p), Some(e)) => tokens.push(p.forward(e)?),
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "the prior needs encoder_hidden_states".into(),
                ))
            }
            (None, Some(e)) => tokens.push(e.clone()),
            (None, None) => {}
        }
        let text_len = tokens.first().map(|t| t.dim(1)).transpose()?.unwrap_or(0);
        tokens.push(proj.unsqueeze(1)?);
        tokens.push(time.unsqueeze(1)?);
        tokens.push(self.proj_in.forward(hidden_states)?.unsqueeze(1)?);
        if let Some(prd) = &self.prd_embedding {
            tokens.push(prd.broadcast_as((b, 1, inner))?.contiguous()?);
        }
        let h = Tensor::cat(&tokens, 1)?;
        let n = h.dim(1)?;
        let pos_len = self.positional_embedding.dim(1)?;
        if n != pos_len {
            return Err(Error::InvalidArgument(format!(
                "the prior expects {pos_len} tokens, got {n} (text length {text_len})"
            )));
        }
        let mut h = h.broadcast_add(&self.positional_embedding.to_dtype(dtype)?)?;
        let mask = match attention_mask {
            Some(m) => Some(self.prior_mask(m, n, dtype)?),
            None => None,
        };
        if let Some(norm) = &self.norm_in {
            h = norm.forward(&h)?;
        }
        for block in &self.blocks {
            h = block.forward(&h, mask.as_ref())?;
        }
        let h = self.norm_out.forward(&h)?;
        let h = if self.prd_embedding.is_some() {
            h.i((.., n - 1))?
        } else {
            return Err(Error::unsupported(
                "added_emb_type",
                "null (read-out of several tokens)",
            ));
        };
        Ok(self
            .proj_to_clip_embeddings
            .forward(&h)?
            .to_dtype(DType::F32)?)
    }

    /// `(1 - mask) · -10000` over the text keys (the extra tokens are never masked) plus the
    /// causal `-10000` above the diagonal, as `(B, 1, n, n)`.
    fn prior_mask(&self, mask: &Tensor, n: usize, dtype: DType) -> Result<Tensor> {
        let rows: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
        let b = rows.len();
        let mut v = vec![0f32; b * n * n];
        for (bi, row) in rows.iter().enumerate() {
            for i in 0..n {
                for j in 0..n {
                    let pad = row.get(j).map_or(0.0, |&m| (1.0 - m) * -10000.0);
                    let causal = if j > i { -10000.0 } else { 0.0 };
                    v[(bi * n + i) * n + j] = pad + causal;
                }
            }
        }
        Ok(Tensor::from_vec(v, (b, 1, n, n), mask.device())?.to_dtype(dtype)?)
    }

    /// `post_process_latents`: `x · clip_std + clip_mean`.
    pub fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(latents
            .broadcast_mul(&self.clip_std)?
            .broadcast_add(&self.clip_mean)?)
    }
}
