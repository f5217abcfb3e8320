//! The one network layer every member of a job uses: [`connect`] (connect timeout, HTTP/2
//! keepalive, TLS from explicit [`ConnectSettings`]), a typed [`NetError`] that says what to
//! do about it ([`Action`]), and the one [`RetryPolicy`] (jittered exponential backoff from
//! `backon`, bounded by a patience). Nobody hand-rolls a retry loop elsewhere.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

/// How members dial each other.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Give up on one connection attempt after this long (the retry policy tries again).
    pub connect_timeout: Duration,
    /// Deadline of each unary call; streams are not bounded by it.
    pub request_timeout: Duration,
    /// HTTP/2 ping period: a peer that vanished without closing its socket is noticed.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection counts as broken.
    pub keepalive_timeout: Duration,
    /// CA certificate (PEM) of the servers' TLS certificates; `None` = plaintext.
    pub tls_ca: Option<PathBuf>,
}

impl Default for ConnectSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(5),
            tls_ca: None,
        }
    }
}

impl ConnectSettings {
    /// The defaults, with TLS when the servers' CA certificate is given (each binary takes
    /// it as `--tls-ca`, or `LILLM_TLS_CA`).
    pub fn with_tls_ca(tls_ca: Option<PathBuf>) -> Self {
        Self {
            tls_ca,
            ..Self::default()
        }
    }
}

/// What a member does about a failed call. Every gRPC code maps to exactly one action
/// ([`action_for`]); the table is in `ARCHITECTURE.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient (peer restarting, network blip, deadline): try again with backoff.
    Retry,
    /// The coordinator no longer knows this member (it was evicted): register again.
    Register,
    /// This member's generation is over: leave the group and join the next one.
    Regroup,
    /// A refusal or a bug (bad token, wrong config, malformed request): stop and say why.
    Fail,
}

/// The action a gRPC status code calls for.
pub fn action_for(code: Code) -> Action {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => Action::Retry,
        Code::NotFound => Action::Register,
        Code::Aborted => Action::Regroup,
        Code::Ok
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => Action::Fail,
    }
}

/// A failed network operation, typed so callers decide by [`NetError::action`], never by
/// matching message text.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{address}` is not a host:port address: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("TLS CA certificate {path}: {reason}")]
    Tls { path: String, reason: String },
    #[error("cannot reach {address}: {cause}")]
    Unreachable { address: String, cause: String },
    #[error("{peer} answered {code:?}: {message}")]
    Status {
        peer: String,
        code: Code,
        message: String,
    },
    #[error("{peer} ended the stream")]
    StreamEnded { peer: String },
    #[error("gave up after {:.0} s trying to {what}: {last}", after.as_secs_f64())]
    GaveUp {
        what: String,
        after: Duration,
        last: Box<NetError>,
    },
}

