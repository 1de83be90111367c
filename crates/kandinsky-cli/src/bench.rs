//! `kandinsky bench`: every stage of a real Kandinsky 2.1 / 2.2 generation, timed with random
//! weights of the real configurations (`kandinsky::models::real_configs`), in the dtype of `--dtype`.
//! `tools/bench.py` runs the same work in PyTorch and prints both side by side.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kandinsky::loading::Weights;
use kandinsky::models::clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
};
use kandinsky::models::transformers::prior_transformer::{
    PriorTransformer, PriorTransformerConfig,
};
use kandinsky::models::{
    UNet2DConditionConfig, UNet2DConditionModel, UNetConditioning, VQModel, VQModelConfig,
};
use kandinsky::pipelines::kandinsky::text_encoder::{MClipConfig, MultilingualClip};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kandinsky::models::real_configs::{
    CLIP_BIGG_TEXT, CLIP_BIGG_VISION, CLIP_L_TEXT, MCLIP, MOVQ, PRIOR_2_1, PRIOR_2_2, UNET_2_1,
    UNET_2_2,
};

/// Every stage, in table order.
pub const STAGES: &[&str] = &[
    "unet-2.2-32",
    "unet-2.2-64",
    "unet-2.1-32",
    "unet-2.1-64",
    "prior-2.2",
    "prior-2.1",
    "movq-decode-256",
    "movq-decode-512",
    "movq-encode-512",
    "text-clip-l",
    "text-clip-bigg",
    "text-mclip",
    "vision-bigg",
    "load-unet-2.2",
];

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Stages to time (default: every stage but `load-unet-2.2`, which needs `--model-dir`).
    /// One of: unet-2.2-32, unet-2.2-64, unet-2.1-32, unet-2.1-64, prior-2.2, prior-2.1,
    /// movq-decode-256, movq-decode-512, movq-encode-512, text-clip-l, text-clip-bigg,
    /// text-mclip, vision-bigg, load-unet-2.2.
    #[arg(long, value_delimiter = ',')]
    stages: Vec<String>,
    /// Latent sides of the 2.2 UNet rows (pixels / 8), a shorthand for `unet-2.2-<side>` stages.
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Timed runs per stage (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// CFG steps of the prior rows.
    #[arg(long, default_value_t = 25)]
    prior_steps: usize,
    /// A saved real-size 2.2 UNet (`config.json` + f16 safetensors) for `load-unet-2.2`; with
    /// `--prepare` it is written there first.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Write the real-size 2.2 UNet with random f16 weights to `--model-dir` and exit.
    #[arg(long)]
    prepare: bool,
    /// Write a whole real-size 2.2 prior and decoder (random f16 weights, the tiny fixtures'
    /// tokenizer and scheduler files) to `DIR/prior` and `DIR/decoder` and exit: the models of a
    /// whole-pipeline memory and time measurement with `kandinsky generate`.
    #[arg(long, value_name = "DIR")]
    prepare_pipeline: Option<PathBuf>,
    /// Print one JSON line per stage (for tools/bench.py).
    #[arg(long)]
    json: bool,
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets `VmHWM` to the current RSS, so that each stage reports its own peak.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Best of `runs` timed calls after one warm-up.
fn time_best(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Vec<f64>)> {
    let mut times = Vec::new();
    for i in 0..=runs {
        let t = Instant::now();
        f()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok((times.iter().cloned().fold(f64::INFINITY, f64::min), times))
}

/// Forces the lazily-computed result to exist (candle is eager; this reads one value).
fn sync(t: &Tensor) -> Result<()> {
    t.flatten_all()?
        .narrow(0, 0, 1)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(())
}

/// The device of `--device` (set once by [`run`]).
static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

fn dev() -> &'static Device {
    DEVICE.get().unwrap_or(&Device::Cpu)
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?.to_device(dev())?)
}

/// Prompt-like token ids: a start token, `n` words, the end token, padding to 77.
fn token_ids(vocab: usize, bos: u32, eos: u32, pad: u32, n: usize) -> Result<Tensor> {
    let mut rows = Vec::new();
    for b in 0..2 {
        let mut r = vec![pad; 77];
        r[0] = bos;
        for (i, t) in r.iter_mut().enumerate().skip(1).take(n) {
            *t = ((i * 7919 + b * 104_729) % (vocab - 3) + 3) as u32;
        }
        r[n + 1] = eos;
        rows.extend(r);
    }
    Ok(Tensor::from_vec(rows, (2, 77), dev())?)
}

fn weights(dtype: DType) -> Weights {
    Weights::random(dtype, dev())
}

