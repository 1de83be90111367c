//! diffusers `models/unets/unet_2d_blocks.py`: the blocks of the Kandinsky UNet —
//! `ResnetDownsampleBlock2D`, `SimpleCrossAttnDownBlock2D`, `UNetMidBlock2DSimpleCrossAttn`,
//! `SimpleCrossAttnUpBlock2D`, `ResnetUpsampleBlock2D` — and of the MoVQ autoencoder —
//! `DownEncoderBlock2D`, `AttnDownEncoderBlock2D`, `UNetMidBlock2D`, `UpDecoderBlock2D`,
//! `AttnUpDecoderBlock2D`.

use crate::error::Result;
use crate::loading::Weights;
use crate::models::attention_processor::{AddedKvAttention, VaeAttention};
use crate::models::resnet::{
    Downsample2D, Resample, ResnetBlock2D, ResnetBlockCondNorm2D, ResnetConfig, Upsample2D,
};
use candle_core::Tensor;

/// Attention settings of the SimpleCrossAttn blocks.
#[derive(Debug, Clone, Copy)]
pub struct CrossAttnConfig {
    /// Channels per head.
    pub head_dim: usize,
    /// Width of the conditioning tokens (`cross_attention_dim`).
    pub cross_attention_dim: usize,
    /// `only_cross_attention`: no `to_k`/`to_v` on the spatial tokens.
    pub only_cross_attention: bool,
}

/// A UNet down block: resnets, each optionally followed by an AddedKV attention, then an optional
/// downsampling resnet. Covers `ResnetDownsampleBlock2D` (no attention) and
/// `SimpleCrossAttnDownBlock2D`.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AddedKvAttention>,
    downsampler: Option<ResnetBlock2D>,
}

