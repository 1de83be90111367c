//! The models a server may use, fixed at start-up: each has a name (what requests give, never a
//! path), a prior and one decoder per kind (text-to-image, inpainting, ControlNet), so one name
//! serves every mode its decoders allow.

use crate::error::ApiError;
use kandinsky::loading::{
    check_confined, preset, resolve_pipeline_dirs, small_decoder_part, small_named_dirs,
    PipelineDirs, SMALL_MODEL_NAMES,
};
use kandinsky::pipelines::auto_pipeline::{
    AutoPipeline, DecoderKind, LoadOptions, ModelInfo, Plan, Request, Version,
};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One named model.
pub struct ModelEntry {
    /// The name requests use.
    pub name: String,
    /// 2.1 or 2.2.
    pub version: Version,
    /// The native image side of its decoders.
    pub native_size: usize,
    /// The prior directory.
    pub prior: PathBuf,
    /// One pipeline per decoder kind, configs only (no weights): they check requests.
    decoders: Vec<(DecoderKind, Mutex<AutoPipeline>)>,
}

impl ModelEntry {
    /// The decoder kinds it has.
    pub fn kinds(&self) -> Vec<DecoderKind> {
        self.decoders.iter().map(|(k, _)| *k).collect()
    }

    fn decoder(&self, kind: DecoderKind) -> Option<&Mutex<AutoPipeline>> {
        self.decoders
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d)
    }

    /// The decoder's configs.
    pub fn info(&self, kind: DecoderKind) -> Option<ModelInfo> {
        self.decoder(kind)
            .map(|d| d.lock().unwrap_or_else(|e| e.into_inner()).info().clone())
    }
}

/// The models, the first being the default.
pub struct Catalog {
    /// The models.
    pub models: Vec<ModelEntry>,
    /// Whether symlinks in model directories may lead outside them.
    follow_symlinks: bool,
}

/// Why the catalog could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A model could not be resolved or read.
    #[error("model '{spec}': {error}")]
    Model {
        /// The `--model` value.
        spec: String,
        /// What went wrong.
        error: kandinsky::Error,
    },
    /// A directory or hub id came without `--prior`.
    #[error("model '{0}' is a directory or hub id: pass --prior too")]
    NoPrior(String),
    /// A model directory holds a symlink that leads outside it.
    #[error(
        "model '{spec}': {error} (the server follows no such link; --follow-symlinks allows them)"
    )]
    Symlink {
        /// The `--model` value.
        spec: String,
        /// The link.
        error: kandinsky::Error,
    },
    /// Two decoders under one name disagree.
    #[error("model name '{name}': {why}")]
    Conflict {
        /// The name.
        name: String,
        /// What disagrees.
        why: String,
    },
}

impl Catalog {
    /// The catalog of `--model` values (`[NAME=]SPEC`, SPEC = `small`, a preset name, a
    /// directory or a hub id; entries with the same name are merged), `prior` applying to
    /// directories and hub ids. No spec: the shipped small model. Unless `follow_symlinks`, a
    /// model directory with a symlink leading outside it is refused (see
    /// [`check_confined`]), here and again before its weights load.
    pub fn from_specs(
        specs: &[String],
        prior: Option<&str>,
        follow_symlinks: bool,
    ) -> Result<Self, CatalogError> {
        let mut catalog = Catalog {
            models: Vec::new(),
            follow_symlinks,
        };
        let specs = if specs.is_empty() {
            vec!["small".to_string()]
        } else {
            specs.to_vec()
        };
        for spec in &specs {
            let (name, what) = match spec.split_once('=') {
                Some((n, w)) if !n.is_empty() && !Path::new(spec).exists() => {
                    (Some(n.to_string()), w)
                }
                _ => (None, spec.as_str()),
            };
            let err = |error| CatalogError::Model {
                spec: spec.clone(),
                error,
            };
            let mut dirs: Vec<PipelineDirs> = Vec::new();
            let default_name;
            if SMALL_MODEL_NAMES.contains(&what) && !Path::new(what).is_dir() {
                default_name = what.to_string();
                for which in [
                    DecoderKind::TextToImage,
                    DecoderKind::Inpaint,
                    DecoderKind::Controlnet,
                ] {
                    if small_decoder_part(what, which).is_some() {
                        dirs.push(small_named_dirs(what, which).map_err(err)?);
                    }
                }
            } else if preset(what).is_some() && !Path::new(what).is_dir() {
                default_name = what.to_string();
                let main = resolve_pipeline_dirs(what, prior)
                    .map_err(err)?
                    .ok_or_else(|| CatalogError::NoPrior(spec.clone()))?;
                dirs.push(main);
                // The sibling inpainting / ControlNet checkpoints join when they are cached.
                for suffix in ["-inpaint", "-controlnet-depth"] {
                    let sibling = format!("{what}{suffix}");
                    if preset(&sibling).is_some() {
                        if let Ok(Some(d)) = resolve_pipeline_dirs(&sibling, prior) {
                            dirs.push(d);
                        }
                    }
                }
            } else {
                default_name = Path::new(what)
                    .file_name()
                    .map_or(what.to_string(), |n| n.to_string_lossy().into_owned());
                dirs.push(
                    resolve_pipeline_dirs(what, prior)
                        .map_err(err)?
                        .ok_or_else(|| CatalogError::NoPrior(spec.clone()))?,
                );
            }
            let name = name.unwrap_or(default_name);
            for d in dirs {
                if !follow_symlinks {
                    for dir in [&d.decoder, &d.prior] {
                        check_confined(dir).map_err(|error| CatalogError::Symlink {
                            spec: spec.clone(),
                            error,
                        })?;
                    }
                }
                let pipe =
                    AutoPipeline::from_pretrained(&d.decoder, &d.prior, LoadOptions::default())
                        .map_err(err)?;
                catalog.add(&name, pipe)?;
            }
        }
        Ok(catalog)
    }

