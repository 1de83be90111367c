//! Networks, one file per diffusers module (`models/…`).

pub mod attention_processor;
pub mod autoencoders;
pub mod embeddings;
pub mod nn;
pub mod resnet;
pub mod unets;

pub use autoencoders::vq_model::{VQModel, VQModelConfig};
pub use unets::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning};
