//! Assembles the trained stages into diffusers model directories — a `KandinskyPriorPipeline`
//! (`prior/`), a `KandinskyPipeline` (`decoder/`) and a `KandinskyInpaintPipeline`
//! (`decoder-inpaint/`), and the 2.2 sibling's `KandinskyV22Pipeline`,
//! `KandinskyV22InpaintPipeline` and `KandinskyV22ControlnetPipeline` ([`V22_DECODERS`]) — with
//! fp16 weights (the loaders upcast) to keep the model small.

use candle_core::{DType, Tensor};
use kandinsky::error::{Error, Result};
use kandinsky::schedulers::PredictionType;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The diffusers version the model directories name (the one the fixtures are made with).
const DIFFUSERS_VERSION: &str = "0.42.1";

/// Writes `v` as pretty JSON to `path`, creating its directory.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(v).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Copies a trained component (`config.json` + one weights file) as fp16.
fn copy_component(src: &Path, dst: &Path, weights: &str) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    let cfg = src.join("config.json");
    std::fs::copy(&cfg, dst.join("config.json")).map_err(|e| Error::io(&cfg, e))?;
    let w = src.join(weights);
    let tensors = super::checkpoint::read_all(&w)?;
    let half: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F16)?)))
        .collect::<Result<_>>()?;
    let out = dst.join(weights);
    candle_core::safetensors::save(&half, &out).map_err(|e| Error::InvalidWeights {
        path: out.clone(),
        message: e.to_string(),
    })
}