/// Builds and times one stage; returns (best, runs).
fn run_stage(stage: &str, a: &BenchArgs, dtype: DType) -> Result<(f64, Vec<f64>)> {
    let runs = a.runs;
    let unet = |cfg: &str| -> Result<(UNet2DConditionModel, UNet2DConditionConfig)> {
        let c = UNet2DConditionConfig::from_json(cfg)?;
        Ok((UNet2DConditionModel::new(&weights(dtype), &c)?, c))
    };
    match stage {
        s if s.starts_with("unet-2.2-") || s.starts_with("unet-2.1-") => {
            let side: usize = s[9..].parse().context("latent side")?;
            let v21 = s.starts_with("unet-2.1");
            let (model, c) = unet(if v21 { UNET_2_1 } else { UNET_2_2 })?;
            let sample = randn(&[2, c.in_channels, side, side])?;
            let hid = c.encoder_hid_dim.context("config has no encoder_hid_dim")?;
            // 2.1: CLIP ViT-L image and M-CLIP pooled text (768), M-CLIP token states (hid);
            // 2.2: the bigG image embedding (hid).
            let image_embeds = randn(&[2, if v21 { 768 } else { hid }])?;
            let (text_embeds, hidden) = if v21 {
                (Some(randn(&[2, 768])?), Some(randn(&[2, 77, hid])?))
            } else {
                (None, None)
            };
            let cond = UNetConditioning {
                image_embeds: Some(&image_embeds),
                text_embeds: text_embeds.as_ref(),
                encoder_hidden_states: hidden.as_ref(),
                hint: None,
            };
            time_best(runs, || sync(&model.forward(&sample, 500.0, &cond)?))
        }
        "prior-2.2" | "prior-2.1" => {
            let cfg = if stage == "prior-2.2" {
                PRIOR_2_2
            } else {
                PRIOR_2_1
            };
            let c: PriorTransformerConfig = serde_json::from_str(cfg)?;
            let prior = PriorTransformer::new(&weights(dtype), &c)?;
            let e = c.embedding_dim;
            let latents = randn(&[2, e])?;
            let text_embeds = randn(&[2, e])?;
            let states = randn(&[2, 77, e])?;
            let mut mask = vec![0u8; 2 * 77];
            for (i, m) in mask.iter_mut().enumerate() {
                *m = u8::from(i % 77 < 12);
            }
            let mask = Tensor::from_vec(mask, (2, 77), dev())?;
            time_best(runs, || {
                for step in 0..a.prior_steps {
                    let t = 999.0 - step as f64 * 40.0;
                    let out =
                        prior.forward(&latents, t, &text_embeds, Some(&states), Some(&mask))?;
                    sync(&out)?;
                }
                Ok(())
            })
        }
        "movq-decode-256" | "movq-decode-512" | "movq-encode-512" => {
            let c: VQModelConfig = serde_json::from_str(MOVQ)?;
            let movq = VQModel::new(&weights(dtype), &c)?;
            let px: usize = stage[stage.len() - 3..].parse()?;
            if stage.starts_with("movq-decode") {
                let z = randn(&[1, c.latent_channels, px / 8, px / 8])?;
                time_best(runs, || sync(&movq.decode(&z, true)?))
            } else {
                let x = randn(&[1, 3, px, px])?;
                time_best(runs, || sync(&movq.encode(&x)?))
            }
        }
        "text-clip-l" | "text-clip-bigg" => {
            let cfg = if stage == "text-clip-l" {
                CLIP_L_TEXT
            } else {
                CLIP_BIGG_TEXT
            };
            let c: ClipTextConfig = serde_json::from_str(cfg)?;
            let model = ClipTextModelWithProjection::new(&weights(dtype), &c)?;
            let ids = token_ids(c.vocab_size, 49406, 49407, 49407, 12)?;
            time_best(runs, || sync(&model.forward(&ids, None)?.text_embeds))
        }
        "text-mclip" => {
            let c: MClipConfig = serde_json::from_str(MCLIP)?;
            let model = MultilingualClip::new(&weights(dtype), &c)?;
            let ids = token_ids(c.transformer.vocab_size, 0, 2, 1, 12)?;
            let mask: Vec<u32> = (0..2 * 77).map(|i| u32::from(i % 77 < 14)).collect();
            let mask = Tensor::from_vec(mask, (2, 77), dev())?;
            time_best(runs, || sync(&model.forward(&ids, &mask)?.0))
        }
        "vision-bigg" => {
            let c: ClipVisionConfig = serde_json::from_str(CLIP_BIGG_VISION)?;
            let model = ClipVisionModelWithProjection::new(&weights(dtype), &c)?;
            let x = randn(&[1, 3, c.image_size, c.image_size])?;
            time_best(runs, || sync(&model.forward(&x)?.image_embeds))
        }
        "load-unet-2.2" => {
            let dir = a
                .model_dir
                .as_deref()
                .context("load-unet-2.2 needs --model-dir (write one with --prepare)")?;
            time_best(runs, || {
                let m = UNet2DConditionModel::load(dir, dtype, dev())?;
                drop(m);
                Ok(())
            })
        }
        other => bail!("unknown stage '{other}' (one of {})", STAGES.join(", ")),
    }
}

