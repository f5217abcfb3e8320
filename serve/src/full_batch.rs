//! When the batch is full and requests wait, the server says so and names the setting: a
//! user who opens more streams than `--max-batch` otherwise sees only a time to first token
//! that grows (the queue length is in `/metrics`, but nobody reads it before they wonder).

use std::time::{Duration, Instant};

/// The least time between two notices: a server that stays full says so again, not at
/// every step.
const REPEAT_AFTER: Duration = Duration::from_secs(600);

/// Decides when to tell the operator that requests wait for a place in the batch.
#[derive(Debug, Default)]
pub(crate) struct FullBatchNotice {
    last: Option<Instant>,
}

impl FullBatchNotice {
    /// The line to print when `waiting` requests wait behind a batch of `max_batch` at
    /// `now`: the first time, and then at most once per [`REPEAT_AFTER`].
    pub(crate) fn check(
        &mut self,
        waiting: usize,
        max_batch: usize,
        now: Instant,
    ) -> Option<String> {
        if waiting == 0 {
            return None;
        }
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REPEAT_AFTER)
        {
            return None;
        }
        self.last = Some(now);
        let requests = if waiting == 1 {
            "request waits"
        } else {
            "requests wait"
        };
        Some(format!(
            "serve: the batch is full (--max-batch {max_batch}) and {waiting} {requests} for a \
             place, so their first token comes later; a larger --max-batch \
             decodes more at once (its KV cache is allocated at start). The queue's length is \
             lillm_serve_queue_length in /metrics"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_is_reported_once_then_again_only_after_a_while() {
        let start = Instant::now();
        let mut notice = FullBatchNotice::default();
        assert_eq!(
            notice.check(0, 16, start),
            None,
            "nobody waits: nothing to say"
        );
        let first = notice
            .check(3, 16, start)
            .expect("the first wait is reported");
        assert!(
            first.contains("--max-batch")
                && first.contains("--max-batch 16)")
                && first.contains("3 requests wait"),
            "{first}"
        );
        // A busy server stays full for many steps: one line, not one per step.
        let later = start + Duration::from_secs(5);
        assert_eq!(notice.check(9, 16, later), None);
        let much_later = start + REPEAT_AFTER + Duration::from_secs(1);
        let again = notice.check(1, 16, much_later).expect("reported again");
        assert!(again.contains("1 request waits"), "{again}");
    }
}
