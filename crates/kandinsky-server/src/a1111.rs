//! The AUTOMATIC1111 web-UI API subset that clients already speak (`/sdapi/v1`), with A1111's
//! field names, defaults, lenient types (pydantic v1 coercion), response shapes and error
//! shapes. What Kandinsky cannot honour is mapped to a documented behaviour (README, "The
//! AUTOMATIC1111 API").

use crate::images::{base64, decode_image, to_mask, to_rgb8};
use crate::jobs::{JobState, Run, Work};
use crate::{random_seed, sampler_by_a1111_name, AppState, SAMPLERS};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kandinsky::pipelines::auto_pipeline::{
    GenerationParams, ImageToImage, Inpainting, Mode, Prompt, Request, TextToImage,
};
use kandinsky::vae_image_processor::{resize_rgb8, Rgb8};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// An error in A1111's shapes: validation errors as FastAPI's 422 `detail` list, the rest as
/// `api_middleware`'s `{error, detail, body, errors}`.
#[derive(Debug)]
pub enum A1111Error {
    /// 422 for a field (`loc`, `msg`, `type`).
    Validation(Vec<String>, String, String),
    /// Another status with `error` (exception class), `detail` and `errors`.
    Other(StatusCode, &'static str, String, String),
}

impl A1111Error {
    fn field(name: &str, msg: &str, ty: &str) -> Self {
        A1111Error::Validation(vec!["body".into(), name.into()], msg.into(), ty.into())
    }

    fn http(status: StatusCode, detail: impl Into<String>) -> Self {
        A1111Error::Other(status, "HTTPException", detail.into(), String::new())
    }

    fn runtime(status: StatusCode, errors: impl Into<String>) -> Self {
        A1111Error::Other(status, "RuntimeError", String::new(), errors.into())
    }
}

impl From<crate::error::ApiError> for A1111Error {
    fn from(e: crate::error::ApiError) -> Self {
        let name = if e.status == StatusCode::TOO_MANY_REQUESTS || e.status == StatusCode::NOT_FOUND
        {
            "HTTPException"
        } else {
            "ValueError"
        };
        A1111Error::Other(e.status, name, e.message.clone(), e.message)
    }
}

impl IntoResponse for A1111Error {
    fn into_response(self) -> Response {
        match self {
            A1111Error::Validation(loc, msg, ty) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"detail": [{"loc": loc, "msg": msg, "type": ty}]})),
            )
                .into_response(),
            A1111Error::Other(status, error, detail, errors) => {
                let mut r = (
                    status,
                    Json(json!({"error": error, "detail": detail, "body": "", "errors": errors})),
                )
                    .into_response();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    r.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        "5".parse().expect("static"),
                    );
                }
                r
            }
        }
    }
}

type A1111Result<T> = Result<T, A1111Error>;

/// The request object with pydantic-v1-style coercion.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: Result<Bytes, BytesRejection>) -> A1111Result<Self> {
        let bytes = body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                A1111Error::http(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is larger than the server's limit ({} MiB)",
                        crate::MAX_BODY_BYTES >> 20
                    ),
                )
            } else {
                A1111Error::http(StatusCode::BAD_REQUEST, e.to_string())
            }
        })?;
        if bytes.is_empty() {
            return Err(A1111Error::Validation(
                vec!["body".into()],
                "field required".into(),
                "value_error.missing".into(),
            ));
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(A1111Error::Validation(
                vec!["body".into()],
                "value is not a valid dict".into(),
                "type_error.dict".into(),
            )),
            Err(e) => Err(A1111Error::Validation(
                vec!["body".into(), e.column().to_string()],
                format!("Expecting value: {e}"),
                "value_error.jsondecode".into(),
            )),
        }
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn int(&self, k: &str, default: i64) -> A1111Result<i64> {
        let bad = || A1111Error::field(k, "value is not a valid integer", "type_error.integer");
        Ok(match self.get(k) {
            None => default,
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.is_finite())
                        .map(|f| f.trunc() as i64)
                })
                .ok_or_else(bad)?,
            Some(Value::Bool(b)) => *b as i64,
            Some(Value::String(s)) => s
                .trim()
                .parse::<i64>()
                .ok()
                .or_else(|| s.trim().parse::<f64>().ok().map(|f| f.trunc() as i64))
                .ok_or_else(bad)?,
            Some(_) => return Err(bad()),
        })
    }

    fn float(&self, k: &str, default: f64) -> A1111Result<f64> {
        let bad = || A1111Error::field(k, "value is not a valid float", "type_error.float");
        Ok(match self.get(k) {
            None => default,
            Some(Value::Number(n)) => n.as_f64().ok_or_else(bad)?,
            Some(Value::Bool(b)) => *b as i64 as f64,
            Some(Value::String(s)) => s.trim().parse().map_err(|_| bad())?,
            Some(_) => return Err(bad()),
        })
    }

    fn bool(&self, k: &str, default: bool) -> A1111Result<bool> {
        let bad = || {
            A1111Error::field(
                k,
                "value could not be parsed to a boolean",
                "type_error.bool",
            )
        };
        Ok(match self.get(k) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(0.0) => false,
                Some(1.0) => true,
                _ => return Err(bad()),
            },
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" | "y" | "t" => true,
                "0" | "false" | "no" | "off" | "n" | "f" => false,
                _ => return Err(bad()),
            },
            Some(_) => return Err(bad()),
        })
    }

    fn string(&self, k: &str, default: &str) -> A1111Result<String> {
        Ok(match self.get(k) {
            None => default.into(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => if *b { "True" } else { "False" }.into(),
            Some(_) => return Err(A1111Error::field(k, "str type expected", "type_error.str")),
        })
    }

    fn opt_string(&self, k: &str) -> A1111Result<Option<String>> {
        Ok(match self.get(k) {
            None => None,
            Some(_) => Some(self.string(k, "")?),
        })
    }
}