impl NetError {
    /// A status returned by `peer`.
    pub fn status(peer: &str, status: tonic::Status) -> Self {
        Self::Status {
            peer: peer.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    pub fn action(&self) -> Action {
        match self {
            Self::BadAddress { .. } | Self::Tls { .. } | Self::GaveUp { .. } => Action::Fail,
            Self::Unreachable { .. } | Self::StreamEnded { .. } => Action::Retry,
            Self::Status { code, .. } => action_for(*code),
        }
    }

    /// The gRPC code, for errors that carry one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A lazily connected channel to `address` (`host:port` or a URI): it dials on first use and
/// redials after a failure, so one long-lived client serves every heartbeat and commit.
pub fn channel(address: &str, settings: &ConnectSettings) -> Result<Channel, NetError> {
    Ok(endpoint(address, settings)?.connect_lazy())
}

/// A channel to `address`, connected now (fails fast with [`NetError::Unreachable`]).
pub async fn connect(address: &str, settings: &ConnectSettings) -> Result<Channel, NetError> {
    endpoint(address, settings)?
        .connect()
        .await
        .map_err(|e| NetError::Unreachable {
            address: address.to_string(),
            cause: error_chain(&e),
        })
}

fn endpoint(address: &str, settings: &ConnectSettings) -> Result<Endpoint, NetError> {
    let uri = match (address.contains("://"), settings.tls_ca.is_some()) {
        (true, _) => address.to_string(),
        (false, true) => format!("https://{address}"),
        (false, false) => format!("http://{address}"),
    };
    let mut endpoint = Endpoint::from_shared(uri)
        .map_err(|e| NetError::BadAddress {
            address: address.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(settings.connect_timeout)
        .http2_keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(path) = &settings.tls_ca {
        let tls_error = |reason: String| NetError::Tls {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| tls_error(format!("cannot read: {e}")))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| tls_error(e.to_string()))?;
    }
    Ok(endpoint)
}

/// An error and its causes on one line ("transport error: … : invalid peer certificate").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Bounds a unary call by `settings.request_timeout`; a call that takes longer becomes
/// `DeadlineExceeded` (retried).
pub async fn call<T>(
    peer: &str,
    settings: &ConnectSettings,
    rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, NetError> {
    match tokio::time::timeout(settings.request_timeout, rpc).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(NetError::status(peer, status)),
        Err(_) => Err(NetError::Status {
            peer: peer.to_string(),
            code: Code::DeadlineExceeded,
            message: format!(
                "no answer within {} ms",
                settings.request_timeout.as_millis()
            ),
        }),
    }
}

/// Says when a warning about a condition that persists is due again: at most once per
/// `every`, on tokio's clock, so a long outage logs a line every few seconds, not per try.
#[derive(Debug)]
pub struct WarnEvery {
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl WarnEvery {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// True at the first call and then once `every` has passed since the last true.
    pub fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self.last.is_none_or(|t| now - t >= self.every);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// The one retry policy: exponential backoff from `first_delay`, capped at `max_delay`, each
/// delay plus a random jitter of up to as much again (so members failing together spread
/// out), for at most `patience` after the first failure. Only errors whose action is
/// [`Action::Retry`] are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub patience: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            patience: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Runs `attempt` until it succeeds, fails with an action other than retry, or
    /// `patience` has passed since the first failure ([`NetError::GaveUp`]). Warns at most
    /// every 5 s while retrying. Sleeps on tokio's clock, so tests can move time.
    pub async fn run<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, NetError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, NetError>>,
    {
        let mut delays = ExponentialBuilder::new()
            .with_min_delay(self.first_delay)
            .with_max_delay(self.max_delay)
            .with_jitter()
            .without_max_times()
            .build();
        let mut first_failure = None;
        let mut warn = WarnEvery::new(Duration::from_secs(5));
        loop {
            let err = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) if e.action() != Action::Retry => return Err(e),
                Err(e) => e,
            };
            let now = tokio::time::Instant::now();
            let started = *first_failure.get_or_insert(now);
            let waited = now - started;
            if waited >= self.patience {
                return Err(NetError::GaveUp {
                    what: what.to_string(),
                    after: waited,
                    last: Box::new(err),
                });
            }
            if warn.due() {
                tracing::warn!(cause = %err, "cannot {what} yet; retrying");
            }
            let delay = delays.next().unwrap_or(self.max_delay);
            tokio::time::sleep(delay.min(self.patience - waited)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn unreachable() -> NetError {
        NetError::Unreachable {
            address: "x:1".into(),
            cause: "refused".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let policy = RetryPolicy::default();
        let started = tokio::time::Instant::now();
        let got = policy
            .run("reach x", || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0..=3 => Err(unreachable()),
                    n => Ok(n),
                }
            })
            .await
            .unwrap();
        assert_eq!(got, 4);
        // Four backoffs of at most 2 × (100, 200, 400, 800) ms with jitter.
        assert!(started.elapsed() <= Duration::from_millis(3_000));
        assert!(started.elapsed() >= Duration::from_millis(1_500));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_patience_naming_the_last_error() {
        let policy = RetryPolicy {
            patience: Duration::from_secs(30),
            ..RetryPolicy::default()
        };
        let started = tokio::time::Instant::now();
        let err = policy
            .run("reach the coordinator", || async {
                Err::<(), _>(unreachable())
            })
            .await
            .unwrap_err();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(33),
            "{waited:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("reach the coordinator") && text.contains("refused"),
            "{text}"
        );
        assert_eq!(err.action(), Action::Fail);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_not_retried() {
        let calls = AtomicU32::new(0);
        let err = RetryPolicy::default()
            .run("register", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(NetError::status(
                    "coordinator",
                    tonic::Status::unauthenticated("bad token"),
                ))
            })
            .await
            .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(err.code(), Some(Code::Unauthenticated));
    }

    /// When each attempt of a policy that never succeeds starts, from the first.
    async fn attempt_times(policy: RetryPolicy) -> Vec<Duration> {
        let started = tokio::time::Instant::now();
        let times = std::sync::Mutex::new(Vec::new());
        let _ = policy
            .run("reach x", || async {
                times.lock().unwrap().push(started.elapsed());
                Err::<(), _>(unreachable())
            })
            .await;
        times.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn two_members_failing_together_do_not_retry_in_lockstep() {
        let policy = RetryPolicy {
            patience: Duration::from_secs(20),
            ..RetryPolicy::default()
        };
        let (a, b) = tokio::join!(attempt_times(policy), attempt_times(policy));
        assert_ne!(a, b, "jittered");
        for times in [&a, &b] {
            let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(gaps.len() >= 5, "{gaps:?}");
            // Backoff from the first delay, never past the cap plus its jitter.
            assert!(gaps[0] >= policy.first_delay, "{gaps:?}");
            assert!(gaps.iter().all(|&g| g <= 2 * policy.max_delay), "{gaps:?}");
            // It grows to the cap (the last gap may be cut short by the patience).
            assert!(gaps[0] < 2 * policy.first_delay, "{gaps:?}");
            assert!(gaps.iter().any(|&g| g >= policy.max_delay), "{gaps:?}");
        }
    }

    #[test]
    fn every_code_has_one_action() {
        assert_eq!(action_for(Code::Unavailable), Action::Retry);
        assert_eq!(action_for(Code::NotFound), Action::Register);
        assert_eq!(action_for(Code::Aborted), Action::Regroup);
        assert_eq!(action_for(Code::FailedPrecondition), Action::Fail);
        assert_eq!(action_for(Code::Unauthenticated), Action::Fail);
    }

    #[tokio::test]
    async fn unreachable_addresses_fail_fast_and_are_retryable() {
        let settings = ConnectSettings {
            connect_timeout: Duration::from_millis(500),
            ..ConnectSettings::default()
        };
        // A port nobody listens on: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = connect(&format!("127.0.0.1:{port}"), &settings)
            .await
            .unwrap_err();
        assert_eq!(err.action(), Action::Retry, "{err}");
        let err = connect("not an address", &settings).await.unwrap_err();
        assert!(matches!(err, NetError::BadAddress { .. }), "{err}");
    }
}