/// Writes the real 2.2 UNet config and random f16 weights (diffusers' names) to `dir`.
fn prepare(dir: &Path) -> Result<()> {
    let c = UNet2DConditionConfig::from_json(UNET_2_2)?;
    let meta = Weights::meta(DType::F32);
    UNet2DConditionModel::new(&meta, &c)?;
    write_random(dir, UNET_2_2, &meta, "diffusion_pytorch_model.safetensors")
}

/// Copies the files of `from` (not its subdirectories) into `to`.
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// A real-size 2.2 prior and decoder with random weights under `dir`.
fn prepare_pipeline(dir: &Path) -> Result<()> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/pipelines");
    let (prior, decoder) = (dir.join("prior"), dir.join("decoder"));
    for (from, to) in [
        ("tiny-2-2-prior", &prior),
        ("tiny-2-2-prior/tokenizer", &prior.join("tokenizer")),
        ("tiny-2-2-prior/scheduler", &prior.join("scheduler")),
        (
            "tiny-2-2-prior/image_processor",
            &prior.join("image_processor"),
        ),
        ("tiny-2-2-decoder", &decoder),
        ("tiny-2-2-decoder/scheduler", &decoder.join("scheduler")),
    ] {
        copy_files(&fixtures.join(from), to)?;
    }
    let meta = Weights::meta(DType::F32);
    PriorTransformer::new(&meta, &serde_json::from_str(PRIOR_2_2)?)?;
    write_random(
        &prior.join("prior"),
        PRIOR_2_2,
        &meta,
        "diffusion_pytorch_model.safetensors",
    )?;
    let meta = Weights::meta(DType::F32);
    ClipTextModelWithProjection::new(&meta, &serde_json::from_str(CLIP_BIGG_TEXT)?)?;
    write_random(
        &prior.join("text_encoder"),
        CLIP_BIGG_TEXT,
        &meta,
        "model.safetensors",
    )?;
    let meta = Weights::meta(DType::F32);
    ClipVisionModelWithProjection::new(&meta, &serde_json::from_str(CLIP_BIGG_VISION)?)?;
    write_random(
        &prior.join("image_encoder"),
        CLIP_BIGG_VISION,
        &meta,
        "model.safetensors",
    )?;
    prepare(&decoder.join("unet"))?;
    let meta = Weights::meta(DType::F32);
    VQModel::new(&meta, &serde_json::from_str(MOVQ)?)?;
    write_random(
        &decoder.join("movq"),
        MOVQ,
        &meta,
        "diffusion_pytorch_model.safetensors",
    )
}

/// Writes `config` and random f16 tensors of the names and shapes `meta` recorded to `dir`.
fn write_random(dir: &Path, config: &str, meta: &Weights, file: &str) -> Result<()> {
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in meta.recorded() {
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let t = Tensor::randn(
            0f32,
            (1.0 / fan_in as f64).sqrt() as f32,
            shape,
            &Device::Cpu,
        )?
        .to_dtype(DType::F16)?;
        tensors.insert(name, t);
    }
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("config.json"), config)?;
    candle_core::safetensors::save(&tensors, dir.join(file))?;
    eprintln!("wrote {} tensors to {}", tensors.len(), dir.display());
    Ok(())
}

pub fn run(args: &BenchArgs) -> Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    if let Some(dir) = &args.prepare_pipeline {
        return prepare_pipeline(dir);
    }
    if args.prepare {
        return prepare(
            args.model_dir
                .as_deref()
                .context("--prepare needs --model-dir")?,
        );
    }
    let mut stages = args.stages.clone();
    stages.extend(args.sizes.iter().map(|s| format!("unet-2.2-{s}")));
    if stages.is_empty() {
        stages = STAGES[..STAGES.len() - 1]
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    for s in &stages {
        let known = STAGES.contains(&s.as_str())
            || (s.starts_with("unet-2.") && s[9..].parse::<usize>().is_ok_and(|v| v > 0));
        anyhow::ensure!(known, "unknown stage '{s}' (one of {})", STAGES.join(", "));
    }
    let dtype = crate::compute_dtype();
    let device = crate::compute_device()?;
    let dname = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    let device_name = if device.is_cuda() { "cuda" } else { "cpu" };
    let _ = DEVICE.set(device);
    let threads = rayon::current_num_threads();
    for stage in &stages {
        reset_peak_rss();
        let (best, times) =
            run_stage(stage, args, dtype).with_context(|| format!("stage {stage}"))?;
        let rss = peak_rss();
        if args.json {
            println!(
                "{}",
                serde_json::json!({"impl": "rust", "dtype": dname, "device": device_name, "stage": stage, "threads": threads,
                    "best_s": best, "runs_s": times, "peak_rss_bytes": rss})
            );
        } else {
            println!(
                "{stage:<16} {dname:<5} {device_name:<4} best {best:>8.3} s of {times:.3?}; peak RSS {:.2} GiB",
                rss as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}
