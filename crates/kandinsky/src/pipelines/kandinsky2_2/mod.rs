//! diffusers `pipelines/kandinsky2_2/` (Kandinsky 2.2). The 2.2 prior pipeline computes exactly
//! what the 2.1 one does: see [`crate::pipelines::kandinsky::pipeline_kandinsky_prior`].

pub mod pipeline_kandinsky2_2;
pub mod pipeline_kandinsky2_2_controlnet;
pub mod pipeline_kandinsky2_2_inpainting;
pub mod pipeline_kandinsky2_2_prior_emb2emb;
