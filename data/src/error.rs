use std::path::PathBuf;

/// Errors of reading, writing and preparing data. Each names the file (and line) and says
/// how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad record in a corpus file; `--skip-bad` skips and counts these instead.
    #[error("{path}:{line}: {message}")]
    BadRecord {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn bad_record(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        Error::BadRecord {
            path: path.into(),
            line,
            message: message.into(),
        }
    }
}
