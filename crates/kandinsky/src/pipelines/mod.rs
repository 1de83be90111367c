//! Generation pipelines (diffusers `pipelines/kandinsky*`).

pub mod kandinsky;
pub mod kandinsky2_2;
