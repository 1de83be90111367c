//! Kandinsky 2.1 / 2.2 text-to-image in Rust, on candle, numerically matching diffusers.
//!
//! The layout mirrors diffusers: [`models`] (one file per network), [`schedulers`],
//! [`pipelines`] (every mode behind [`pipelines::auto_pipeline::AutoPipeline`]), plus [`loading`]
//! (model directories, configs, weights), [`vae_image_processor`] (diffusers' image pre- and
//! post-processing, image files) and [`clip_image_processor`] (transformers' CLIP one).
//! Tensor names equal diffusers' state-dict names, so checkpoints load without renaming.

pub mod clip_image_processor;
pub mod error;
pub mod loading;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod schedulers;
pub mod tokenization;
pub mod utils;
pub mod vae_image_processor;

pub use error::{Error, Result};