/// The settings both endpoints share.
struct Common {
    prompt: String,
    negative_prompt: String,
    seed: u64,
    sampler: String,
    scheduler: Option<kandinsky::schedulers::SchedulerClass>,
    count: usize,
    batch_size: usize,
    steps: usize,
    cfg_scale: f64,
    width: usize,
    height: usize,
    send_images: bool,
    model: String,
    parameters: Map<String, Value>,
}

/// Every declared field of A1111's request model with its API default (`parameters` echoes
/// them, with what the client sent).
fn defaults(img2img: bool) -> Map<String, Value> {
    let mut m = json!({
        "prompt": "", "negative_prompt": "", "styles": null, "seed": -1, "subseed": -1,
        "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
        "sampler_name": null, "scheduler": null, "batch_size": 1, "n_iter": 1, "steps": 50,
        "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": null, "tiling": null,
        "do_not_save_samples": false, "do_not_save_grid": false, "eta": null,
        "denoising_strength": if img2img { json!(0.75) } else { Value::Null },
        "s_min_uncond": null, "s_churn": null, "s_tmax": null, "s_tmin": null, "s_noise": null,
        "override_settings": null, "override_settings_restore_afterwards": true,
        "refiner_checkpoint": null, "refiner_switch_at": null, "disable_extra_networks": false,
        "firstpass_image": null, "comments": null, "sampler_index": "Euler",
        "script_name": null, "send_images": true, "save_images": false,
        "alwayson_scripts": {}, "force_task_id": null, "infotext": null
    })
    .as_object()
    .expect("object")
    .clone();
    if img2img {
        for (k, v) in json!({
            "init_images": null, "resize_mode": 0, "image_cfg_scale": null, "mask": null,
            "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": null, "mask_round": true,
            "inpainting_fill": 0, "inpaint_full_res": true, "inpaint_full_res_padding": 0,
            "inpainting_mask_invert": 0, "initial_noise_multiplier": null, "latent_mask": null,
            "include_init_images": false
        })
        .as_object()
        .expect("object")
        {
            m.insert(k.clone(), v.clone());
        }
    } else {
        for (k, v) in json!({
            "enable_hr": false, "hr_scale": 2.0, "hr_upscaler": null, "hr_second_pass_steps": 0,
            "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": null,
            "hr_sampler_name": null, "hr_scheduler": null, "hr_prompt": "",
            "hr_negative_prompt": "", "firstphase_width": 0, "firstphase_height": 0
        })
        .as_object()
        .expect("object")
        {
            m.insert(k.clone(), v.clone());
        }
    }
    m
}

