//! Where a run's state comes from when the coordinator names a committed step: this node's
//! copy of its checkpoint, a peer that holds one, or nothing (a fresh start). The decision is
//! a pure function of what this node's copy holds, tested on hand-built cases.

/// What this node has of the checkpoint the coordinator named.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Copy {
    /// The coordinator named no checkpoint (nothing committed yet, or none on this node).
    NotNamed,
    /// A valid checkpoint of this step.
    Holds(u64),
    /// Missing files or a failed checksum.
    Damaged,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ResumePlan {
    Fresh,
    /// Load this node's copy.
    UseCopy,
    /// Receive the weights and optimizer state of this step from a rank that has them.
    Receive(u64),
    /// Alone, with a copy of another step: refuse rather than train from the wrong state.
    WrongStep {
        holds: u64,
    },
    /// Alone, with a damaged copy: refuse with the copy's own error.
    Damaged,
}

/// Decides how a trainer resumes at the committed `step`. In a group, a missing, damaged
/// or stale copy costs a transfer from a peer, never the run.
pub(crate) fn plan_committed(step: u64, copy: Copy, in_group: bool) -> ResumePlan {
    match (copy, in_group) {
        (Copy::Holds(holds), _) if holds == step => ResumePlan::UseCopy,
        (Copy::NotNamed, _) if step == 0 => ResumePlan::Fresh,
        (Copy::NotNamed, _) | (_, true) => ResumePlan::Receive(step),
        (Copy::Holds(holds), false) => ResumePlan::WrongStep { holds },
        (Copy::Damaged, false) => ResumePlan::Damaged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_good_copy_is_loaded_and_nothing_committed_starts_fresh() {
        assert_eq!(
            plan_committed(40, Copy::Holds(40), false),
            ResumePlan::UseCopy
        );
        assert_eq!(
            plan_committed(40, Copy::Holds(40), true),
            ResumePlan::UseCopy
        );
        assert_eq!(plan_committed(0, Copy::NotNamed, true), ResumePlan::Fresh);
        assert_eq!(plan_committed(0, Copy::NotNamed, false), ResumePlan::Fresh);
    }

    #[test]
    fn in_a_group_a_missing_damaged_or_stale_copy_is_received_from_a_peer() {
        for copy in [Copy::NotNamed, Copy::Damaged, Copy::Holds(30)] {
            assert_eq!(
                plan_committed(40, copy, true),
                ResumePlan::Receive(40),
                "{copy:?}"
            );
        }
    }

    #[test]
    fn alone_a_damaged_or_stale_copy_is_refused() {
        assert_eq!(
            plan_committed(40, Copy::Holds(30), false),
            ResumePlan::WrongStep { holds: 30 }
        );
        assert_eq!(
            plan_committed(40, Copy::Damaged, false),
            ResumePlan::Damaged
        );
    }
}
