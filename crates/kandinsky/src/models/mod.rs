//! Networks, one file per diffusers module (`models/…`).

pub mod attention_processor;
pub mod autoencoders;
pub mod clip;
pub mod embeddings;
pub mod nn;
pub mod real_configs;
pub mod resnet;
pub mod transformers;
pub mod unets;
pub mod xlm_roberta;

pub use autoencoders::vq_model::{VQModel, VQModelConfig};
pub use unets::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
