//! `kandinsky serve`: the paper's demo over HTTP. A web editor (text-to-image, inpainting and
//! outpainting on an infinite canvas, mixing, variations, image-to-image, ControlNet), a native
//! JSON API under `/api/v1` with its OpenAPI document, and the AUTOMATIC1111 API subset under
//! `/sdapi/v1`. Jobs go through one bounded FIFO queue served by one worker thread that keeps its
//! models loaded; every request is checked (sizes, steps, images, model, sampler) before it is
//! queued.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = kandinsky_server::ServerConfig::default();
//! let server = kandinsky_server::Server::start(config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7860").await?;
//! server.serve(listener).await?;
//! # Ok(())
//! # }
//! ```

pub mod a1111;
pub mod api;
pub mod catalog;
pub mod error;
pub mod images;
pub mod jobs;
mod web;

use crate::catalog::Catalog;
use crate::error::ApiError;
use crate::jobs::{Job, Queue, SubmitError, Work};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kandinsky::pipelines::auto_pipeline::LoadOptions;
use kandinsky::schedulers::SchedulerClass;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};

/// The largest request body.
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// A sampler the server offers: its name in the native API, its label, its A1111 name.
#[derive(Debug, Clone, Copy)]
pub struct SamplerInfo {
    /// The native API's name.
    pub name: &'static str,
    /// Its usual name.
    pub label: &'static str,
    /// A1111's name (`None`: not offered there).
    pub a1111: Option<&'static str>,
    /// A1111's aliases.
    pub aliases: &'static [&'static str],
    /// The scheduler class (`None`: the model's own).
    pub class: Option<SchedulerClass>,
}

/// Every sampler.
pub const SAMPLERS: [SamplerInfo; 6] = [
    SamplerInfo {
        name: "default",
        label: "Model default",
        a1111: None,
        aliases: &[],
        class: None,
    },
    SamplerInfo {
        name: "euler-a",
        label: "Euler a",
        a1111: Some("Euler a"),
        aliases: &["k_euler_a", "k_euler_ancestral"],
        class: Some(SchedulerClass::EulerAncestralDiscrete),
    },
    SamplerInfo {
        name: "euler",
        label: "Euler",
        a1111: Some("Euler"),
        aliases: &["k_euler"],
        class: Some(SchedulerClass::EulerDiscrete),
    },
    SamplerInfo {
        name: "dpm++2m",
        label: "DPM++ 2M",
        a1111: Some("DPM++ 2M"),
        aliases: &["k_dpmpp_2m"],
        class: Some(SchedulerClass::DpmSolverMultistep),
    },
    SamplerInfo {
        name: "ddim",
        label: "DDIM",
        a1111: Some("DDIM"),
        aliases: &[],
        class: Some(SchedulerClass::Ddim),
    },
    SamplerInfo {
        name: "ddpm",
        label: "DDPM",
        a1111: Some("DDPM"),
        aliases: &[],
        class: Some(SchedulerClass::Ddpm),
    },
];

/// A sampler by its native name.
pub fn sampler_by_name(name: &str) -> Option<&'static SamplerInfo> {
    SAMPLERS.iter().find(|s| s.name == name)
}

/// A sampler by an A1111 name: exact, or with a trailing schedule label (`DPM++ 2M Karras`),
/// which is dropped (this server has only each sampler's own spacing, A1111's `Automatic`).
pub fn sampler_by_a1111_name(name: &str) -> Option<&'static SamplerInfo> {
    let find = |n: &str| SAMPLERS.iter().find(|s| s.a1111 == Some(n));
    find(name).or_else(|| {
        let labels = [
            "Automatic",
            "Uniform",
            "Karras",
            "Exponential",
            "Polyexponential",
            "SGM Uniform",
            "KL Optimal",
            "Align Your Steps",
            "Simple",
            "Normal",
            "DDIM",
            "Beta",
        ];
        labels
            .iter()
            .find_map(|l| name.strip_suffix(l).map(str::trim_end))
            .and_then(find)
    })
}

/// A random seed in A1111's range `[0, 4294967294)`.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() % 4_294_967_294
}

/// What a request may ask for, checked before it is queued.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The longest output side in pixels.
    pub max_side: usize,
    /// The most decoder or prior steps.
    pub max_steps: usize,
    /// The most images per request.
    pub max_images: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_side: 2048,
            max_steps: 500,
            max_images: 8,
        }
    }
}

