use std::path::{Path, PathBuf};

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

    /// The error naming `given` where it names `read`: a file read from a local copy (a
    /// bucket object in the node's cache) is reported as the user named it.
    pub fn named_as(self, read: &Path, given: &Path) -> Self {
        let rename = |path: PathBuf| {
            if path == read {
                given.to_path_buf()
            } else {
                path
            }
        };
        match self {
            Error::Io { path, source } => Error::Io {
                path: rename(path),
                source,
            },
            Error::BadRecord {
                path,
                line,
                message,
            } => Error::BadRecord {
                path: rename(path),
                line,
                message,
            },
            Error::Invalid { path, message } => Error::Invalid {
                path: rename(path),
                message,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_about_the_local_copy_names_the_url() {
        let (copy, url) = (
            Path::new("/cache/s3/b/chat.jsonl"),
            Path::new("s3://b/chat.jsonl"),
        );
        let bad = Error::bad_record(copy, 3, "not JSON").named_as(copy, url);
        assert_eq!(bad.to_string(), "s3://b/chat.jsonl:3: not JSON");
        let other = Error::invalid("/elsewhere.jsonl", "empty").named_as(copy, url);
        assert_eq!(other.to_string(), "/elsewhere.jsonl: empty");
    }
}
