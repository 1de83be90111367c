//! diffusers `utils/`.

pub mod torch_utils;
