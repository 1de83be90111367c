//! diffusers `models/unets/unet_2d_condition.py`: `UNet2DConditionModel` as Kandinsky 2.1 / 2.2
//! configure it (SimpleCrossAttn blocks, scale-shift resnets, `text_image` / `image` /
//! `image_hint` addition embeddings, `text_image_proj` / `image_proj` hidden-state projections).

use super::unet_2d_blocks::{CrossAttnConfig, DownBlock, MidBlockSimpleCrossAttn, UpBlock};
use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::models::embeddings::{
    timestep_embedding, ImageProjection, ImageTimeEmbedding, TextImageProjection,
    TextImageTimeEmbedding, TimestepEmbedding,
};
use crate::models::nn::{check_act_fn, silu, Conv2d, GroupNorm};
use crate::models::resnet::{ResnetConfig, TimeEmbeddingNorm};
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// A config value that diffusers accepts as a scalar or as one value per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block.
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The values for `n` blocks; an error naming `key` when a list has the wrong length.
    pub fn expand(&self, key: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::unsupported(
                key,
                format!("{v:?} (expected {n} values, one per block)"),
            )),
        }
    }
}

/// `unet/config.json`. Field names and defaults are diffusers'; unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    /// Latent channels in (4 text-to-image, 8 ControlNet before the hint, 9 inpainting).
    pub in_channels: usize,
    /// Output channels (8: ε and learned variance).
    pub out_channels: usize,
    /// `center_input_sample`.
    pub center_input_sample: bool,
    /// `flip_sin_to_cos` of the timestep sinusoid.
    pub flip_sin_to_cos: bool,
    /// `freq_shift` of the timestep sinusoid.
    pub freq_shift: f64,
    /// Down block class names.
    pub down_block_types: Vec<String>,
    /// Mid block class name.
    pub mid_block_type: Option<String>,
    /// Up block class names.
    pub up_block_types: Vec<String>,
    /// `only_cross_attention`.
    pub only_cross_attention: PerBlock<bool>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// `mid_block_scale_factor` (the mid resnets' output scale).
    pub mid_block_scale_factor: f64,
    /// `act_fn`.
    pub act_fn: String,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of the resnets.
    pub norm_eps: f64,
    /// Width of the conditioning tokens.
    pub cross_attention_dim: PerBlock<usize>,
    /// Width of the hidden states fed to `encoder_hid_proj`.
    pub encoder_hid_dim: Option<usize>,
    /// `text_image_proj` (2.1) or `image_proj` (2.2).
    pub encoder_hid_dim_type: Option<String>,
    /// Channels per attention head (diffusers' name, used as such by SimpleCrossAttn blocks).
    pub attention_head_dim: PerBlock<Option<usize>>,
    /// Must be null (diffusers rejects it too).
    pub num_attention_heads: Option<serde_json::Value>,
    /// Must be null.
    pub class_embed_type: Option<String>,
    /// `text_image` (2.1), `image` (2.2), `image_hint` (2.2 ControlNet).
    pub addition_embed_type: Option<String>,
    /// `default` or `scale_shift`.
    pub resnet_time_scale_shift: String,
    /// `resnet_skip_time_act`.
    pub resnet_skip_time_act: bool,
    /// `resnet_out_scale_factor`.
    pub resnet_out_scale_factor: f64,
    /// Must be `positional`.
    pub time_embedding_type: String,
    /// Width of the time embedding; default `4 × block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    /// Must be null.
    pub time_embedding_act_fn: Option<String>,
    /// Must be null.
    pub timestep_post_act: Option<String>,
    /// Must be null.
    pub time_cond_proj_dim: Option<usize>,
    /// `conv_in` kernel size.
    pub conv_in_kernel: usize,
    /// `conv_out` kernel size.
    pub conv_out_kernel: usize,
    /// `mid_block_only_cross_attention`; null means `only_cross_attention` when that is a
    /// single bool, else false.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Must be null.
    pub cross_attention_norm: Option<String>,
    /// Latent side the model was trained at (`null` in diffusers' test dummies).
    pub sample_size: Option<usize>,
}

impl Default for UNet2DConditionConfig {
    /// diffusers' `UNet2DConditionModel` defaults.
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(Some(8)),
            num_attention_heads: None,
            class_embed_type: None,
            addition_embed_type: None,
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            sample_size: None,
        }
    }
}

