//! When the training loop evaluates, checkpoints and logs: its rules as pure functions of
//! the step and the job's intervals, tested on hand-built values (the loop only asks).

use crate::config::JobConfig;
use crate::metrics::Reopen;

/// The job's intervals, as the loop reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub max_iters: u64,
    pub eval_interval: u64,
    pub log_interval: u64,
    /// Checkpoints apart from evaluations every this many steps (0: none).
    pub checkpoint_interval: u64,
    /// The ranks compare parameters every this many steps (0: never).
    pub check_params_every: u64,
}

impl Cadence {
    pub fn of(job: &JobConfig) -> Self {
        Self {
            max_iters: job.max_iters,
            eval_interval: job.eval_interval,
            log_interval: job.log_interval,
            checkpoint_interval: job.checkpoint_interval,
            check_params_every: job.check_params_every,
        }
    }

    /// Whether the ranks compare parameters before stepping from `step` (so a failure
    /// leaves every rank at a logged step).
    pub fn checks_params(&self, step: u64) -> bool {
        let every = self.check_params_every;
        every > 0 && step > 0 && step.is_multiple_of(every)
    }

    /// Whether the run evaluates before stepping from `step`: at every eval interval and at
    /// the end, once (`evaluated`: this step already was, e.g. before a resume).
    pub fn evaluates(&self, step: u64, evaluated: bool) -> bool {
        !evaluated && (step.is_multiple_of(self.eval_interval) || step >= self.max_iters)
    }

    /// Whether the step that reaches `next` closes a log window.
    pub fn logs_at(&self, next: u64) -> bool {
        next.is_multiple_of(self.log_interval) || next == self.max_iters
    }

    /// Whether a checkpoint apart from the evaluations is written at `step`: every
    /// `checkpoint_interval` steps or when one is due by time (`by_time`), never at a step
    /// this run started from (it has its checkpoint), at the end (the final one is written
    /// anyway) or twice at one step (`saved_here`).
    pub fn interim_checkpoint(
        &self,
        step: u64,
        started_at: u64,
        saved_here: bool,
        by_time: bool,
    ) -> bool {
        let by_steps =
            self.checkpoint_interval > 0 && step.is_multiple_of(self.checkpoint_interval);
        step > started_at && step < self.max_iters && !saved_here && (by_steps || by_time)
    }
}

/// Whether a checkpoint is due by time: `minutes` (0: never) have passed since the last one.
pub fn timed_checkpoint_due(minutes: f64, since_last_s: f64) -> bool {
    minutes > 0.0 && since_last_s >= minutes * 60.0
}

/// Whether the run writes a checkpoint when its loop ends at `step`: unless one was just
/// written there, on the ranks that write, and not for a run stopped before its first step
/// (it has nothing to save).
pub fn final_checkpoint_due(saved_here: bool, writes: bool, step: u64, stopped: bool) -> bool {
    !saved_here && writes && (step > 0 || !stopped)
}

/// How rank 0 opens the metrics log: fresh; after a resume in one process, dropping what
/// it will redo; or, in a group (any generation after the first), keeping every record.
pub fn reopen_log(step: u64, evaluated_at_step: bool, generation: u64) -> Reopen {
    let resumed = step > 0 || evaluated_at_step;
    match (resumed, generation > 0) {
        (true, true) => Reopen::Keep,
        (true, false) => Reopen::After(step),
        (false, _) => Reopen::Fresh,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: Cadence = Cadence {
        max_iters: 100,
        eval_interval: 20,
        log_interval: 10,
        checkpoint_interval: 15,
        check_params_every: 25,
    };

    #[test]
    fn parameters_are_compared_every_interval_but_not_before_the_first_step() {
        let at: Vec<u64> = (0..=100).filter(|&s| C.checks_params(s)).collect();
        assert_eq!(at, vec![25, 50, 75, 100]);
        let never = Cadence {
            check_params_every: 0,
            ..C
        };
        assert!(!(0..=100).any(|s| never.checks_params(s)));
    }

    #[test]
    fn timed_checkpoints_after_the_minutes_and_never_at_zero() {
        assert!(!timed_checkpoint_due(10.0, 599.0));
        assert!(timed_checkpoint_due(10.0, 600.0));
        assert!(!timed_checkpoint_due(0.0, 1e9));
    }

    #[test]
    fn the_end_is_checkpointed_once_by_the_writers_unless_nothing_ran() {
        assert!(final_checkpoint_due(false, true, 40, false));
        assert!(
            final_checkpoint_due(false, true, 40, true),
            "stopped early: saved"
        );
        assert!(!final_checkpoint_due(true, true, 40, false), "just saved");
        assert!(
            !final_checkpoint_due(false, false, 40, false),
            "not a writer"
        );
        assert!(
            !final_checkpoint_due(false, true, 0, true),
            "stopped before step 1"
        );
        assert!(
            final_checkpoint_due(false, true, 0, false),
            "max_iters = 0 still saves"
        );
    }

    #[test]
    fn evaluations_at_intervals_and_the_end_once_each() {
        let at: Vec<u64> = (0..=100).filter(|&s| C.evaluates(s, false)).collect();
        assert_eq!(at, vec![0, 20, 40, 60, 80, 100]);
        assert!(!C.evaluates(40, true), "a resumed step evaluated already");
        let odd_end = Cadence { max_iters: 95, ..C };
        assert!(odd_end.evaluates(95, false));
    }

    #[test]
    fn logs_close_at_intervals_and_at_the_last_step() {
        let at: Vec<u64> = (1..=95)
            .filter(|&n| Cadence { max_iters: 95, ..C }.logs_at(n))
            .collect();
        assert_eq!(at, vec![10, 20, 30, 40, 50, 60, 70, 80, 90, 95]);
    }

    #[test]
    fn interim_checkpoints_by_steps_or_time_but_not_where_one_exists() {
        let at: Vec<u64> = (0..=100)
            .filter(|&s| C.interim_checkpoint(s, 0, false, false))
            .collect();
        assert_eq!(at, vec![15, 30, 45, 60, 75, 90], "not at 0 nor at the end");
        assert!(!C.interim_checkpoint(30, 30, false, false), "resumed here");
        assert!(
            !C.interim_checkpoint(45, 0, true, false),
            "saved at this step"
        );
        assert!(C.interim_checkpoint(7, 0, false, true), "due by time");
        let none = Cadence {
            checkpoint_interval: 0,
            ..C
        };
        assert!(!none.interim_checkpoint(30, 0, false, false));
    }

    #[test]
    fn the_log_is_kept_in_a_group_and_cut_after_a_resume_alone() {
        assert_eq!(reopen_log(0, false, 0), Reopen::Fresh);
        assert_eq!(reopen_log(0, false, 3), Reopen::Fresh);
        assert_eq!(reopen_log(40, false, 0), Reopen::After(40));
        assert_eq!(reopen_log(0, true, 0), Reopen::After(0));
        assert_eq!(reopen_log(40, false, 2), Reopen::Keep);
    }
}
