//! The native JSON API under `/api/v1`: every mode of the paper's demo as a job, its progress as
//! Server-Sent Events, cancellation, the models and samplers, and the OpenAPI document.

use crate::error::{ApiError, ErrorBody};
use crate::images::{base64, decode_image, to_mask, to_rgb8};
use crate::jobs::{Job, JobState, Run, Work};
use crate::{random_seed, sampler_by_name, AppState, SAMPLERS};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kandinsky::pipelines::auto_pipeline::{
    Controlnet, GenerationParams, ImageToImage, Inpainting, Mixing, Mode, Outpainting, Prompt,
    Request, Stage, TextToImage, Variations, Version,
};
use kandinsky::pipelines::kandinsky::pipeline_kandinsky_prior::MixInput;
use kandinsky::vae_image_processor::Margins;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use utoipa::{OpenApi, ToSchema};

/// The modes of the demo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModeName {
    /// Text to image.
    #[default]
    TextToImage,
    /// Image to image (`image`, `strength`, optional `prior_strength`).
    ImageToImage,
    /// Inpainting (`image`, `mask`: white = repaint).
    Inpainting,
    /// Outpainting (`image`, `margins`).
    Outpainting,
    /// Mixing of texts and images with weights (`inputs`).
    Mixing,
    /// Variations of `image`.
    Variations,
    /// ControlNet depth (`hint`, optional `image` + `strength`).
    Controlnet,
}

/// One input of a mix: a text or an image, with its weight.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct MixItem {
    /// A prompt.
    pub text: Option<String>,
    /// An image (base64 PNG/JPEG, with or without a `data:` prefix).
    pub image: Option<String>,
    /// Its weight (not normalised, as in diffusers).
    pub weight: f64,
}

/// Outpainting margins in pixels.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct MarginsBody {
    /// Pixels added on the left.
    pub left: usize,
    /// Pixels added on top.
    pub top: usize,
    /// Pixels added on the right.
    pub right: usize,
    /// Pixels added at the bottom.
    pub bottom: usize,
}

/// A generation request. Fields a mode does not use are ignored; defaults are the CLI's
/// (diffusers' combined pipelines'), so the same fields and seed give `kandinsky generate`'s
/// pixels.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(default)]
pub struct GenerateRequest {
    /// The model's name (`GET /api/v1/models`); the server's default when omitted.
    pub model: Option<String>,
    /// The mode.
    pub mode: ModeName,
    /// The prompt (English or Russian).
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: Option<String>,
    /// Output width in pixels; the model's native size when omitted.
    pub width: Option<usize>,
    /// Output height in pixels.
    pub height: Option<usize>,
    /// Decoder steps.
    pub steps: usize,
    /// Prior steps.
    pub prior_steps: usize,
    /// Decoder guidance scale.
    pub guidance: f64,
    /// Prior guidance scale.
    pub prior_guidance: f64,
    /// Images generated from one seed (one batch, as `--num-images`).
    pub num_images: usize,
    /// A sampler name of `GET /api/v1/samplers` (`default`: the model's own).
    pub sampler: Option<String>,
    /// The seed; random when omitted or negative.
    pub seed: Option<i64>,
    /// The input image (image-to-image, inpainting, outpainting, variations, ControlNet).
    pub image: Option<String>,
    /// The inpainting mask, same size as the image: white = repaint.
    pub mask: Option<String>,
    /// Inpainting and outpainting keep the input outside the mask, feathered by this Gaussian σ
    /// in pixels (A1111's `mask_blur`); a negative value returns the decoder's raw output.
    pub mask_blur: f64,
    /// Image-to-image strength in (0, 1].
    pub strength: f64,
    /// Start the prior from the image's embedding with this strength (image-to-image, ControlNet
    /// with an image).
    pub prior_strength: Option<f64>,
    /// Outpainting margins.
    pub margins: MarginsBody,
    /// Mixing inputs.
    pub inputs: Vec<MixItem>,
    /// The ControlNet hint (a depth map).
    pub hint: Option<String>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        let p = GenerationParams::default();
        Self {
            model: None,
            mode: ModeName::TextToImage,
            prompt: String::new(),
            negative_prompt: None,
            width: None,
            height: None,
            steps: p.steps,
            prior_steps: p.prior_steps,
            guidance: p.guidance,
            prior_guidance: p.prior_guidance,
            num_images: 1,
            sampler: None,
            seed: None,
            image: None,
            mask: None,
            mask_blur: 4.0,
            strength: 0.3,
            prior_strength: None,
            margins: MarginsBody::default(),
            inputs: Vec::new(),
            hint: None,
        }
    }
}

