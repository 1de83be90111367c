//! Stage (c): the MoVQ autoencoder on the synthetic world — reconstruction (MSE) plus the VQ
//! codebook and commitment losses, with the straight-through estimator. The decoder is trained on
//! quantised latents but Kandinsky's pipelines decode unquantised ones (`force_not_quantize`); the
//! commitment loss keeps the two close.

use super::checkpoint;
use super::optim::{AdamW, AdamWConfig};
use super::shapes::training_example;
use crate::error::{Error, Result};
use crate::loading::{ParamStore, Weights};
use crate::models::{VQModel, VQModelConfig};
use candle_core::{Device, Tensor};
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

/// Options shared by the training stages.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Total optimizer steps (a resumed run continues up to this count).
    pub steps: u64,
    /// Examples per step.
    pub batch: usize,
    /// Seed of the parameters and of the data.
    pub seed: u64,
    /// AdamW settings.
    pub optim: AdamWConfig,
    /// Where `checkpoint.safetensors` and the exported component go.
    pub out_dir: PathBuf,
    /// Checkpoint every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Image side of the synthetic world.
    pub image_size: usize,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The step the run started from (0, or a checkpoint's).
    pub start_step: u64,
    /// The last step's total loss.
    pub final_loss: f32,
    /// The first step's total loss in this run.
    pub first_loss: f32,
}

/// A batch of synthetic images `(B, 3, S, S)` in [-1, 1]: examples `first..first + batch`.
pub fn image_batch(seed: u64, first: u64, batch: usize, side: usize) -> Result<Tensor> {
    let mut data = Vec::with_capacity(batch * 3 * side * side);
    for i in 0..batch as u64 {
        let ex = training_example(seed, first + i, side);
        for c in 0..3 {
            for p in 0..side * side {
                data.push(ex.image[p * 3 + c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (batch, 3, side, side),
        &Device::Cpu,
    )?)
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
    let config_value: serde_json::Value =
        serde_json::from_str(config_json).map_err(|source| Error::Json {
            path: PathBuf::from("(movq config)"),
            source,
        })?;
    let config: VQModelConfig =
        serde_json::from_value(config_value.clone()).map_err(|source| Error::Json {
            path: PathBuf::from("(movq config)"),
            source,
        })?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(&opts.out_dir, e))?;
    let ckpt = opts.out_dir.join("checkpoint.safetensors");
    let mut opt = AdamW::new(opts.optim);
    let params = if ckpt.is_file() {
        let (params, state) = checkpoint::load(&ckpt)?;
        opt.load_state(&state)?;
        ParamStore::with_init(opts.seed, params, &Device::Cpu)
    } else {
        ParamStore::new(opts.seed, &Device::Cpu)
    };
    let movq = VQModel::new(&Weights::trainable(&params), &config)?;
    let vars = params.vars();
    let start_step = opt.steps();
    let (mut first_loss, mut final_loss) = (f32::NAN, f32::NAN);
    for step in start_step..opts.steps {
        let x = image_batch(
            opts.seed,
            step * opts.batch as u64,
            opts.batch,
            opts.image_size,
        )?;
        let (loss, rec) = movq_loss(&movq, &x)?;
        let grads = loss.backward()?;
        opt.step(&vars, &grads)?;
        let (l, r) = (loss.to_scalar::<f32>()?, rec.to_scalar::<f32>()?);
        if step == start_step {
            first_loss = l;
        }
        final_loss = l;
        log(step + 1, l, r);
        if (step + 1) % opts.checkpoint_every == 0 || step + 1 == opts.steps {
            checkpoint::save(&ckpt, &params, &opt)?;
        }
    }
    checkpoint::export_component(
        &opts.out_dir.join("movq"),
        &config_value,
        &params.tensors(),
        "diffusion_pytorch_model.safetensors",
    )?;
    Ok(TrainReport {
        start_step,
        final_loss,
        first_loss,
    })
}
