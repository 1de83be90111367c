//! Stage (c): the MoVQ autoencoder on the synthetic world — reconstruction (MSE) plus the VQ
//! codebook and commitment losses, with the straight-through estimator. The decoder is trained on
//! quantised latents but Kandinsky's pipelines decode unquantised ones (`force_not_quantize`); the
//! commitment loss keeps the two close.

use super::checkpoint;
use super::shapes::{planar_batch, training_examples, Example};
use super::trainer::{parse_config, run_loop, TrainOptions, TrainReport};
use crate::error::{Error, Result};
use crate::loading::Weights;
use crate::models::{VQModel, VQModelConfig};
use candle_core::Tensor;
use std::path::PathBuf;

/// The MoVQ of our small Kandinsky: 64×64 images, 3 levels (16×16×4 latents), a 256-entry
/// codebook, SpatialNorm decoder.
pub const SMALL_MOVQ_CONFIG: &str = r#"{
  "_class_name": "VQModel",
  "act_fn": "silu",
  "block_out_channels": [32, 64, 64],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
  "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "force_upcast": false,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 1,
  "lookup_from_codebook": false,
  "mid_block_add_attention": true,
  "norm_num_groups": 32,
  "norm_type": "spatial",
  "num_vq_embeddings": 256,
  "out_channels": 3,
  "sample_size": 64,
  "scaling_factor": 0.18215,
  "vq_embed_dim": 4
}"#;

/// A batch of synthetic images `(B, 3, S, S)` in [-1, 1]: examples `first..first + batch`.
pub fn image_batch(seed: u64, first: u64, batch: usize, side: usize) -> Result<Tensor> {
    image_tensor(&training_examples(seed, first, batch, side), side)
}

/// The examples' images in [-1, 1] (`x / 127.5 - 1`), `(B, 3, S, S)`.
pub fn image_tensor(examples: &[Example], side: usize) -> Result<Tensor> {
    planar_batch(examples, side, |_, v| v as f32 / 127.5 - 1.0)
}

/// `(total, reconstruction)` losses of one batch.
pub fn movq_loss(movq: &VQModel, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let z = movq.encode(x)?;
    let zq = movq.quantizer().lookup(&z)?;
    let codebook = (&zq - z.detach())?.sqr()?.mean_all()?;
    let commitment = (&z - zq.detach())?.sqr()?.mean_all()?;
    let z_st = (&z + (&zq - &z)?.detach())?;
    let recon = movq.decode(&z_st, true)?;
    let rec = (recon - x)?.sqr()?.mean_all()?;
    let total = ((&rec + codebook)? + (commitment * 0.25)?)?;
    Ok((total, rec))
}

/// Trains (or resumes training of) the MoVQ and exports `out_dir/movq/`.
pub fn train_movq(
    opts: &TrainOptions,
    config_json: &str,
    log: &mut dyn FnMut(u64, f32, f32),
) -> Result<TrainReport> {
    let config_value = parse_config(config_json, "movq")?;
    let config: VQModelConfig =
        serde_json::from_value(config_value.clone()).map_err(|source| Error::Json {
            path: PathBuf::from("(movq config)"),
            source,
        })?;
    run_loop(
        opts,
        |params| VQModel::new(&Weights::trainable(params), &config),
        |movq, step| {
            let x = image_batch(
                opts.seed,
                step * opts.batch as u64,
                opts.batch,
                opts.image_size,
            )?;
            movq_loss(movq, &x)
        },
        |params| {
            checkpoint::export_component(
                &opts.out_dir.join("movq"),
                &config_value,
                &params.tensors(),
                "diffusion_pytorch_model.safetensors",
            )
        },
        log,
    )
}
