//! transformers `models/clip/modeling_clip.py`: `CLIPTextModelWithProjection` and
//! `CLIPVisionModelWithProjection`, the encoders of the Kandinsky prior pipelines.

use super::nn::{attention_masked, LayerNorm, Linear};
use crate::error::{Error, Result};
use crate::loading::Weights;
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Deserialize;

/// The activations transformers' CLIP configs name (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · σ(1.702 x)` (OpenAI CLIP, ViT-L/14).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP bigG).
    Gelu,
}

impl Activation {
    /// Parses `hidden_act`.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            other => Err(Error::unsupported("hidden_act", other)),
        }
    }

    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu => super::nn::quick_gelu(x)?,
            Self::Gelu => super::nn::gelu(x)?,
        })
    }
}

/// `CLIPTextConfig` (`text_encoder/config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Output width of `text_projection`.
    pub projection_dim: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Sequence length.
    pub max_position_embeddings: usize,
    /// `quick_gelu` or `gelu`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// End token id; 2 selects transformers' legacy pooling (argmax of the ids).
    pub eos_token_id: i64,
}

impl Default for ClipTextConfig {
    /// transformers' `CLIPTextConfig` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

/// `CLIPVisionConfig` (`image_encoder/config.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Output width of `visual_projection`.
    pub projection_dim: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Image channels.
    pub num_channels: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// `quick_gelu` or `gelu`.
    pub hidden_act: String,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    /// transformers' `CLIPVisionConfig` defaults.
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// Pre-LN transformer layer: `h += attn(ln1(h)); h += mlp(ln2(h))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    fn new(
        w: &Weights,
        dim: usize,
        mlp: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        let a = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(&w.pp("layer_norm1"), dim, eps)?,
            q_proj: Linear::new(&a.pp("q_proj"), dim, dim, true)?,
            k_proj: Linear::new(&a.pp("k_proj"), dim, dim, true)?,
            v_proj: Linear::new(&a.pp("v_proj"), dim, dim, true)?,
            out_proj: Linear::new(&a.pp("out_proj"), dim, dim, true)?,
            layer_norm2: LayerNorm::new(&w.pp("layer_norm2"), dim, eps)?,
            fc1: Linear::new(&w.pp("mlp").pp("fc1"), dim, mlp, true)?,
            fc2: Linear::new(&w.pp("mlp").pp("fc2"), mlp, dim, true)?,
            heads,
            act,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let h = self.layer_norm1.forward(x)?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?)
        };
        let q = split(self.q_proj.forward(&h)?)?;
        let k = split(self.k_proj.forward(&h)?)?;
        let v = split(self.v_proj.forward(&h)?)?;
        let o = attention_masked(&q, &k, &v, 1.0 / (hd as f64).sqrt(), mask)?;
        let o = o.transpose(1, 2)?.reshape((b, n, c))?;
        let x = (x + self.out_proj.forward(&o)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

fn encoder_layers(
    w: &Weights,
    n: usize,
    dim: usize,
    mlp: usize,
    heads: usize,
    eps: f64,
    act: Activation,
) -> Result<Vec<EncoderLayer>> {
    if heads == 0 || !dim.is_multiple_of(heads) {
        return Err(Error::unsupported(
            "num_attention_heads",
            format!("{heads} for width {dim}"),
        ));
    }
    (0..n)
        .map(|i| {
            EncoderLayer::new(
                &w.pp("encoder").pp("layers").pp(i),
                dim,
                mlp,
                heads,
                eps,
                act,
            )
        })
        .collect()
}

/// The outputs of [`ClipTextModelWithProjection::forward`].
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `text_embeds (B, projection_dim)`: the projected pooled token.
    pub text_embeds: Tensor,
    /// `last_hidden_state (B, L, hidden)`, after the final LayerNorm.
    pub last_hidden_state: Tensor,
}

/// `CLIPTextModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
    eos_token_id: i64,
}

impl ClipTextModelWithProjection {
    /// Builds the model; tensor names as in transformers (`text_model.*`, `text_projection`).
    pub fn new(w: &Weights, c: &ClipTextConfig) -> Result<Self> {
        let act = Activation::parse(&c.hidden_act)?;
        let t = w.pp("text_model");
        let e = t.pp("embeddings");
        Ok(Self {
            token_embedding: e
                .pp("token_embedding")
                .get((c.vocab_size, c.hidden_size), "weight")?,
            position_embedding: e
                .pp("position_embedding")
                .get((c.max_position_embeddings, c.hidden_size), "weight")?,
            layers: encoder_layers(
                &t,
                c.num_hidden_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                act,
            )?,
            final_layer_norm: LayerNorm::new(
                &t.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            text_projection: Linear::new(
                &w.pp("text_projection"),
                c.hidden_size,
                c.projection_dim,
                false,
            )?,
            eos_token_id: c.eos_token_id,
        })
    }

    /// Loads a `text_encoder/` component directory.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        let c: ClipTextConfig = crate::loading::read_json(&dir.join("config.json"))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &c)
    }