impl Limits {
    /// Checks a request's size, steps and image count.
    pub fn check(
        &self,
        width: Option<usize>,
        height: Option<usize>,
        steps: usize,
        prior_steps: usize,
        images: usize,
    ) -> Result<(), ApiError> {
        for (name, v) in [("width", width), ("height", height)] {
            if let Some(v) = v {
                if v == 0 || v > self.max_side {
                    return Err(ApiError::bad_request(format!(
                        "{name} {v} is out of range: 1 to {} pixels",
                        self.max_side
                    )));
                }
            }
        }
        for (name, v) in [("steps", steps), ("prior_steps", prior_steps)] {
            if v == 0 || v > self.max_steps {
                return Err(ApiError::bad_request(format!(
                    "{name} {v} is out of range: 1 to {}",
                    self.max_steps
                )));
            }
        }
        if images == 0 || images > self.max_images {
            return Err(ApiError::bad_request(format!(
                "{images} images requested: 1 to {} per request",
                self.max_images
            )));
        }
        Ok(())
    }
}

/// How a server starts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--model` values (`[NAME=]SPEC`); empty: the shipped small model.
    pub models: Vec<String>,
    /// The prior of models given as directories or hub ids.
    pub prior: Option<String>,
    /// Waiting jobs before `429`.
    pub queue: usize,
    /// Every API call needs `Authorization: Bearer <token>` when set.
    pub api_token: Option<String>,
    /// How models load (dtype, device).
    pub load: LoadOptions,
    /// Pipelines kept in memory at once.
    pub max_loaded: usize,
    /// Request limits.
    pub limits: Limits,
    /// Whether the server listens beyond loopback (reported by A1111's `cmd-flags`).
    pub public: bool,
    /// The port (reported by A1111's `cmd-flags`).
    pub port: u16,
    /// Follow symlinks in model directories that lead outside them (refused when false).
    pub follow_symlinks: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            prior: None,
            queue: 16,
            api_token: None,
            load: LoadOptions::default(),
            max_loaded: 2,
            limits: Limits::default(),
            public: false,
            port: 7860,
            follow_symlinks: false,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    /// The models.
    pub catalog: Arc<Catalog>,
    /// The job queue.
    pub queue: Arc<Queue>,
    /// Request limits.
    pub limits: Limits,
    token: Option<String>,
    current_model: Mutex<String>,
    options: Mutex<Map<String, Value>>,
    /// Whether the server listens beyond loopback.
    pub listening_publicly: bool,
    /// The port.
    pub port: u16,
}

impl AppState {
    /// Queues work, or `429` with `Retry-After` when the queue is full.
    pub fn submit(&self, work: Work) -> Result<Arc<Job>, ApiError> {
        self.queue.submit(work).map_err(|e| match e {
            SubmitError::Full(_) => ApiError::queue_full(e.to_string(), self.queue.retry_after()),
        })
    }

