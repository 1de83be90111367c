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

/// Live previews of a decoder run: every `every` steps (not after the last) the current latents
/// of the first image are decoded with the MoVQ and handed to `sink` with `(step, steps)`. The
/// decode draws nothing from the generator, so previews never change the result.
#[derive(Clone)]
pub struct Preview {
    /// Steps between previews (0 = none).
    pub every: usize,
    /// Receives `(step, steps, image)`.
    pub sink: Arc<dyn Fn(usize, usize, crate::vae_image_processor::Rgb8) + Send + Sync>,
}

impl std::fmt::Debug for Preview {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preview")
            .field("every", &self.every)
            .finish()
    }
}

/// A strength (image-to-image, emb2emb) must be in (0, 1]; `what` names it in the error.
pub(crate) fn check_strength(what: &str, strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "{what} must be in (0, 1], got {strength}"
        )));
    }
    Ok(())
}

/// `get_timesteps`: the last `int(n · strength)` of the schedule `ts` (image-to-image and emb2emb
/// skip its first `1 - strength`); `what` names the strength in the error when none is left.
pub(crate) fn get_timesteps(ts: &[usize], strength: f64, what: &str) -> Result<Vec<usize>> {
    let n = ts.len();
    let init_steps = ((n as f64 * strength) as usize).min(n);
    if init_steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "{what} {strength} with {n} steps leaves no denoising step"
        )));
    }
    Ok(ts[n - init_steps..].to_vec())
}

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