    /// Encodes token ids `(B, L)` (u32). `attention_mask (B, L)` (1 = token, 0 = padding) masks
    /// padded keys on top of the causal mask; the Kandinsky prior pipelines pass none.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClipTextOutput> {
        let (b, n) = input_ids.dims2()?;
        if n > self.position_embedding.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "{n} tokens exceed the text encoder's {} positions",
                self.position_embedding.dim(0)?
            )));
        }
        let device = input_ids.device();
        let tok = self
            .token_embedding
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, n, ()))?;
        let mut h = tok.broadcast_add(&self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?)?;
        let mask = additive_mask(b, n, true, attention_mask, h.dtype(), device)?;
        for layer in &self.layers {
            h = layer.forward(&h, Some(&mask))?;
        }
        let h = self.final_layer_norm.forward(&h)?;
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut pooled = Vec::with_capacity(b);
        for (i, row) in ids.iter().enumerate() {
            pooled.push(h.i((i, pooled_index(row, self.eos_token_id)))?);
        }
        let pooled = Tensor::stack(&pooled, 0)?;
        // Outputs in f32 whatever the compute dtype, as every model's.
        Ok(ClipTextOutput {
            text_embeds: self
                .text_projection
                .forward(&pooled)?
                .to_dtype(DType::F32)?,
            last_hidden_state: h.to_dtype(DType::F32)?,
        })
    }
}

/// The pooled position as transformers picks it: with the legacy `eos_token_id == 2` the first
/// maximum of the ids (the first `<|endoftext|>`, the largest id in the vocabulary), otherwise
/// the first occurrence of `eos_token_id` (0 if absent, like `argmax` of an all-zero row).
fn pooled_index(ids: &[u32], eos_token_id: i64) -> usize {
    if eos_token_id == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&v| v == max).unwrap_or(0)
    } else {
        ids.iter()
            .position(|&v| v as i64 == eos_token_id)
            .unwrap_or(0)
    }
}

/// `(B, 1, N, N)` additive mask: causal (`-inf` above the diagonal, as transformers' `sdpa` mask
/// does) and/or padded keys (`mask == 0`).
fn additive_mask(
    b: usize,
    n: usize,
    causal: bool,
    attention_mask: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let keep: Option<Vec<Vec<f32>>> = match attention_mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.to_vec2()?),
        None => None,
    };
    let mut v = vec![0f32; b * n * n];
    for bi in 0..b {
        for i in 0..n {
            for j in 0..n {
                let masked = (causal && j > i) || keep.as_ref().is_some_and(|k| k[bi][j] == 0.0);
                if masked {
                    v[(bi * n + i) * n + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, n, n), device)?.to_dtype(dtype)?)
}

/// The outputs of [`ClipVisionModelWithProjection::forward`].
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `image_embeds (B, projection_dim)` (not normalised).
    pub image_embeds: Tensor,
    /// `last_hidden_state (B, 1 + patches, hidden)`.
    pub last_hidden_state: Tensor,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
    zero_image_embeds: std::sync::Arc<std::sync::OnceLock<Tensor>>,
}

impl ClipVisionModelWithProjection {
    /// Builds the model; tensor names as in transformers (`vision_model.*`, `visual_projection`).
    pub fn new(w: &Weights, c: &ClipVisionConfig) -> Result<Self> {
        let act = Activation::parse(&c.hidden_act)?;
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(Error::unsupported(
                "patch_size",
                format!("{} for image_size {}", c.patch_size, c.image_size),
            ));
        }
        let v = w.pp("vision_model");
        let e = v.pp("embeddings");
        let d = c.hidden_size;
        let positions = (c.image_size / c.patch_size).pow(2) + 1;
        Ok(Self {
            class_embedding: e.get(d, "class_embedding")?,
            patch_embedding: e
                .pp("patch_embedding")
                .get((d, c.num_channels, c.patch_size, c.patch_size), "weight")?,
            position_embedding: e.pp("position_embedding").get((positions, d), "weight")?,
            pre_layrnorm: LayerNorm::new(&v.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            layers: encoder_layers(
                &v,
                c.num_hidden_layers,
                d,
                c.intermediate_size,
                c.num_attention_heads,
                c.layer_norm_eps,
                act,
            )?,
            post_layernorm: LayerNorm::new(&v.pp("post_layernorm"), d, c.layer_norm_eps)?,
            visual_projection: Linear::new(&w.pp("visual_projection"), d, c.projection_dim, false)?,
            config: c.clone(),
            zero_image_embeds: Default::default(),
        })
    }

    /// Loads an `image_encoder/` component directory.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        let c: ClipVisionConfig = crate::loading::read_json(&dir.join("config.json"))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &c)
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `image_embeds (1, projection_dim)` of an all-zero *normalised* image: the negative image
    /// embedding of every decoder call (diffusers' `zero_image_embed`). Computed on first use and
    /// cached for the model's lifetime.
    pub fn zero_image_embeds(&self) -> Result<Tensor> {
        if let Some(t) = self.zero_image_embeds.get() {
            return Ok(t.clone());
        }
        let s = self.config.image_size;
        let zeros = Tensor::zeros(
            (1, self.config.num_channels, s, s),
            self.patch_embedding.dtype(),
            self.patch_embedding.device(),
        )?;
        let embeds = self.forward(&zeros)?.image_embeds;
        Ok(self.zero_image_embeds.get_or_init(|| embeds).clone())
    }

    /// Encodes normalised pixels `(B, 3, S, S)` with `S = image_size`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let (b, _, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if (h, w) != (s, s) {
            return Err(Error::InvalidArgument(format!(
                "input image size {h}x{w} does not match the model's {s}x{s}"
            )));
        }
        let p = self.config.patch_size;
        let patches = pixel_values
            .to_dtype(self.patch_embedding.dtype())?
            .conv2d(&self.patch_embedding, 0, p, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.config.hidden_size;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls.contiguous()?, &patches.contiguous()?], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut h = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            h = layer.forward(&h, None)?;
        }
        let pooled = self.post_layernorm.forward(&h.i((.., 0))?)?;
        Ok(ClipVisionOutput {
            image_embeds: self
                .visual_projection
                .forward(&pooled)?
                .to_dtype(DType::F32)?,
            last_hidden_state: h.to_dtype(DType::F32)?,
        })
    }
}
