//! Generation pipelines (diffusers `pipelines/kandinsky*`).

pub mod auto_pipeline;
pub mod decoder;
pub mod kandinsky;
pub mod kandinsky2_2;

use crate::error::{Error, Result};
use crate::utils::torch_utils::TorchGenerator;
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A cancellation flag shared with a running pipeline: setting it stops the run before its next
/// denoising step with [`Error::Cancelled`].
pub type CancelFlag = Arc<AtomicBool>;

/// [`Error::Cancelled`] when the flag is set.
pub(crate) fn check_cancelled(flag: Option<&CancelFlag>) -> Result<()> {
    match flag {
        Some(f) if f.load(Ordering::Relaxed) => Err(Error::Cancelled),
        _ => Ok(()),
    }
}

/// `prepare_latents`: the caller's latents (checked against `shape`) or `randn(shape)` drawn from
/// the generator, as every diffusers pipeline does (`init_noise_sigma` is 1 for all Kandinsky
/// schedulers).
pub(crate) fn prepare_latents(
    shape: &[usize],
    latents: Option<Tensor>,
    generator: &mut TorchGenerator,
    device: &Device,
) -> Result<Tensor> {
    match latents {
        Some(l) if l.dims() == shape => Ok(l.to_device(device)?),
        Some(l) => Err(Error::InvalidArgument(format!(
            "latents must have shape {shape:?}, found {:?}",
            l.dims()
        ))),
        None => generator.randn(shape.to_vec(), device),
    }
}
