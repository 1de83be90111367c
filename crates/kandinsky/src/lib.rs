//! Kandinsky 2.1 / 2.2 text-to-image in Rust, on candle, numerically matching diffusers.
//!
//! The layout mirrors diffusers: [`models`] (one file per network), [`schedulers`],
//! [`pipelines`], plus [`loading`] (model directories, configs, weights) and [`image_io`].
//! Tensor names equal diffusers' state-dict names, so checkpoints load without renaming.

pub mod error;
pub mod image_io;
pub mod image_processor;
pub mod loading;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod schedulers;
pub mod tokenization;
pub mod utils;

pub use error::{Error, Result};