fn copy_files(src: &Path, dst: &Path, names: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for n in names {
        let p = src.join(n);
        std::fs::copy(&p, dst.join(n)).map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Builds `out/{prior,decoder,decoder-inpaint}` from the stage outputs under `runs`
/// (`clip/` with its reduced vocabulary in `clip/tokenizer/`, `mclip/`, `movq/`, `prior/`,
/// `unet/`, `inpaint/`), and the 2.2 decoders of [`V22_DECODERS`] whose stages exist.
pub fn assemble(runs: &Path, out: &Path) -> Result<()> {
    let clip_vocab = runs.join("clip/tokenizer");
    let version = DIFFUSERS_VERSION;
    // Prior pipeline.
    let p = out.join("prior");
    copy_component(
        &runs.join("prior/prior"),
        &p.join("prior"),
        "diffusion_pytorch_model.safetensors",
    )?;
    copy_component(
        &runs.join("clip/text_encoder"),
        &p.join("text_encoder"),
        "model.safetensors",
    )?;
    copy_component(
        &runs.join("clip/image_encoder"),
        &p.join("image_encoder"),
        "model.safetensors",
    )?;
    copy_files(
        &clip_vocab,
        &p.join("tokenizer"),
        &["vocab.json", "merges.txt"],
    )?;
    write_json(
        &p.join("tokenizer/tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "do_lower_case": true, "model_max_length": 77,
                "pad_token": "<|endoftext|>", "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
    )?;
    write_json(
        &p.join("image_processor/preprocessor_config.json"),
        &json!({"crop_size": {"height": 64, "width": 64}, "do_center_crop": true,
                "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "CLIPImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 64}}),
    )?;
    write_json(
        &p.join("scheduler/scheduler_config.json"),
        &json!({"_class_name": "UnCLIPScheduler", "_diffusers_version": version,
                "beta_schedule": "squaredcos_cap_v2", "clip_sample": true, "clip_sample_range": 10.0,
                "num_train_timesteps": 1000, "prediction_type": "sample",
                "variance_type": "fixed_small_log"}),
    )?;
    write_json(
        &p.join("model_index.json"),
        &json!({"_class_name": "KandinskyPriorPipeline", "_diffusers_version": version,
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "image_processor": ["transformers", "CLIPImageProcessor"],
                "prior": ["diffusers", "PriorTransformer"],
                "scheduler": ["diffusers", "UnCLIPScheduler"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}),
    )?;
    // Decoders share the MoVQ and DDIM; the 2.1 ones also M-CLIP and its tokenizer.
    for (dir, unet, class) in [
        ("decoder", "unet", "KandinskyPipeline"),
        ("decoder-inpaint", "inpaint", "KandinskyInpaintPipeline"),
    ] {
        decoder(runs, &out.join(dir), unet, class, true)?;
    }
    // The 2.2 family, where its stages were trained (the prior directory serves both families,
    // as `KandinskyV22PriorPipeline` has the same components).
    for (dir, unet, class) in V22_DECODERS {
        if runs.join(unet).join("unet").is_dir() {
            decoder(runs, &out.join(dir), unet, class, false)?;
        }
    }
    Ok(())
}

/// The 2.2 decoders [`assemble`] writes when their stages exist: (model directory, stage
/// directory under the runs, diffusers pipeline class).
pub const V22_DECODERS: [(&str, &str, &str); 3] = [
    ("decoder-2-2", "unet-2-2", "KandinskyV22Pipeline"),
    (
        "decoder-2-2-inpaint",
        "inpaint-2-2",
        "KandinskyV22InpaintPipeline",
    ),
    (
        "decoder-2-2-controlnet-depth",
        "depth-2-2",
        "KandinskyV22ControlnetPipeline",
    ),
];

/// Writes the decoder directory `d` of pipeline `class` from the stage `runs/unet` and the MoVQ,
/// with M-CLIP and its tokenizer when `text` (2.1).
fn decoder(runs: &Path, d: &Path, unet: &str, class: &str, text: bool) -> Result<()> {
    let version = DIFFUSERS_VERSION;
    copy_component(
        &runs.join(unet).join("unet"),
        &d.join("unet"),
        "diffusion_pytorch_model.safetensors",
    )?;
    copy_component(
        &runs.join("movq/movq"),
        &d.join("movq"),
        "diffusion_pytorch_model.safetensors",
    )?;
    let mut index = json!({"_class_name": class, "_diffusers_version": version,
                           "movq": ["diffusers", "VQModel"],
                           "scheduler": ["diffusers", "DDIMScheduler"],
                           "unet": ["diffusers", "UNet2DConditionModel"]});
    if text {
        copy_component(
            &runs.join("mclip/text_encoder"),
            &d.join("text_encoder"),
            "model.safetensors",
        )?;
        copy_files(
            &runs.join("mclip/tokenizer"),
            &d.join("tokenizer"),
            &[
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
            ],
        )?;
        index["text_encoder"] = json!(["kandinsky", "MultilingualCLIP"]);
        index["tokenizer"] = json!(["transformers", "XLMRobertaTokenizerFast"]);
    }
    // A stage that wrote its scheduler (its prediction type) ships it; older stages predict ε.
    let stage_scheduler = runs.join(unet).join(SCHEDULER_CONFIG);
    let scheduler = if stage_scheduler.is_file() {
        let text = std::fs::read_to_string(&stage_scheduler)
            .map_err(|e| Error::io(&stage_scheduler, e))?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: stage_scheduler.clone(),
            source,
        })?
    } else {
        decoder_scheduler(&PredictionType::Epsilon)
    };
    write_json(&d.join(SCHEDULER_CONFIG), &scheduler)?;
    write_json(&d.join("model_index.json"), &index)
}

/// Where a decoder stage's and a decoder directory's scheduler config lives.
pub const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// The decoders' DDIM scheduler (Kandinsky 2.1's linear β schedule) for a UNet that predicts
/// `prediction`.
pub fn decoder_scheduler(prediction: &PredictionType) -> serde_json::Value {
    json!({"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
           "beta_end": 0.012, "beta_schedule": "linear", "beta_start": 0.00085,
           "clip_sample": false, "num_train_timesteps": 1000,
           "prediction_type": prediction.as_str(), "set_alpha_to_one": false, "steps_offset": 1,
           "thresholding": false, "timestep_spacing": "leading"})
}
