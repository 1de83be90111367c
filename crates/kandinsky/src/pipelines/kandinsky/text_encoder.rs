//! diffusers `pipelines/kandinsky/text_encoder.py`: `MultilingualCLIP`, the Kandinsky 2.1 decoder's
//! text encoder (XLM-R, attention-masked mean pooling, linear projection).

use crate::error::Result;
use crate::loading::Weights;
use crate::models::nn::Linear;
use crate::models::xlm_roberta::{XlmRobertaConfig, XlmRobertaModel};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

/// `MCLIPConfig`: an XLM-R config plus the projection sizes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MClipConfig {
    /// The XLM-R encoder's settings (same JSON object).
    #[serde(flatten)]
    pub transformer: XlmRobertaConfig,
    /// Input width of the projection (`transformerDimensions`).
    #[serde(rename = "transformerDimensions")]
    pub transformer_dimensions: usize,
    /// Output width of the projection (`numDims`).
    #[serde(rename = "numDims")]
    pub num_dims: usize,
}

impl Default for MClipConfig {
    /// [`XlmRobertaConfig`]'s defaults and a 1024 → 768 projection.
    fn default() -> Self {
        Self {
            transformer: XlmRobertaConfig::default(),
            transformer_dimensions: 1024,
            num_dims: 768,
        }
    }
}

/// `MultilingualCLIP`.
#[derive(Debug, Clone)]
pub struct MultilingualClip {
    transformer: XlmRobertaModel,
    linear_transformation: Linear,
}

impl MultilingualClip {
    /// Builds the encoder (`transformer.*`, `LinearTransformation.*`).
    pub fn new(w: &Weights, c: &MClipConfig) -> Result<Self> {
        Ok(Self {
            transformer: XlmRobertaModel::new(&w.pp("transformer"), &c.transformer)?,
            linear_transformation: Linear::new(
                &w.pp("LinearTransformation"),
                c.transformer_dimensions,
                c.num_dims,
                true,
            )?,
        })
    }

    /// Loads a `text_encoder/` component directory.
    pub fn load(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        let c: MClipConfig = crate::loading::read_json(&dir.join("config.json"))?;
        Self::new(&Weights::from_dir(dir, dtype, device)?, &c)
    }

    /// The XLM-R encoder.
    pub fn transformer(&self) -> &XlmRobertaModel {
        &self.transformer
    }

    /// Returns `(prompt_embeds (B, num_dims), last_hidden_state (B, L, hidden))`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let embs = self.transformer.forward(input_ids, attention_mask)?;
        let m = attention_mask.to_dtype(embs.dtype())?;
        let summed = embs.broadcast_mul(&m.unsqueeze(2)?)?.sum(1)?;
        let pooled = summed.broadcast_div(&m.sum_keepdim(1)?)?;
        // Outputs in f32 whatever the compute dtype, as every model's.
        Ok((
            self.linear_transformation
                .forward(&pooled)?
                .to_dtype(DType::F32)?,
            embs.to_dtype(DType::F32)?,
        ))
    }
}