impl UNet2DConditionConfig {
    /// Parses a `config.json` text.
    pub fn from_json(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads `config.json` from a component directory.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        crate::loading::read_json(&dir.join("config.json"))
    }
}

/// How the UNet is conditioned, decided by `addition_embed_type`.
#[derive(Debug, Clone)]
enum AddEmbedding {
    TextImage(TextImageTimeEmbedding),
    Image(ImageTimeEmbedding),
}

#[derive(Debug, Clone)]
enum HidProj {
    TextImage(TextImageProjection),
    Image(ImageProjection),
}

/// The conditioning of one UNet call (diffusers' `encoder_hidden_states` and
/// `added_cond_kwargs`).
#[derive(Debug, Clone, Copy, Default)]
pub struct UNetConditioning<'a> {
    /// `added_cond_kwargs["image_embeds"]`: the CLIP image embedding `(B, E)`.
    pub image_embeds: Option<&'a Tensor>,
    /// `added_cond_kwargs["text_embeds"]` (2.1): M-CLIP pooled embedding `(B, 768)`.
    pub text_embeds: Option<&'a Tensor>,
    /// `encoder_hidden_states` (2.1): M-CLIP token states `(B, L, 1024)`.
    pub encoder_hidden_states: Option<&'a Tensor>,
    /// `added_cond_kwargs["hint"]` (2.2 ControlNet): `(B, 3, H, W)` at pixel resolution.
    pub hint: Option<&'a Tensor>,
}

/// `UNet2DConditionModel` (Kandinsky variants).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: AddEmbedding,
    encoder_hid_proj: HidProj,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlockSimpleCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    /// Activation dtype (the weights' compute dtype).
    dtype: DType,
}

fn require<T>(v: Option<T>, key: &str, why: &str) -> Result<T> {
    v.ok_or_else(|| Error::unsupported(key, format!("null ({why})")))
}

