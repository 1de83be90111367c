//! Generation pipelines (diffusers `pipelines/kandinsky*`).
