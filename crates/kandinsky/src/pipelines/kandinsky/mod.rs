//! diffusers `pipelines/kandinsky/` (Kandinsky 2.1).

pub mod text_encoder;
