//! How a run is asked to stop: a cancellation token plus the reason. `main` requests
//! [`StopReason::Shutdown`] on SIGTERM/SIGINT; the membership actor requests
//! [`StopReason::Regroup`] when the coordinator ends this trainer's generation. The training
//! loop looks at it between steps (all ranks agree on the step, see `Trainer::run`), so a
//! stop never interrupts libtorch mid-operation; the process ends by returning from `main`.
//! A regroup also aborts the process groups registered with [`Stop::abort_on_regroup`]: a
//! collective stuck on a silent peer would otherwise hold the loop until its timeout.

use std::sync::{Arc, Mutex, OnceLock};

use crate::dist::AbortHandle;

use tokio_util::sync::CancellationToken;

/// Why a run stopped before `max_iters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or Ctrl-C: checkpoint the current step, leave the job, exit 0.
    Shutdown,
    /// Another rank is shutting down: checkpoint the current step with it, then regroup
    /// (the job goes on without, or with a replacement of, the rank that left).
    PeerShutdown,
    /// This trainer's generation `generation` is over (a peer died, left or restarted, as
    /// the coordinator or a failed collective says): leave the group and join the next one
    /// from the same process ([`EXIT_REGROUP`] only if that fails).
    Regroup { generation: u64 },
}

/// Exit status of a trainer whose generation ended (EX_TEMPFAIL: start it again).
pub const EXIT_REGROUP: u8 = 75;

/// Exit status of a process that must not be started again as it is: its configuration is
/// invalid or the coordinator refused it (EX_CONFIG). Supervisors stop instead of
/// restarting it, and Kubernetes' pod failure policy fails the job on it.
pub const EXIT_FATAL: u8 = 78;

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Shutdown => write!(f, "asked to shut down"),
            StopReason::PeerShutdown => write!(f, "another rank is shutting down"),
            StopReason::Regroup { generation } => {
                write!(f, "this trainer's generation ({generation}) is over")
            }
        }
    }
}

/// A request to stop, shared by whoever may ask and the loop that obeys. The first reason
/// given wins; cancelling the process's shutdown token (see [`Stop::new`]) means
/// [`StopReason::Shutdown`].
#[derive(Debug, Clone, Default)]
pub struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    /// The groups a regroup gives up.
    groups: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Stop {
    /// A stop that also fires when `shutdown` (the process's, cancelled by `main` on
    /// SIGTERM) is cancelled.
    pub fn new(shutdown: &CancellationToken) -> Self {
        Self {
            token: shutdown.child_token(),
            reason: Arc::default(),
            groups: Arc::default(),
        }
    }

    pub fn request(&self, reason: StopReason) {
        if self.reason.set(reason).is_ok() {
            tracing::info!(%reason, "stop requested");
        }
        self.token.cancel();
        if matches!(reason, StopReason::Regroup { .. }) {
            for group in self.groups.lock().expect("stop groups lock").iter() {
                group.abort();
            }
        }
    }

    /// Aborts `group` when a regroup is requested (at once, if one already was): the
    /// generation is over, and none of its collectives may wait for a peer any longer.
    pub fn abort_on_regroup(&self, group: AbortHandle) {
        // Under the lock: a regroup requested meanwhile either sees the group or is seen.
        let mut groups = self.groups.lock().expect("stop groups lock");
        if let Some(StopReason::Regroup { .. }) = self.reason.get() {
            group.abort();
        }
        groups.push(group);
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.reason.get() {
            Some(r) => Some(*r),
            None => self.token.is_cancelled().then_some(StopReason::Shutdown),
        }
    }

    /// Whether this generation is over (a regroup was requested).
    pub fn regrouping(&self) -> bool {
        matches!(self.reason(), Some(StopReason::Regroup { .. }))
    }

    /// Cancelled once a stop is requested (for async tasks to select on).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Waits up to `within` for a reason to arrive (a collective failed: did the
    /// coordinator end the generation?).
    pub fn wait_for_reason(&self, within: std::time::Duration) -> Option<StopReason> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(r) = self.reason() {
                return Some(r);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_cancels() {
        let stop = Stop::default();
        let token = stop.token();
        assert_eq!(stop.reason(), None);
        stop.request(StopReason::Regroup { generation: 3 });
        stop.request(StopReason::Shutdown);
        assert!(token.is_cancelled());
        assert_eq!(stop.reason(), Some(StopReason::Regroup { generation: 3 }));
    }

    #[test]
    fn the_process_shutdown_token_means_shutdown() {
        let shutdown = CancellationToken::new();
        let stop = Stop::new(&shutdown);
        assert_eq!(stop.reason(), None);
        shutdown.cancel();
        assert_eq!(stop.reason(), Some(StopReason::Shutdown));
    }
}
