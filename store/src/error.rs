use std::path::PathBuf;

/// Errors of object storage and the local cache. Each names the object (by URL) or file
/// and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store answered, or could not be reached, for `url`.
    #[error("{url}: {message}")]
    Remote { url: String, message: String },
    /// An object that does not match what its manifest records, after one refetch.
    #[error("{url}: {message}")]
    Corrupt { url: String, message: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bad URL, credentials file or setting.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Data(#[from] lillm_data::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// `e`, from an operation on `url`, as one sentence a user can act on: wrong
    /// credentials, a missing bucket and an unreachable endpoint each say so.
    pub fn remote(url: &str, e: object_store::Error) -> Self {
        let chain = error_chain(&e);
        let message = match &e {
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => access_denied(&chain),
            _ if is_access_denied(&chain) => access_denied(&chain),
            _ if chain.contains("NoSuchBucket") => {
                "the bucket does not exist: create it, or fix the bucket in the URL".into()
            }
            object_store::Error::NotFound { .. } => "no such object".into(),
            _ if is_unreachable(&chain) => format!(
                "cannot reach the object store ({chain}); check the endpoint (AWS_ENDPOINT_URL, or endpoint_url in the credentials file) and that the service is up"
            ),
            _ => chain,
        };
        Error::Remote {
            url: url.to_string(),
            message,
        }
    }

    /// Whether this is the store saying the object is not there.
    pub fn is_not_found(e: &object_store::Error) -> bool {
        matches!(e, object_store::Error::NotFound { .. })
            && !error_chain(e).contains("NoSuchBucket")
    }
}

fn access_denied(chain: &str) -> String {
    format!(
        "access denied ({chain}); check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the file --credentials-file names) and their permissions on the bucket"
    )
}

fn is_access_denied(chain: &str) -> bool {
    [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403 Forbidden",
    ]
    .iter()
    .any(|code| chain.contains(code))
}

fn is_unreachable(chain: &str) -> bool {
    [
        "error sending request",
        "Connection refused",
        "dns error",
        "timed out",
        "connect",
    ]
    .iter()
    .any(|sign| chain.contains(sign))
}

/// The error and its sources, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