fn must_be_none<T: std::fmt::Debug>(key: &str, v: &Option<T>) -> Result<()> {
    match v {
        None => Ok(()),
        Some(v) => Err(Error::unsupported(key, v)),
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet from its config, loading every tensor from `w` by its diffusers name.
    pub fn new(w: &Weights, config: &UNet2DConditionConfig) -> Result<Self> {
        let c = config;
        check_act_fn("act_fn", &c.act_fn)?;
        must_be_none("num_attention_heads", &c.num_attention_heads)?;
        must_be_none("class_embed_type", &c.class_embed_type)?;
        must_be_none("time_embedding_act_fn", &c.time_embedding_act_fn)?;
        must_be_none("timestep_post_act", &c.timestep_post_act)?;
        must_be_none("time_cond_proj_dim", &c.time_cond_proj_dim)?;
        must_be_none("cross_attention_norm", &c.cross_attention_norm)?;
        if c.time_embedding_type != "positional" {
            return Err(Error::unsupported(
                "time_embedding_type",
                &c.time_embedding_type,
            ));
        }
        for (key, k) in [
            ("conv_in_kernel", c.conv_in_kernel),
            ("conv_out_kernel", c.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(Error::unsupported(key, k));
            }
        }
        let n = c.block_out_channels.len();
        if n == 0 || c.down_block_types.len() != n || c.up_block_types.len() != n {
            return Err(Error::unsupported(
                "down_block_types/up_block_types",
                format!(
                    "{} down and {} up blocks for {} block_out_channels",
                    c.down_block_types.len(),
                    c.up_block_types.len(),
                    n
                ),
            ));
        }
        let layers = c.layers_per_block.expand("layers_per_block", n)?;
        let head_dims = c.attention_head_dim.expand("attention_head_dim", n)?;
        let cross_dims = c.cross_attention_dim.expand("cross_attention_dim", n)?;
        let only_cross = c.only_cross_attention.expand("only_cross_attention", n)?;
        let mid_only_cross = match (c.mid_block_only_cross_attention, &c.only_cross_attention) {
            (Some(v), _) => v,
            (None, PerBlock::One(v)) => *v,
            (None, PerBlock::Each(_)) => false,
        };
        let PerBlock::One(cross_dim) = c.cross_attention_dim else {
            return Err(Error::unsupported(
                "cross_attention_dim",
                format!(
                    "{:?} (Kandinsky projections need one value)",
                    c.cross_attention_dim
                ),
            ));
        };

        let c0 = c.block_out_channels[0];
        let time_dim = c.time_embedding_dim.unwrap_or(4 * c0);
        let res = ResnetConfig {
            temb_channels: Some(time_dim),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            time_embedding_norm: TimeEmbeddingNorm::parse(
                "resnet_time_scale_shift",
                &c.resnet_time_scale_shift,
            )?,
            output_scale_factor: c.resnet_out_scale_factor,
            skip_time_act: c.resnet_skip_time_act,
        };

        let hid_dim = c.encoder_hid_dim;
        let add_embedding = match c.addition_embed_type.as_deref() {
            Some("text_image") => AddEmbedding::TextImage(TextImageTimeEmbedding::new(
                &w.pp("add_embedding"),
                cross_dim,
                cross_dim,
                time_dim,
            )?),
            Some(t @ ("image" | "image_hint")) => AddEmbedding::Image(ImageTimeEmbedding::new(
                &w.pp("add_embedding"),
                require(
                    hid_dim,
                    "encoder_hid_dim",
                    "required by addition_embed_type image",
                )?,
                time_dim,
                t == "image_hint",
            )?),
            other => return Err(Error::unsupported("addition_embed_type", other)),
        };
        let encoder_hid_proj = match c.encoder_hid_dim_type.as_deref() {
            Some("text_image_proj") => HidProj::TextImage(TextImageProjection::new(
                &w.pp("encoder_hid_proj"),
                require(hid_dim, "encoder_hid_dim", "required by text_image_proj")?,
                cross_dim,
                cross_dim,
            )?),
            Some("image_proj") => HidProj::Image(ImageProjection::new(
                &w.pp("encoder_hid_proj"),
                require(hid_dim, "encoder_hid_dim", "required by image_proj")?,
                cross_dim,
            )?),
            other => return Err(Error::unsupported("encoder_hid_dim_type", other)),
        };

        let mut down_blocks = Vec::new();
        let mut out_ch = c0;
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let attn = match kind.as_str() {
                "ResnetDownsampleBlock2D" => None,
                "SimpleCrossAttnDownBlock2D" => Some(CrossAttnConfig {
                    head_dim: head_dims[i].unwrap_or(out_ch),
                    cross_attention_dim: cross_dims[i],
                    only_cross_attention: only_cross[i],
                }),
                other => return Err(Error::unsupported(format!("down_block_types[{i}]"), other)),
            };
            down_blocks.push(DownBlock::new(
                &w.pp("down_blocks").pp(i),
                layers[i],
                in_ch,
                out_ch,
                res,
                attn,
                i + 1 < n,
            )?);
        }

        let last = c.block_out_channels[n - 1];
        let mid_block = match c.mid_block_type.as_deref() {
            Some("UNetMidBlock2DSimpleCrossAttn") => MidBlockSimpleCrossAttn::new(
                &w.pp("mid_block"),
                last,
                1,
                ResnetConfig {
                    output_scale_factor: c.mid_block_scale_factor,
                    ..res
                },
                CrossAttnConfig {
                    head_dim: head_dims[n - 1].unwrap_or(last),
                    cross_attention_dim: cross_dims[n - 1],
                    only_cross_attention: mid_only_cross,
                },
            )?,
            other => return Err(Error::unsupported("mid_block_type", other)),
        };

        let rev_ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = cross_dims.iter().rev().copied().collect();
        let rev_only: Vec<bool> = only_cross.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_ch = rev_ch[0];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let prev_ch = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let attn = match kind.as_str() {
                "ResnetUpsampleBlock2D" => None,
                // diffusers indexes attention_head_dim un-reversed for the up blocks.
                "SimpleCrossAttnUpBlock2D" => Some(CrossAttnConfig {
                    head_dim: head_dims[i].unwrap_or(out_ch),
                    cross_attention_dim: rev_cross[i],
                    only_cross_attention: rev_only[i],
                }),
                other => return Err(Error::unsupported(format!("up_block_types[{i}]"), other)),
            };
            up_blocks.push(UpBlock::new(
                &w.pp("up_blocks").pp(i),
                rev_layers[i] + 1,
                in_ch,
                out_ch,
                prev_ch,
                res,
                attn,
                i + 1 < n,
            )?);
        }

        Ok(Self {
            dtype: w.dtype(),
            config: c.clone(),
            conv_in: Conv2d::new(
                &w.pp("conv_in"),
                c.in_channels,
                c0,
                c.conv_in_kernel,
                1,
                (c.conv_in_kernel - 1) / 2,
            )?,
            time_embedding: TimestepEmbedding::new(
                &w.pp("time_embedding"),
                c0,
                time_dim,
                time_dim,
            )?,
            add_embedding,
            encoder_hid_proj,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &w.pp("conv_norm_out"),
                c.norm_num_groups,
                c0,
                c.norm_eps,
            )?,
            conv_out: Conv2d::new(
                &w.pp("conv_out"),
                c0,
                c.out_channels,
                c.conv_out_kernel,
                1,
                (c.conv_out_kernel - 1) / 2,
            )?,
        })
    }

    /// Loads a `unet/` component directory (`config.json` and weights) in `dtype` on `device`.
    pub fn load(
        dir: &std::path::Path,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let config = UNet2DConditionConfig::load(dir)?;
        crate::loading::check_config_size(dir, |w| Self::new(w, &config))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &config)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Predicts the noise (and variance) for `sample (B, C, h, w)` at `timestep`.
    ///
    /// `h` and `w` must be divisible by `2^(levels-1)`: the resnet upsamplers cannot restore odd
    /// sizes (diffusers fails the same way).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        self.forward_timesteps(sample, &vec![timestep; b], cond)
    }

    /// [`Self::forward`] with one timestep per sample (training).
    ///
    /// Inputs of any float dtype are cast to the model's compute dtype; the output is f32.
    pub fn forward_timesteps(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let cast = |t: Option<&Tensor>| t.map(|t| t.to_dtype(self.dtype)).transpose();
        let (image_embeds, text_embeds) = (cast(cond.image_embeds)?, cast(cond.text_embeds)?);
        let (encoder_hidden_states, hint) = (cast(cond.encoder_hidden_states)?, cast(cond.hint)?);
        let cond = UNetConditioning {
            image_embeds: image_embeds.as_ref(),
            text_embeds: text_embeds.as_ref(),
            encoder_hidden_states: encoder_hidden_states.as_ref(),
            hint: hint.as_ref(),
        };
        Ok(self
            .forward_in_dtype(&sample.to_dtype(self.dtype)?, timesteps, &cond)?
            .to_dtype(DType::F32)?)
    }

    fn forward_in_dtype(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            return Err(Error::InvalidArgument(format!(
                "{} timesteps for a batch of {b}",
                timesteps.len()
            )));
        }
        let factor = 1usize << (c.block_out_channels.len() - 1);
        if h % factor != 0 || w % factor != 0 {
            return Err(Error::InvalidArgument(format!(
                "latent size {h}x{w} must be divisible by {factor} (image sides must be multiples of {})",
                factor * 8
            )));
        }
        let image_embeds = cond
            .image_embeds
            .ok_or_else(|| Error::InvalidArgument("the UNet needs image_embeds".into()))?;
        let mut sample = if c.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };

        let t_emb = timestep_embedding(
            timesteps,
            c.block_out_channels[0],
            c.flip_sin_to_cos,
            c.freq_shift,
            sample.device(),
        )?
        .to_dtype(sample.dtype())?;
        let emb = self.time_embedding.forward(&t_emb)?;

        let aug = match &self.add_embedding {
            AddEmbedding::TextImage(e) => {
                let text = cond.text_embeds.ok_or_else(|| {
                    Error::InvalidArgument("this UNet (text_image) needs text_embeds".into())
                })?;
                e.forward(text, image_embeds)?
            }
            AddEmbedding::Image(e) => {
                if c.addition_embed_type.as_deref() == Some("image_hint") {
                    let hint = cond.hint.ok_or_else(|| {
                        Error::InvalidArgument("this UNet (image_hint) needs a hint".into())
                    })?;
                    if let Some(hint) = e.hint(hint)? {
                        sample = Tensor::cat(&[&sample, &hint], 1)?;
                    }
                }
                e.forward(image_embeds)?
            }
        };
        let emb = (emb + aug)?;

        let ctx = match &self.encoder_hid_proj {
            HidProj::TextImage(p) => {
                let ehs = cond.encoder_hidden_states.ok_or_else(|| {
                    Error::InvalidArgument(
                        "this UNet (text_image_proj) needs encoder_hidden_states".into(),
                    )
                })?;
                p.forward(ehs, image_embeds)?
            }
            HidProj::Image(p) => p.forward(image_embeds)?,
        };

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &emb, Some(&ctx), &mut skips)?;
        }
        h = self.mid_block.forward(&h, &emb, &ctx)?;
        for block in &self.up_blocks {
            h = block.forward(&h, &emb, Some(&ctx), &mut skips)?;
        }
        let h = silu(&self.conv_norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}
