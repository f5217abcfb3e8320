/// Errors of the trainer's side of a batch stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] lillm_data::Error),
    /// Talking to a dataloader or the coordinator failed (after the retry policy).
    #[error("dataloader stream: {0}")]
    Network(#[from] lillm_proto::net::NetError),
    /// A dataloader answered with something a trainer cannot use.
    #[error("dataloader stream: {0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, Error>;
