//! diffusers `pipelines/kandinsky/` (Kandinsky 2.1).

pub mod pipeline_kandinsky;
pub mod pipeline_kandinsky_inpaint;
pub mod pipeline_kandinsky_prior;
pub mod text_encoder;