impl DownBlock {
    /// Loads a down block of `layers` resnets from `in_ch` to `out_ch`.
    pub fn new(
        w: &Weights,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        res: ResnetConfig,
        attn: Option<CrossAttnConfig>,
        add_downsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock2D::new(
                &w.pp("resnets").pp(i),
                cin,
                out_ch,
                res,
                Resample::None,
            )?);
            if let Some(a) = attn {
                attentions.push(AddedKvAttention::new(
                    &w.pp("attentions").pp(i),
                    out_ch,
                    a.head_dim,
                    a.cross_attention_dim,
                    res.groups,
                    a.only_cross_attention,
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(ResnetBlock2D::new(
                &w.pp("downsamplers").pp(0),
                out_ch,
                out_ch,
                res,
                Resample::Down,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the block, pushing every output state onto `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: Option<&Tensor>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, require_ctx(ctx)?)?;
            }
            skips.push(h.clone());
        }
        if let Some(ds) = &self.downsampler {
            h = ds.forward(&h, Some(temb))?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

fn require_ctx(ctx: Option<&Tensor>) -> Result<&Tensor> {
    ctx.ok_or_else(|| {
        crate::error::Error::InvalidArgument(
            "cross-attention blocks need encoder hidden states".into(),
        )
    })
}

/// `UNetMidBlock2DSimpleCrossAttn`: resnet, then `layers` × (attention, resnet).
#[derive(Debug, Clone)]
pub struct MidBlockSimpleCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AddedKvAttention>,
}

impl MidBlockSimpleCrossAttn {
    /// Loads a mid block over `ch` channels with `layers` attention layers.
    pub fn new(
        w: &Weights,
        ch: usize,
        layers: usize,
        res: ResnetConfig,
        attn: CrossAttnConfig,
    ) -> Result<Self> {
        let mut resnets = vec![ResnetBlock2D::new(
            &w.pp("resnets").pp(0),
            ch,
            ch,
            res,
            Resample::None,
        )?];
        let mut attentions = Vec::new();
        for i in 0..layers {
            attentions.push(AddedKvAttention::new(
                &w.pp("attentions").pp(i),
                ch,
                attn.head_dim,
                attn.cross_attention_dim,
                res.groups,
                attn.only_cross_attention,
            )?);
            resnets.push(ResnetBlock2D::new(
                &w.pp("resnets").pp(i + 1),
                ch,
                ch,
                res,
                Resample::None,
            )?);
        }
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, ctx)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// A UNet up block: for each layer, concatenate the last skip, resnet, optional AddedKV
/// attention; then an optional upsampling resnet. Covers `ResnetUpsampleBlock2D` and
/// `SimpleCrossAttnUpBlock2D`.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AddedKvAttention>,
    upsampler: Option<ResnetBlock2D>,
}

impl UpBlock {
    /// Loads an up block; `in_ch` is the channel count of the last skip it consumes, `prev_ch`
    /// that of the incoming hidden state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        prev_ch: usize,
        res: ResnetConfig,
        attn: Option<CrossAttnConfig>,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip_ch = if i == layers - 1 { in_ch } else { out_ch };
            let cin = if i == 0 { prev_ch } else { out_ch };
            resnets.push(ResnetBlock2D::new(
                &w.pp("resnets").pp(i),
                cin + skip_ch,
                out_ch,
                res,
                Resample::None,
            )?);
            if let Some(a) = attn {
                attentions.push(AddedKvAttention::new(
                    &w.pp("attentions").pp(i),
                    out_ch,
                    a.head_dim,
                    a.cross_attention_dim,
                    res.groups,
                    a.only_cross_attention,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(ResnetBlock2D::new(
                &w.pp("upsamplers").pp(0),
                out_ch,
                out_ch,
                res,
                Resample::Up,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// How many skips the block consumes.
    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Runs the block, popping its skips from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: Option<&Tensor>,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                crate::error::Error::InvalidArgument("UNet skip connections exhausted".into())
            })?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, require_ctx(ctx)?)?;
            }
        }
        if let Some(us) = &self.upsampler {
            h = us.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// `DownEncoderBlock2D` / `AttnDownEncoderBlock2D` of the MoVQ encoder.
#[derive(Debug, Clone)]
pub struct EncoderDownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<VaeAttention>,
    downsampler: Option<Downsample2D>,
}

impl EncoderDownBlock {
    /// Loads a block of `layers` resnets (no time embedding) with attention when `with_attn`
    /// (single head of `out_ch` channels).
    pub fn new(
        w: &Weights,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        res: ResnetConfig,
        with_attn: bool,
        add_downsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock2D::new(
                &w.pp("resnets").pp(i),
                cin,
                out_ch,
                res,
                Resample::None,
            )?);
            if with_attn {
                attentions.push(VaeAttention::new(
                    &w.pp("attentions").pp(i),
                    out_ch,
                    out_ch,
                    res.groups,
                    res.eps,
                    None,
                    res.output_scale_factor,
                )?);
            }
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(&w.pp("downsamplers").pp(0), out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, None)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, None)?;
            }
        }
        match &self.downsampler {
            Some(ds) => ds.forward(&h),
            None => Ok(h),
        }
    }
}

/// The resnet flavour of a MoVQ mid/up block: plain (encoder) or SpatialNorm (decoder).
#[derive(Debug, Clone)]
pub enum VaeResnet {
    /// `ResnetBlock2D` without time embedding.
    Plain(ResnetBlock2D),
    /// `ResnetBlockCondNorm2D` with SpatialNorm.
    Spatial(ResnetBlockCondNorm2D),
}

impl VaeResnet {
    /// Loads a resnet; `zq_ch` selects the SpatialNorm flavour.
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        res: ResnetConfig,
        zq_ch: Option<usize>,
    ) -> Result<Self> {
        Ok(match zq_ch {
            Some(zq) => VaeResnet::Spatial(ResnetBlockCondNorm2D::new(
                w,
                in_ch,
                out_ch,
                zq,
                res.output_scale_factor,
            )?),
            None => VaeResnet::Plain(ResnetBlock2D::new(w, in_ch, out_ch, res, Resample::None)?),
        })
    }

    /// Runs the resnet.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        match (self, zq) {
            (VaeResnet::Plain(r), _) => r.forward(x, None),
            (VaeResnet::Spatial(r), Some(zq)) => r.forward(x, zq),
            (VaeResnet::Spatial(_), None) => Err(crate::error::Error::InvalidArgument(
                "spatially normalised resnet needs the latent".into(),
            )),
        }
    }
}

/// `UNetMidBlock2D` of the MoVQ encoder/decoder: resnet, (attention, resnet).
#[derive(Debug, Clone)]
pub struct VaeMidBlock {
    resnets: Vec<VaeResnet>,
    attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    /// Loads the mid block over `ch` channels; `zq_ch` selects SpatialNorm (decoder).
    pub fn new(
        w: &Weights,
        ch: usize,
        res: ResnetConfig,
        zq_ch: Option<usize>,
        add_attention: bool,
    ) -> Result<Self> {
        let r0 = VaeResnet::new(&w.pp("resnets").pp(0), ch, ch, res, zq_ch)?;
        let r1 = VaeResnet::new(&w.pp("resnets").pp(1), ch, ch, res, zq_ch)?;
        let attention = if add_attention {
            Some(VaeAttention::new(
                &w.pp("attentions").pp(0),
                ch,
                ch,
                res.groups,
                res.eps,
                zq_ch,
                res.output_scale_factor,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: vec![r0, r1],
            attention,
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, zq)?;
        if let Some(a) = &self.attention {
            h = a.forward(&h, zq)?;
        }
        self.resnets[1].forward(&h, zq)
    }
}

/// `UpDecoderBlock2D` / `AttnUpDecoderBlock2D` of the MoVQ decoder.
#[derive(Debug, Clone)]
pub struct DecoderUpBlock {
    resnets: Vec<VaeResnet>,
    attentions: Vec<VaeAttention>,
    upsampler: Option<Upsample2D>,
}

impl DecoderUpBlock {
    /// Loads a block of `layers` resnets from `in_ch` to `out_ch`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        res: ResnetConfig,
        zq_ch: Option<usize>,
        with_attn: bool,
        add_upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let cin = if i == 0 { in_ch } else { out_ch };
            resnets.push(VaeResnet::new(
                &w.pp("resnets").pp(i),
                cin,
                out_ch,
                res,
                zq_ch,
            )?);
            if with_attn {
                attentions.push(VaeAttention::new(
                    &w.pp("attentions").pp(i),
                    out_ch,
                    out_ch,
                    res.groups,
                    res.eps,
                    zq_ch,
                    res.output_scale_factor,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(&w.pp("upsamplers").pp(0), out_ch)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Runs the block.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, zq)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, zq)?;
            }
        }
        match &self.upsampler {
            Some(us) => us.forward(&h),
            None => Ok(h),
        }
    }
}
