//! diffusers `models/transformers/`.

pub mod prior_transformer;
