//! Typed errors of the library. Every failure a user can cause (bad paths, bad weights, bad
//! configs, bad parameters) maps to a variant with enough context to fix it.

use std::path::PathBuf;

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory that the model layout requires does not exist.
    #[error("{what} not found: {}", path.display())]
    NotFound {
        /// What was looked for ("model directory", "config file", ...).
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A component directory holds no weight file in any supported format.
    #[error("no weights in {}: expected *.safetensors, *.safetensors.index.json or *.bin", dir.display())]
    NoWeights {
        /// The component directory.
        dir: PathBuf,
    },
    /// A hub id (`org/name`) is not present in the local Hugging Face cache.
    #[error("model '{repo}' is not in the Hugging Face cache {} (no network access is attempted; download it or pass a directory)", cache.display())]
    NotCached {
        /// The hub id.
        repo: String,
        /// The cache directory that was searched.
        cache: PathBuf,
    },
    /// An I/O error while reading a file.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file that does not parse or does not fit the expected schema.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A weight file that is truncated, corrupt or not in the format its name says.
    #[error("invalid weight file {}: {message}", path.display())]
    InvalidWeights {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor the model needs is absent from its weight files.
    #[error("missing tensor '{name}' in {files}")]
    MissingTensor {
        /// The full state-dict name.
        name: String,
        /// The files that were searched.
        files: String,
    },
    /// A tensor exists but has the wrong shape for the configuration.
    #[error("shape mismatch for tensor '{name}' in {}: expected {expected:?}, found {found:?}", file.display())]
    ShapeMismatch {
        /// The full state-dict name.
        name: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape stored in the file.
        found: Vec<usize>,
        /// The file holding the tensor.
        file: PathBuf,
    },
    /// A configuration value this implementation does not support.
    #[error("unsupported config value {key} = {value}")]
    UnsupportedConfig {
        /// The config key.
        key: String,
        /// The offending value.
        value: String,
    },
    /// An invalid argument: a size, a shape or a parameter out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An image could not be read or written.
    #[error("image error for {}: {message}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A failure inside one stage of a pipeline, with what the stage was doing.
    #[error("{what}: {error}")]
    Stage {
        /// What failed, e.g. "loading the prior from models/small/prior".
        what: String,
        /// The underlying error (in the message, not a `source`, so that a chain printer does
        /// not repeat it).
        error: Box<Error>,
    },
    /// A symlink in a model directory leads outside it (refused where links are confined, e.g.
    /// by the server).
    #[error("{} is a symlink to {}, outside the model directory {}", link.display(), target.display(), root.display())]
    SymlinkOutside {
        /// The link.
        link: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// The directory links must stay in.
        root: PathBuf,
    },
    /// The caller's cancellation flag was set; the run stopped between two steps.
    #[error("cancelled")]
    Cancelled,
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps the error with what was being done, e.g. "loading the prior from DIR".
    pub fn within(self, what: impl Into<String>) -> Self {
        Error::Stage {
            what: what.into(),
            error: Box::new(self),
        }
    }

    /// An unsupported config value.
    pub fn unsupported(key: impl Into<String>, value: impl std::fmt::Debug) -> Self {
        Error::UnsupportedConfig {
            key: key.into(),
            value: format!("{value:?}"),
        }
    }
}