/// A model the server can use.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    /// Its name.
    pub name: String,
    /// "2.1" or "2.2".
    pub version: String,
    /// The native image side in pixels.
    pub native_size: usize,
    /// The modes its decoders serve.
    pub modes: Vec<ModeName>,
    /// Whether requests without `model` use it.
    pub default: bool,
}

/// A sampler.
#[derive(Debug, Serialize, ToSchema)]
pub struct SamplerView {
    /// What requests give.
    pub name: String,
    /// Its usual name.
    pub label: String,
}

/// A queued job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobCreated {
    /// The job's id.
    pub id: String,
    /// Jobs ahead of it.
    pub position: usize,
}

/// The images of a finished job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResult {
    /// Base64 PNGs (no prefix), each with its `parameters` text chunk.
    pub images: Vec<String>,
    /// The seed of the generation (every image of one batch shares it).
    pub seed: u64,
    /// The seed of each image.
    pub seeds: Vec<u64>,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// The parameters of the generation.
    pub info: String,
}

/// A job's state, progress and result.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    /// Its id.
    pub id: String,
    /// Where it is.
    pub state: JobState,
    /// Jobs ahead of it while queued.
    pub position: Option<usize>,
    /// "prior" or "decoder" while running.
    pub stage: Option<String>,
    /// Steps done in the stage.
    pub step: usize,
    /// Steps of the stage.
    pub steps: usize,
    /// Seconds left in the stage.
    pub eta_s: Option<f64>,
    /// Why it failed.
    pub error: Option<String>,
    /// The latest preview of the decoder's latents (base64 PNG), while running.
    pub preview: Option<String>,
    /// The images, when done.
    pub result: Option<JobResult>,
}

/// The view of a job now.
pub fn job_view(state: &AppState, job: &Job) -> JobView {
    let s = job.snapshot();
    JobView {
        id: job.id.clone(),
        state: s.state,
        position: state.queue.position(&job.id),
        stage: s.stage.map(|st| {
            match st {
                Stage::Prior => "prior",
                Stage::Decoder => "decoder",
            }
            .into()
        }),
        step: s.step,
        steps: s.steps,
        eta_s: s.eta(),
        error: s.error.clone(),
        preview: s.preview.clone(),
        result: s.output.as_ref().map(|o| JobResult {
            images: o.pngs.iter().map(|p| base64(p)).collect(),
            seed: o.seeds.first().copied().unwrap_or_default(),
            seeds: o.seeds.clone(),
            width: o.size.0,
            height: o.size.1,
            info: job.work.infotexts.first().cloned().unwrap_or_default(),
        }),
    }
}

/// The request body as JSON, with size and syntax errors in words.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is larger than the server's limit ({} MiB)",
                crate::MAX_BODY_BYTES >> 20
            ))
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "the request is not valid JSON for this endpoint: {e}"
        ))
    })
}

fn required<'a>(field: &'a Option<String>, name: &str, mode: &str) -> Result<&'a str, ApiError> {
    field
        .as_deref()
        .ok_or_else(|| ApiError::bad_request(format!("{mode} needs `{name}`")))
}