fn common(state: &AppState, f: &Fields, img2img: bool) -> A1111Result<Common> {
    let prompt = match f.get("prompt") {
        Some(Value::Array(_)) | Some(Value::Object(_)) => {
            return Err(A1111Error::field(
                "prompt",
                "str type expected",
                "type_error.str",
            ))
        }
        _ => f.string("prompt", "")?,
    };
    let negative_prompt = f.string("negative_prompt", "")?;
    let seed = match f.int("seed", -1)? {
        s if s < 0 => random_seed(),
        s => s as u64,
    };
    let sampler_name = f.opt_string("sampler_name")?.filter(|s| !s.is_empty());
    let sampler_index = f.string("sampler_index", "Euler")?;
    let asked = sampler_name.unwrap_or(sampler_index);
    let sampler = sampler_by_a1111_name(&asked).ok_or_else(|| {
        A1111Error::http(
            StatusCode::NOT_FOUND,
            format!(
                "Sampler not found: '{asked}' (this server has {})",
                SAMPLERS
                    .iter()
                    .filter_map(|s| s.a1111)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let batch_size = f.int("batch_size", 1)?;
    let n_iter = f.int("n_iter", 1)?;
    let steps = f.int("steps", 50)?;
    let width = f.int("width", 512)?;
    let height = f.int("height", 512)?;
    for (k, v) in [
        ("batch_size", batch_size),
        ("n_iter", n_iter),
        ("steps", steps),
        ("width", width),
        ("height", height),
    ] {
        if v < 1 {
            return Err(A1111Error::field(
                k,
                "ensure this value is greater than or equal to 1",
                "value_error.number.not_ge",
            ));
        }
    }
    let count = (batch_size as usize).saturating_mul(n_iter as usize);
    state.limits.check(
        Some(width as usize),
        Some(height as usize),
        steps as usize,
        25,
        count,
    )?;
    let mut model = state.current_model();
    if let Some(Value::Object(o)) = f.get("override_settings") {
        // A1111 silently keeps the current model when the override names an unknown one.
        if let Some(Value::String(name)) = o.get("sd_model_checkpoint") {
            if let Some(m) = state.model_by_title(name) {
                model = m;
            }
        }
    }
    let mut parameters = defaults(img2img);
    for (k, v) in &f.0 {
        if parameters.contains_key(k) {
            parameters.insert(k.clone(), v.clone());
        }
    }
    Ok(Common {
        prompt,
        negative_prompt,
        seed,
        sampler: asked,
        scheduler: sampler.class,
        count,
        batch_size: batch_size as usize,
        steps: steps as usize,
        cfg_scale: f.float("cfg_scale", 7.0)?,
        width: width as usize,
        height: height as usize,
        send_images: f.bool("send_images", true)?,
        model,
        parameters,
    })
}

impl Common {
    /// The prompt and its negative (an empty negative is none).
    fn prompt(&self) -> Prompt {
        Prompt {
            prompt: self.prompt.clone(),
            negative_prompt: Some(self.negative_prompt.clone()).filter(|n| !n.is_empty()),
        }
    }
}

/// One generation per image, image `i` with seed `seed + i` (A1111's `all_seeds`), checked
/// against the model before anything is queued.
fn work(
    state: &AppState,
    model: &crate::catalog::ModelEntry,
    c: &Common,
    mode: Mode,
    extra: &[(&str, String)],
) -> A1111Result<Work> {
    let mut runs = Vec::new();
    let mut infotexts = Vec::new();
    for i in 0..c.count {
        let request = Request {
            mode: mode.clone(),
            params: params(c),
        };
        if i == 0 {
            state.catalog.check(model, &request)?;
        }
        let seed = c.seed.wrapping_add(i as u64);
        infotexts.push(infotext(c, seed, extra));
        runs.push(Run { request, seed });
    }
    Ok(Work {
        model: model.name.clone(),
        kind: mode.decoder_kind(),
        runs,
        infotexts,
    })
}

/// A1111's infotext: prompt, negative prompt, then `k: v` pairs.
fn infotext(c: &Common, seed: u64, extra: &[(&str, String)]) -> String {
    let mut s = c.prompt.clone();
    if !c.negative_prompt.is_empty() {
        s.push_str(&format!("\nNegative prompt: {}", c.negative_prompt));
    }
    let mut pairs = vec![
        ("Steps", c.steps.to_string()),
        ("Sampler", c.sampler.clone()),
        ("Schedule type", "Automatic".into()),
        ("CFG scale", c.cfg_scale.to_string()),
        ("Seed", seed.to_string()),
        ("Size", format!("{}x{}", c.width, c.height)),
        ("Model", c.model.clone()),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
    pairs.push((
        "Version",
        format!("kandinsky-rs {}", env!("CARGO_PKG_VERSION")),
    ));
    let quote = |v: &str| {
        if v.contains([',', ':', '\n']) {
            serde_json::to_string(v).unwrap_or_default()
        } else {
            v.to_string()
        }
    };
    let line: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect();
    format!("{s}\n{}", line.join(", "))
}

/// Runs the work and answers in A1111's response shape.
async fn run(
    state: &Arc<AppState>,
    c: Common,
    work: Work,
    denoising_strength: Value,
    extra: Value,
    img2img: bool,
) -> A1111Result<Response> {
    let seeds: Vec<u64> = work.runs.iter().map(|r| r.seed).collect();
    let infotexts = work.infotexts.clone();
    let job = state.submit(work)?;
    let status = job.finished().await;
    let (images, interrupted) = match status.state {
        JobState::Done => {
            let out = status.output.as_ref().expect("done jobs have output");
            (
                out.pngs.iter().map(|p| base64(p)).collect::<Vec<_>>(),
                false,
            )
        }
        // Cancelled through the native API while an A1111 request waited on it: no image.
        JobState::Cancelled => (Vec::new(), true),
        _ => {
            return Err(A1111Error::runtime(
                StatusCode::INTERNAL_SERVER_ERROR,
                status.error.unwrap_or_else(|| "the job failed".into()),
            ))
        }
    };
    let n = c.count;
    let info = json!({
        "prompt": c.prompt, "all_prompts": vec![&c.prompt; n],
        "negative_prompt": c.negative_prompt, "all_negative_prompts": vec![&c.negative_prompt; n],
        "seed": c.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": vec![-1; n],
        "subseed_strength": 0, "width": c.width, "height": c.height, "sampler_name": c.sampler,
        "cfg_scale": c.cfg_scale, "steps": c.steps, "batch_size": c.batch_size,
        "restore_faces": false, "face_restoration_model": null, "sd_model_name": c.model,
        "sd_model_hash": null, "sd_vae_name": null, "sd_vae_hash": null,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoising_strength, "extra_generation_params": extra,
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": timestamp(job.submitted), "clip_skip": 1,
        "is_using_inpainting_conditioning": img2img && job.work.kind == kandinsky::pipelines::auto_pipeline::DecoderKind::Inpaint,
        "version": format!("kandinsky-rs {}", env!("CARGO_PKG_VERSION")),
        "interrupted": interrupted || job.stop_after.load(std::sync::atomic::Ordering::Relaxed),
    });
    let mut parameters = c.parameters;
    if img2img
        && !parameters
            .get("include_init_images")
            .is_some_and(|v| v == &json!(true))
    {
        parameters.insert("init_images".into(), Value::Null);
        parameters.insert("mask".into(), Value::Null);
    }
    Ok(Json(json!({
        "images": if c.send_images { images } else { Vec::new() },
        "parameters": parameters,
        "info": info.to_string(),
    }))
    .into_response())
}

/// `YYYYMMDDhhmmss` in UTC.
fn timestamp(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn params(c: &Common) -> GenerationParams {
    GenerationParams {
        width: Some(c.width),
        height: Some(c.height),
        steps: c.steps,
        guidance: c.cfg_scale,
        num_images: 1,
        scheduler: c.scheduler,
        ..GenerationParams::default()
    }
}

/// `POST /sdapi/v1/txt2img`.
pub async fn txt2img(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Response> {
    let f = Fields::parse(body)?;
    let c = common(&state, &f, false)?;
    let model = state.catalog.get(Some(&c.model))?;
    let mode = Mode::TextToImage(TextToImage {
        prompt: c.prompt(),
        latents: None,
        prior_latents: None,
    });
    let work = work(&state, model, &c, mode, &[])?;
    run(&state, c, work, Value::Null, json!({}), false).await
}

/// `POST /sdapi/v1/img2img`: image-to-image, or inpainting when `mask` is given.
pub async fn img2img(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Response> {
    let f = Fields::parse(body)?;
    let first = match f.get("init_images") {
        Some(Value::Array(a)) if !a.is_empty() => a[0].clone(),
        Some(Value::Array(_)) | None => {
            return Err(A1111Error::http(
                StatusCode::NOT_FOUND,
                "Init image not found",
            ))
        }
        Some(_) => {
            return Err(A1111Error::field(
                "init_images",
                "value is not a valid list",
                "type_error.list",
            ))
        }
    };
    let Value::String(first) = first else {
        return Err(A1111Error::Validation(
            vec!["body".into(), "init_images".into(), "0".into()],
            "str type expected".into(),
            "type_error.str".into(),
        ));
    };
    let mut c = common(&state, &f, true)?;
    let model = state.catalog.get(Some(&c.model))?;
    let strength = f.float("denoising_strength", 0.75)?;
    let mask_text = f.opt_string("mask")?;
    let (mode_of, extra, denoise) = if let Some(mask_text) = mask_text {
        let blur = match f.get("mask_blur") {
            Some(_) => f.int("mask_blur", 4)? as f64,
            None => f.int("mask_blur_x", 4)? as f64,
        };
        let invert = f.int("inpainting_mask_invert", 0)? == 1;
        // Inpainting decoders work on the latent grid: round the size up to it.
        let g = state
            .catalog
            .models
            .iter()
            .find(|m| m.name == model.name)
            .and_then(|m| m.info(kandinsky::pipelines::auto_pipeline::DecoderKind::Inpaint))
            .map_or(64, |i| i.scale_factor * i.scale_factor);
        c.width = c.width.div_ceil(g) * g;
        c.height = c.height.div_ceil(g) * g;
        let (w, h) = (c.width, c.height);
        let (image, mask) = tokio::task::spawn_blocking(move || -> A1111Result<(Rgb8, Rgb8)> {
            let image = to_rgb8(&decode_image(&first, "init_images[0]")?);
            let mut mask = to_mask(&decode_image(&mask_text, "mask")?);
            if invert {
                mask.data.iter_mut().for_each(|v| *v = 255 - *v);
            }
            // A1111's `resize_mode` 0: just resize.
            Ok((resize_rgb8(&image, w, h), resize_rgb8(&mask, w, h)))
        })
        .await
        .map_err(|e| A1111Error::runtime(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let mode = Mode::Inpainting(Inpainting {
            prompt: c.prompt(),
            image,
            mask,
            mask_blur: Some(blur),
            latents: None,
            prior_latents: None,
        });
        let mut extra = json!({"Mask blur": blur as i64});
        if invert {
            extra["Mask mode"] = json!("Inpaint not masked");
        }
        (mode, extra, Value::Null)
    } else {
        let image = tokio::task::spawn_blocking(move || -> A1111Result<Rgb8> {
            Ok(to_rgb8(&decode_image(&first, "init_images[0]")?))
        })
        .await
        .map_err(|e| A1111Error::runtime(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        let mode = Mode::ImageToImage(ImageToImage {
            prompt: c.prompt(),
            image,
            strength: strength.min(1.0),
            prior_strength: None,
            prior_latents: None,
        });
        (
            mode,
            json!({"Denoising strength": strength}),
            json!(strength),
        )
    };
    let extra_pairs: Vec<(&str, String)> = extra
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| {
                    (
                        k.as_str(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_string),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let work = work(&state, model, &c, mode_of, &extra_pairs)?;
    run(&state, c, work, denoise, extra, true).await
}

/// `GET /sdapi/v1/progress`.
pub async fn progress(State(state): State<Arc<AppState>>) -> Json<Value> {
    let idle = json!({
        "progress": 0.0, "eta_relative": 0.0,
        "state": {"skipped": false, "interrupted": false, "stopping_generation": false, "job": "",
                  "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                  "sampling_steps": 0},
        "current_image": null, "textinfo": null
    });
    let Some(job) = state.queue.running() else {
        return Json(idle);
    };
    let s = job.snapshot();
    let progress = (0.01 + s.fraction()).min(1.0);
    let elapsed = s.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let job_name = match job.work.kind {
        kandinsky::pipelines::auto_pipeline::DecoderKind::TextToImage
            if matches!(job.work.runs[0].request.mode, Mode::TextToImage(_)) =>
        {
            "scripts_txt2img"
        }
        _ => "scripts_img2img",
    };
    Json(json!({
        "progress": progress,
        "eta_relative": (elapsed / progress - elapsed).max(0.0),
        "state": {"skipped": false, "interrupted": job.stop_after.load(std::sync::atomic::Ordering::Relaxed),
                  "stopping_generation": false, "job": job_name, "job_count": s.run.1,
                  "job_timestamp": timestamp(job.submitted), "job_no": s.run.0,
                  "sampling_step": s.step, "sampling_steps": s.steps},
        "current_image": s.preview,
        "textinfo": null
    }))
}

/// `POST /sdapi/v1/interrupt`: the running generation ends before its next step and its
/// unfinished latents are decoded and returned (200); no further image of the request is made.
pub async fn interrupt(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.queue.interrupt(true);
    Json(json!({}))
}

/// `POST /sdapi/v1/skip`: as interrupt, but the request's next images are still made; answered
/// with `null` as A1111 does.
pub async fn skip(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.queue.interrupt(false);
    Json(Value::Null)
}

/// `GET /sdapi/v1/sd-models`.
pub async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(
        state
            .catalog
            .models
            .iter()
            .map(|m| {
                let kind = m.kinds()[0];
                let dir = m.info(kind).map(|i| i.decoder_dir.display().to_string());
                json!({"title": m.name, "model_name": m.name, "hash": null, "sha256": null,
                       "filename": dir, "config": null})
            })
            .collect(),
    ))
}

/// `GET /sdapi/v1/samplers`.
pub async fn samplers() -> Json<Value> {
    Json(Value::Array(
        SAMPLERS
            .iter()
            .filter_map(|s| {
                s.a1111
                    .map(|name| json!({"name": name, "aliases": s.aliases, "options": {}}))
            })
            .collect(),
    ))
}

/// `GET /sdapi/v1/schedulers`: only `Automatic` (each sampler's own spacing).
pub async fn schedulers() -> Json<Value> {
    Json(
        json!([{"name": "automatic", "label": "Automatic", "aliases": null,
                  "default_rho": -1.0, "need_inner_model": false}]),
    )
}

/// `GET /sdapi/v1/options`.
pub async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut options = state.options();
    options.insert("sd_model_checkpoint".into(), json!(state.current_model()));
    Json(Value::Object(options))
}

/// `POST /sdapi/v1/options`: `sd_model_checkpoint` switches the model (500 for an unknown
/// one, as A1111); other keys are stored and otherwise ignored.
pub async fn set_options(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> A1111Result<Json<Value>> {
    let f = Fields::parse(body)?;
    if let Some(v) = f.get("sd_model_checkpoint") {
        let name = v.as_str().unwrap_or_default();
        let model = state.model_by_title(name).ok_or_else(|| {
            A1111Error::runtime(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("model '{name}' not found"),
            )
        })?;
        state.set_current_model(model);
    }
    state.store_options(f.0);
    Ok(Json(Value::Null))
}

/// `GET /sdapi/v1/scripts`.
pub async fn scripts() -> Json<Value> {
    Json(json!({"txt2img": [], "img2img": []}))
}

/// `GET /sdapi/v1/cmd-flags`.
pub async fn cmd_flags(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(
        json!({"api": true, "nowebui": false, "listen": state.listening_publicly, "port": state.port}),
    )
}

/// `GET /sdapi/v1/upscalers`.
pub async fn upscalers() -> Json<Value> {
    Json(json!([
        {"name": "None", "model_name": null, "model_path": null, "model_url": null, "scale": 4},
        {"name": "Lanczos", "model_name": null, "model_path": null, "model_url": null, "scale": 4},
        {"name": "Nearest", "model_name": null, "model_path": null, "model_url": null, "scale": 4}
    ]))
}

/// `GET /sdapi/v1/latent-upscale-modes`.
pub async fn latent_upscale_modes() -> Json<Value> {
    Json(
        json!([{"name": "Latent"}, {"name": "Latent (antialiased)"}, {"name": "Latent (bicubic)"},
        {"name": "Latent (bicubic antialiased)"}, {"name": "Latent (nearest)"},
        {"name": "Latent (nearest-exact)"}]),
    )
}

/// `GET /sdapi/v1/embeddings`.
pub async fn embeddings() -> Json<Value> {
    Json(json!({"loaded": {}, "skipped": {}}))
}

/// The list endpoints with nothing in them (`loras`, `sd-vae`, `hypernetworks`, …).
pub async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

/// `POST /sdapi/v1/refresh-checkpoints` and the like.
pub async fn null() -> Json<Value> {
    Json(Value::Null)
}
