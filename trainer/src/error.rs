use std::path::PathBuf;

/// Errors of the trainer crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] lillm_model::Error),
    #[error(transparent)]
    Data(#[from] lillm_data::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("distributed: {0}")]
    Distributed(String),
    #[error("plot: {0}")]
    Plot(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
