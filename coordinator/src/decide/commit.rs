//! The commit rule: which member may report a checkpoint, what a report of the last
//! committed step means, and when a step has enough copies to be committed.

use std::collections::BTreeMap;

use super::{Action, Outcome, Refusal};
use crate::state::{Commit, MemberId, Phase, Role, State};

/// A checkpoint writer reports its copy of `step` at `path`: the step is committed once
/// enough nodes hold it ([`State::copies_needed`], or one copy in object storage).
pub(super) fn commit(
    state: &mut State,
    id: MemberId,
    generation: u64,
    step: u64,
    path: String,
    val_loss: Option<f64>,
) -> Outcome {
    if let Some(refusal) = commit_refusal(state, &id, generation) {
        return Outcome::refuse(refusal);
    }
    let node = id.node.clone();
    if let Some(last) = state.last_commit.as_mut() {
        if let Some(outcome) = report_of_last_commit(last, step, &node, &path) {
            return outcome;
        }
    }
    let needed = match in_object_store(&path) {
        true => 1,
        false => state.copies_needed(),
    };
    let copies = add_pending_copy(
        &mut state.pending_commits,
        generation,
        step,
        node.clone(),
        path,
        val_loss,
    );
    if copies < needed {
        // Bounded: a copy that never comes (its writer died) must not grow the state.
        let excess = state
            .pending_commits
            .len()
            .saturating_sub(PENDING_COMMITS_KEPT);
        state.pending_commits.drain(..excess);
        return Outcome::changed(format!("step {step}: copy {copies} of {needed}, on {node}"));
    }
    let at = state.pending_commits.partition_point(|c| c.step < step);
    let commit = state.pending_commits[at].clone();
    state.pending_commits.retain(|c| c.step > step);
    state.last_commit = Some(commit.clone());
    Outcome {
        actions: vec![Action::Committed(commit)],
        refusal: None,
        reason: format!("committed step {step} ({copies} copies)"),
    }
}

/// Why `id` may not commit in `generation`: only a checkpoint writer of the running
/// generation may.
fn commit_refusal(state: &State, id: &MemberId, generation: u64) -> Option<Refusal> {
    if generation != state.generation || state.phase != Phase::Running {
        return Some(Refusal::StaleGeneration {
            given: generation,
            current: state.generation,
        });
    }
    let writers = state.checkpoint_writers();
    match state.members.get(id) {
        None => Some(Refusal::UnknownMember(id.clone())),
        Some(m) if m.id.role != Role::Trainer || !m.rank.is_some_and(|r| writers.contains(&r)) => {
            Some(Refusal::NotLeader(id.clone()))
        }
        Some(_) => None,
    }
}

/// What a report of a step at or before the last commit means: a retry of a copy already
/// counted, a late copy of it from another node (added), or a step going back (refused).
/// `None` for a later step.
fn report_of_last_commit(last: &mut Commit, step: u64, node: &str, path: &str) -> Option<Outcome> {
    if step == last.step {
        let known = last.copies.get(node);
        // A retry whose reply was lost (say, the coordinator restarted after saving it).
        if known.is_some_and(|p| p == path) || (last.copies.is_empty() && last.path == path) {
            return Some(Outcome::changed(format!(
                "step {step} was already committed"
            )));
        }
        // A late copy of a durable checkpoint, from a node without one.
        if known.is_none() && !last.copies.is_empty() {
            last.copies.insert(node.to_string(), path.to_string());
            return Some(Outcome::changed(format!(
                "step {step}: another copy, on {node}"
            )));
        }
    }
    (step <= last.step).then(|| {
        Outcome::refuse(Refusal::StepRegress {
            given: step,
            committed: last.step,
        })
    })
}

