//! Noise schedulers (diffusers `schedulers/`). DDIM, DDPM, UnCLIP and DPM-Solver++ arrive with
//! the pipelines.