/// Checks a native request and turns it into queued work (everything checked before any work).
pub fn build_work(state: &AppState, r: &GenerateRequest) -> Result<Work, ApiError> {
    let limits = &state.limits;
    let model = state.catalog.get(r.model.as_deref())?;
    limits.check(r.width, r.height, r.steps, r.prior_steps, r.num_images)?;
    let scheduler = match r.sampler.as_deref() {
        None => None,
        Some(name) => {
            sampler_by_name(name)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown sampler '{name}'; use one of: {}",
                        SAMPLERS
                            .iter()
                            .map(|s| s.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                .class
        }
    };
    let prompt = Prompt {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().filter(|n| !n.is_empty()),
    };
    let image = |mode: &str| -> Result<_, ApiError> {
        Ok(to_rgb8(&decode_image(
            required(&r.image, "image", mode)?,
            "image",
        )?))
    };
    let mask_blur = (r.mask_blur >= 0.0).then_some(r.mask_blur);
    let mode: Mode = match r.mode {
        ModeName::TextToImage => TextToImage {
            prompt,
            latents: None,
            prior_latents: None,
        }
        .into(),
        ModeName::ImageToImage => ImageToImage {
            prompt,
            image: image("image_to_image")?,
            strength: r.strength,
            prior_strength: r.prior_strength,
            prior_latents: None,
        }
        .into(),
        ModeName::Inpainting => Inpainting {
            prompt,
            image: image("inpainting")?,
            mask: to_mask(&decode_image(
                required(&r.mask, "mask", "inpainting")?,
                "mask",
            )?),
            mask_blur,
            latents: None,
            prior_latents: None,
        }
        .into(),
        ModeName::Outpainting => {
            let m = r.margins;
            let image = image("outpainting")?;
            let (w, h) = (
                image.width + m.left + m.right,
                image.height + m.top + m.bottom,
            );
            limits.check(Some(w), Some(h), r.steps, r.prior_steps, r.num_images)?;
            Outpainting {
                prompt,
                image,
                margins: Margins {
                    left: m.left,
                    top: m.top,
                    right: m.right,
                    bottom: m.bottom,
                },
                mask_blur,
                latents: None,
                prior_latents: None,
            }
            .into()
        }
        ModeName::Mixing => {
            if r.inputs.is_empty() {
                return Err(ApiError::bad_request("mixing needs `inputs`"));
            }
            if r.inputs.len() > 16 {
                return Err(ApiError::bad_request("mixing takes at most 16 inputs"));
            }
            let mut inputs = Vec::new();
            for (i, item) in r.inputs.iter().enumerate() {
                let input = match (&item.text, &item.image) {
                    (Some(t), None) => MixInput::Text(t.clone()),
                    (None, Some(img)) => {
                        MixInput::Image(to_rgb8(&decode_image(img, &format!("inputs[{i}].image"))?))
                    }
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "inputs[{i}] needs exactly one of `text` and `image`"
                        )))
                    }
                };
                inputs.push((input, item.weight));
            }
            Mixing {
                inputs,
                latents: None,
            }
            .into()
        }
        ModeName::Variations => Variations {
            image: image("variations")?,
            latents: None,
        }
        .into(),
        ModeName::Controlnet => Controlnet {
            prompt,
            hint: to_rgb8(&decode_image(
                required(&r.hint, "hint", "controlnet")?,
                "hint",
            )?),
            image: match &r.image {
                Some(_) => Some(kandinsky::pipelines::auto_pipeline::ControlnetImage {
                    image: image("controlnet")?,
                    strength: r.strength,
                    prior_strength: r.prior_strength,
                }),
                None => None,
            },
            latents: None,
            prior_latents: None,
        }
        .into(),
    };
    let request = Request {
        mode,
        params: GenerationParams {
            width: r.width,
            height: r.height,
            steps: r.steps,
            prior_steps: r.prior_steps,
            guidance: r.guidance,
            prior_guidance: r.prior_guidance,
            num_images: r.num_images,
            scheduler,
        },
    };
    let plan = state.catalog.check(model, &request)?;
    let seed = match r.seed {
        Some(s) if s >= 0 => s as u64,
        _ => random_seed(),
    };
    let sampler = r
        .sampler
        .as_deref()
        .and_then(sampler_by_name)
        .map_or("Model default", |s| s.label);
    let mut info = String::new();
    if let Some(p) = request.mode.prompt() {
        info.push_str(&format!(
            "{}\nNegative prompt: {}\n",
            p.prompt,
            p.negative_prompt.as_deref().unwrap_or("")
        ));
    }
    info.push_str(&format!(
        "Mode: {:?}, Steps: {}, Prior steps: {}, CFG scale: {}, Prior CFG scale: {}, Seed: {seed}, Size: {}x{}, Model: {}, Sampler: {sampler}",
        r.mode, r.steps, r.prior_steps, r.guidance, r.prior_guidance, plan.width, plan.height, model.name
    ));
    Ok(Work {
        model: model.name.clone(),
        kind: request.mode.decoder_kind(),
        runs: vec![Run { request, seed }],
        infotexts: vec![info],
    })
}