    fn add(&mut self, name: &str, pipe: AutoPipeline) -> Result<(), CatalogError> {
        let info = pipe.info().clone();
        let conflict = |why: String| CatalogError::Conflict {
            name: name.into(),
            why,
        };
        match self.models.iter_mut().find(|m| m.name == name) {
            None => self.models.push(ModelEntry {
                name: name.into(),
                version: info.version,
                native_size: info.native_size,
                prior: info.prior_dir.clone(),
                decoders: vec![(info.kind, Mutex::new(pipe))],
            }),
            Some(m) => {
                if m.version != info.version || m.prior != info.prior_dir {
                    return Err(conflict(format!(
                        "{} does not share the version and prior of the decoders already named so",
                        info.decoder_dir.display()
                    )));
                }
                if m.decoder(info.kind).is_some() {
                    return Err(conflict(format!(
                        "two {:?} decoders ({})",
                        info.kind,
                        info.decoder_dir.display()
                    )));
                }
                m.decoders.push((info.kind, Mutex::new(pipe)));
            }
        }
        Ok(())
    }

    /// The model of that name, or the default.
    pub fn get(&self, name: Option<&str>) -> Result<&ModelEntry, ApiError> {
        match name.filter(|n| !n.is_empty()) {
            None => self
                .models
                .first()
                .ok_or_else(|| ApiError::bad_request("the server has no model")),
            Some(n) => self.models.iter().find(|m| m.name == n).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "unknown model '{n}'; this server has: {}",
                    self.names().join(", ")
                ))
            }),
        }
    }

    /// The model names.
    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }

    /// The directories of a model's decoder of `kind`, checked for symlinks leading outside
    /// them unless the catalog follows them.
    pub fn dirs(&self, name: &str, kind: DecoderKind) -> kandinsky::Result<PipelineDirs> {
        let info = self
            .models
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| m.info(kind))
            .ok_or_else(|| {
                kandinsky::Error::InvalidArgument(format!("model '{name}' has no {kind:?} decoder"))
            })?;
        if !self.follow_symlinks {
            // Again at load time: the directory may have changed since the server started.
            check_confined(&info.decoder_dir)?;
            check_confined(&info.prior_dir)?;
        }
        Ok(PipelineDirs {
            decoder: info.decoder_dir,
            prior: info.prior_dir,
        })
    }

    /// Checks a request against the model's decoder for its mode (before it is queued).
    pub fn check(&self, model: &ModelEntry, request: &Request) -> Result<Plan, ApiError> {
        let kind = request.mode.decoder_kind();
        let decoder = model.decoder(kind).ok_or_else(|| {
            ApiError::bad_request(format!(
                "model '{}' cannot do this mode: it needs {}, and '{}' has {}",
                model.name,
                kind_name(kind),
                model.name,
                model
                    .kinds()
                    .into_iter()
                    .map(kind_name)
                    .collect::<Vec<_>>()
                    .join(" and ")
            ))
        })?;
        let pipe = decoder.lock().unwrap_or_else(|e| e.into_inner());
        pipe.check(request)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// A decoder kind in words.
pub fn kind_name(kind: DecoderKind) -> &'static str {
    match kind {
        DecoderKind::TextToImage => "a text-to-image decoder",
        DecoderKind::Inpaint => "an inpainting decoder",
        DecoderKind::Controlnet => "a ControlNet decoder",
    }
}
