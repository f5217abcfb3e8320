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
    /// A collective (c10d) failed or the group could not form.
    #[error("collective: {0}")]
    Collective(String),
    /// Talking to the coordinator or a dataloader failed (after the retry policy).
    #[error("network: {0}")]
    Network(#[from] lillm_proto::net::NetError),
    /// A dataloader answered with something this trainer cannot use.
    #[error("dataloader stream: {0}")]
    Stream(String),
    /// Talking to the coordinator went wrong in a way the network layer does not cover.
    #[error("job membership: {0}")]
    Membership(String),
    /// The coordinator refused this trainer (token, config fingerprint, job full): starting
    /// it again cannot help.
    #[error("refused by the coordinator at {0}")]
    Refused(String),
    /// The checkpoint writer thread failed outside of an I/O error (it panicked).
    #[error("checkpoint writer: {0}")]
    Writer(String),
    /// A trainer actor's group ended and could not be re-formed in place: its process exits
    /// with [`crate::stop::EXIT_REGROUP`] so its supervisor starts it into the next group.
    #[error("{0}: exiting with status {code} so this trainer is restarted into the next group", code = crate::stop::EXIT_REGROUP)]
    Regroup(crate::stop::StopReason),
    /// The run stopped on request before `max_iters` (see [`crate::stop`]).
    #[error("training stopped: {0}")]
    Stopped(crate::stop::StopReason),
    #[error("plot: {0}")]
    Plot(String),
    /// libtorch's profiler (`--profile-steps`) failed.
    #[error(transparent)]
    Profiler(#[from] lillm_cuda::Error),
    /// Object storage (each message names the object's URL).
    #[error(transparent)]
    Store(#[from] lillm_store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<lillm_c10d::Error> for Error {
    fn from(e: lillm_c10d::Error) -> Self {
        match e {
            lillm_c10d::Error::Collective(m) => Error::Collective(m),
            lillm_c10d::Error::Config(m) => Error::Config(m),
            lillm_c10d::Error::Kernel(m) => Error::Torch(tch::TchError::Torch(m)),
        }
    }
}

impl From<lillm_dataloader::Error> for Error {
    fn from(e: lillm_dataloader::Error) -> Self {
        match e {
            lillm_dataloader::Error::Data(e) => Error::Data(e),
            lillm_dataloader::Error::Network(e) => Error::Network(e),
            lillm_dataloader::Error::Protocol(m) => Error::Stream(m),
        }
    }
}

impl From<lillm_checkpoint::Error> for Error {
    fn from(e: lillm_checkpoint::Error) -> Self {
        use lillm_checkpoint::Error as E;
        match e {
            E::Checkpoint { path, message } => Error::Checkpoint { path, message },
            E::Io { path, source } => Error::Io { path, source },
            E::TokenizerMismatch(m) => Error::Config(m),
            E::Model(e) => Error::Model(e),
            E::Data(e) => Error::Data(e),
            E::Torch(e) => Error::Torch(e),
        }
    }
}

impl Error {
    /// Whether running the same process again cannot succeed (exit with
    /// [`crate::stop::EXIT_FATAL`] so that no supervisor retries it).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Config(_) | Error::Refused(_) | Error::Store(lillm_store::Error::Usage(_))
        )
    }

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
