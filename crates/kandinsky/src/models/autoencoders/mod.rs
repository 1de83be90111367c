//! diffusers `models/autoencoders/`.

pub mod vae;
pub mod vq_model;