/// Adds `node`'s copy of `step` to the commits waiting for copies (oldest first; the first
/// copy of a step inserts it in order) and returns how many copies that step now has.
fn add_pending_copy(
    pending_commits: &mut Vec<Commit>,
    generation: u64,
    step: u64,
    node: String,
    path: String,
    val_loss: Option<f64>,
) -> usize {
    let at = pending_commits.partition_point(|c| c.step < step);
    if pending_commits.get(at).is_none_or(|c| c.step != step) {
        let first = Commit {
            step,
            path: path.clone(),
            generation,
            val_loss,
            copies: BTreeMap::new(),
        };
        pending_commits.insert(at, first);
    }
    let pending = &mut pending_commits[at];
    pending.copies.insert(node, path);
    pending.val_loss = pending.val_loss.or(val_loss);
    pending.copies.len()
}

/// Whether a checkpoint's path is a bucket URL (`s3://…`): a copy in object storage is
/// durable by itself, so it commits the step without a second node's copy.
fn in_object_store(path: &str) -> bool {
    path.contains("://")
}

/// Checkpoints waiting for their second copy that the state keeps.
const PENDING_COMMITS_KEPT: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    fn last(step: u64, copies: &[(&str, &str)]) -> Commit {
        Commit {
            step,
            path: "a/step".into(),
            generation: 1,
            val_loss: None,
            copies: copies
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_report_of_the_last_step_is_a_retry_a_late_copy_or_refused() {
        let durable = last(200, &[("node-a", "a/step"), ("node-b", "b/step")]);
        // The same copy again (its reply was lost): accepted, nothing changes.
        let mut c = durable.clone();
        let retry = report_of_last_commit(&mut c, 200, "node-b", "b/step").unwrap();
        assert!(retry.refusal.is_none() && retry.actions.is_empty());
        assert_eq!(c, durable);
        // A copy from a node that had none is added.
        let late = report_of_last_commit(&mut c, 200, "node-c", "c/step").unwrap();
        assert!(late.refusal.is_none(), "{}", late.reason);
        assert_eq!(c.copies.get("node-c").map(String::as_str), Some("c/step"));
        // Another path from a node that has a copy, or an earlier step: going back.
        for (step, node) in [(200, "node-a"), (150, "node-d")] {
            let mut c = durable.clone();
            let back = report_of_last_commit(&mut c, step, node, "elsewhere").unwrap();
            assert_eq!(
                back.refusal,
                Some(Refusal::StepRegress {
                    given: step,
                    committed: 200
                })
            );
            assert_eq!(c, durable);
        }
        // A later step is not about the last commit.
        assert!(report_of_last_commit(&mut c, 201, "node-a", "a/201").is_none());
    }

    #[test]
    fn a_commit_restored_without_copies_takes_its_own_path_as_a_retry() {
        // A state saved before copies were recorded knows only rank 0's path.
        let mut c = last(100, &[]);
        let retry = report_of_last_commit(&mut c, 100, "node-a", "a/step").unwrap();
        assert!(retry.refusal.is_none() && retry.actions.is_empty());
        assert!(c.copies.is_empty());
    }

    #[test]
    fn pending_copies_are_kept_per_step_in_step_order() {
        let mut pending = Vec::new();
        let add = |pending: &mut Vec<Commit>, step, node: &str, loss| {
            let path = format!("{node}/{step}");
            add_pending_copy(pending, 1, step, node.into(), path, loss)
        };
        assert_eq!(add(&mut pending, 300, "node-a", None), 1);
        assert_eq!(add(&mut pending, 200, "node-a", None), 1);
        assert_eq!(add(&mut pending, 300, "node-b", Some(2.5)), 2);
        // The same node again replaces its copy.
        assert_eq!(add(&mut pending, 300, "node-b", Some(9.0)), 2);
        let steps: Vec<u64> = pending.iter().map(|c| c.step).collect();
        assert_eq!(steps, [200, 300]);
        let step_300 = &pending[1];
        assert_eq!(step_300.path, "node-a/300", "the first copy's path");
        assert_eq!(step_300.val_loss, Some(2.5), "the first loss reported");
    }
}