    /// The A1111 current model (`sd_model_checkpoint`).
    pub fn current_model(&self) -> String {
        self.current_model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets the A1111 current model.
    pub fn set_current_model(&self, name: String) {
        *self.current_model.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    /// The model an A1111 checkpoint title names (its name, or the name with a ` [hash]`).
    pub fn model_by_title(&self, title: &str) -> Option<String> {
        let bare = title.split(" [").next().unwrap_or(title).trim();
        self.catalog
            .models
            .iter()
            .find(|m| m.name == title || m.name == bare)
            .map(|m| m.name.clone())
    }

    /// The stored A1111 options.
    pub fn options(&self) -> Map<String, Value> {
        self.options
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stores A1111 options (other than the model, which is [`Self::set_current_model`]).
    pub fn store_options(&self, values: Map<String, Value>) {
        let mut o = self.options.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in values {
            if k != "sd_model_checkpoint" {
                o.insert(k, v);
            }
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The models.
    #[error(transparent)]
    Catalog(#[from] Box<catalog::CatalogError>),
    /// The socket.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A started server: the models checked, the worker running.
pub struct Server {
    state: Arc<AppState>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Checks the models (configs only: weights load on first use) and starts the worker.
    pub fn start(config: ServerConfig) -> Result<Self, ServerError> {
        let catalog = Arc::new(
            Catalog::from_specs(
                &config.models,
                config.prior.as_deref(),
                config.follow_symlinks,
            )
            .map_err(Box::new)?,
        );
        let queue = Queue::new(config.queue);
        let worker = jobs::spawn_worker(
            queue.clone(),
            catalog.clone(),
            config.load.clone(),
            config.max_loaded,
        );
        let mut options = Map::new();
        for (k, v) in [
            ("samples_format", Value::from("png")),
            ("sd_checkpoint_hash", Value::Null),
            ("sd_vae", Value::from("Automatic")),
            ("CLIP_stop_at_last_layers", Value::from(1)),
            ("show_progress_every_n_steps", Value::from(10)),
        ] {
            options.insert(k.into(), v);
        }
        let first = catalog.names().first().cloned().unwrap_or_default();
        Ok(Self {
            state: Arc::new(AppState {
                catalog,
                queue,
                limits: config.limits,
                token: config.api_token,
                current_model: Mutex::new(first),
                options: Mutex::new(options),
                listening_publicly: config.public,
                port: config.port,
            }),
            worker: Some(worker),
        })
    }

    /// The shared state (models, queue).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves on `listener` until Ctrl-C, then stops the worker.
    pub async fn serve(mut self, listener: tokio::net::TcpListener) -> Result<(), ServerError> {
        let app = self.router();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        self.shut_down();
        Ok(())
    }

    fn shut_down(&mut self) {
        self.state.queue.shut_down();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.queue.shut_down();
    }
}

/// `Authorization: Bearer <token>` on API routes (or `?token=` for the browser's EventSource).
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    let header_ok = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == token);
    let query_ok = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.strip_prefix("token=").is_some_and(|t| t == token))
    });
    if header_ok || query_ok {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server needs `Authorization: Bearer <token>` (started with --api-token)",
        )
        .into_response()
    }
}

/// Refuses a body whose declared length is over [`MAX_BODY_BYTES`] before reading it (bodies
/// without a length are cut at the limit by the extractors).
async fn limit_body(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        let mut response = ApiError::too_large(format!(
            "the request body is larger than the server's limit ({} MiB)",
            MAX_BODY_BYTES >> 20
        ))
        .into_response();
        // The unread body would otherwise have to be drained first.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    next.run(request).await
}

/// Every route: the page, the native API, the A1111 API.
pub fn router(state: Arc<AppState>) -> Router {
    use a1111 as a;
    let native = Router::new()
        .route("/api/v1/models", get(api::models))
        .route("/api/v1/samplers", get(api::samplers))
        .route("/api/v1/jobs", post(api::submit))
        .route("/api/v1/jobs/{id}", get(api::job).delete(api::cancel))
        .route("/api/v1/jobs/{id}/events", get(api::events))
        .route("/api/v1/openapi.json", get(api::openapi));
    let sdapi = Router::new()
        .route("/sdapi/v1/txt2img", post(a::txt2img))
        .route("/sdapi/v1/img2img", post(a::img2img))
        .route("/sdapi/v1/progress", get(a::progress))
        .route("/sdapi/v1/interrupt", post(a::interrupt))
        .route("/sdapi/v1/skip", post(a::skip))
        .route("/sdapi/v1/sd-models", get(a::sd_models))
        .route("/sdapi/v1/samplers", get(a::samplers))
        .route("/sdapi/v1/schedulers", get(a::schedulers))
        .route(
            "/sdapi/v1/options",
            get(a::get_options).post(a::set_options),
        )
        .route("/sdapi/v1/scripts", get(a::scripts))
        .route("/sdapi/v1/cmd-flags", get(a::cmd_flags))
        .route("/sdapi/v1/upscalers", get(a::upscalers))
        .route(
            "/sdapi/v1/latent-upscale-modes",
            get(a::latent_upscale_modes),
        )
        .route("/sdapi/v1/embeddings", get(a::embeddings))
        .route("/sdapi/v1/refresh-checkpoints", post(a::null))
        .route("/sdapi/v1/refresh-vae", post(a::null))
        .route("/sdapi/v1/refresh-loras", post(a::null));
    let sdapi = [
        "loras",
        "sd-vae",
        "hypernetworks",
        "face-restorers",
        "realesrgan-models",
        "prompt-styles",
    ]
    .into_iter()
    .fold(sdapi, |r, name| {
        r.route(&format!("/sdapi/v1/{name}"), get(a::empty_list))
    });
    let apis = native
        .merge(sdapi)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(limit_body));
    Router::new()
        .merge(web::routes())
        .merge(apis)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"detail": "Not Found"})),
            )
        })
        .with_state(state)
}
