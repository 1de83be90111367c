//! Generation pipelines (diffusers `pipelines/kandinsky*`).

pub mod kandinsky;