/// The modes a model's decoders serve.
pub fn model_modes(kinds: &[kandinsky::pipelines::auto_pipeline::DecoderKind]) -> Vec<ModeName> {
    use kandinsky::pipelines::auto_pipeline::DecoderKind::*;
    let mut modes = Vec::new();
    for k in kinds {
        match k {
            TextToImage => modes.extend([
                ModeName::TextToImage,
                ModeName::ImageToImage,
                ModeName::Mixing,
                ModeName::Variations,
            ]),
            Inpaint => modes.extend([ModeName::Inpainting, ModeName::Outpainting]),
            Controlnet => modes.push(ModeName::Controlnet),
        }
    }
    modes
}

/// The models this server can use.
#[utoipa::path(get, path = "/api/v1/models", responses((status = 200, body = [ModelView])))]
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Vec<ModelView>> {
    Json(
        state
            .catalog
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| ModelView {
                name: m.name.clone(),
                version: match m.version {
                    Version::V2_1 => "2.1",
                    Version::V2_2 => "2.2",
                }
                .into(),
                native_size: m.native_size,
                modes: model_modes(&m.kinds()),
                default: i == 0,
            })
            .collect(),
    )
}

/// The samplers.
#[utoipa::path(get, path = "/api/v1/samplers", responses((status = 200, body = [SamplerView])))]
pub async fn samplers() -> Json<Vec<SamplerView>> {
    Json(
        SAMPLERS
            .iter()
            .map(|s| SamplerView {
                name: s.name.into(),
                label: s.label.into(),
            })
            .collect(),
    )
}

/// `?wait=true` answers when the job has finished.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub struct SubmitQuery {
    wait: bool,
}

/// Queues a job: 202 with its id, or with `?wait=true` 200 with the finished job. 429 with
/// `Retry-After` when the queue is full; 4xx when the request is wrong.
#[utoipa::path(post, path = "/api/v1/jobs", request_body = GenerateRequest,
    params(("wait" = Option<bool>, Query, description = "answer when the job has finished")),
    responses((status = 202, body = JobCreated), (status = 200, body = JobView),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    Query(query): Query<SubmitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: GenerateRequest = parse_json(body)?;
    let st = state.clone();
    // Image decoding and checks are CPU work: off the async threads.
    let work = tokio::task::spawn_blocking(move || build_work(&st, &request))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let job = state.submit(work)?;
    if query.wait {
        job.finished().await;
        return Ok(Json(job_view(&state, &job)).into_response());
    }
    let position = state.queue.position(&job.id).unwrap_or(0);
    Ok((
        StatusCode::ACCEPTED,
        Json(JobCreated {
            id: job.id.clone(),
            position,
        }),
    )
        .into_response())
}

fn find(state: &AppState, id: &str) -> Result<Arc<Job>, ApiError> {
    state.queue.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job '{id}' (finished jobs are kept for a while only)"
        ))
    })
}

/// A job's state, progress and result.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
pub async fn job(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = find(&state, &id)?;
    Ok(Json(job_view(&state, &job)))
}

/// Cancels a queued or running job.
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let job = find(&state, &id)?;
    state.queue.cancel(&job);
    Ok(Json(job_view(&state, &job)))
}

/// Server-Sent Events: the job's view (as `GET /api/v1/jobs/{id}`) after every change, ending
/// after the final state.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/events", params(("id" = String, Path)),
    responses((status = 200, description = "text/event-stream of JobView"), (status = 404, body = ErrorBody)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &id)?;
    let rx = job.changes.subscribe();
    // The current view at once, then one after every change, ending with the final state.
    let stream = futures_util::stream::unfold(
        (state, job, rx, Some(true)),
        |(state, job, mut rx, phase)| async move {
            let first = phase?;
            if !first {
                // The sender lives as long as the job, which this stream holds.
                let _ = rx.changed().await;
            }
            rx.borrow_and_update();
            let view = job_view(&state, &job);
            let next = (!view.state.is_final()).then_some(false);
            let event = Event::default()
                .json_data(&view)
                .unwrap_or_else(|_| Event::default().data("{}"));
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (state, job, rx, next),
            ))
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The OpenAPI document of the native API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kandinsky serve",
        description = "Kandinsky 2.1 / 2.2: every mode of the paper's demo as jobs with live progress."
    ),
    paths(models, samplers, submit, job, cancel, events),
    components(schemas(
        GenerateRequest,
        ModeName,
        MixItem,
        MarginsBody,
        ModelView,
        SamplerView,
        JobCreated,
        JobView,
        JobResult,
        JobState,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
