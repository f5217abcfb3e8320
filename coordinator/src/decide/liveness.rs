//! Time passing: members that stopped heartbeating are evicted (unless the coordinator
//! itself was away), an elastic job starts without the missing once its grace has passed,
//! and how often members heartbeat so that a large job's load stays bounded.

use super::{end_generation, replace_shards_of, start_generation, Action, Outcome};
use crate::state::{JobConfig, MemberId, Phase, Role, State};

/// The periodic check: evict the silent (unless the coordinator itself was away), then,
/// while gathering, an elastic start if one is due.
pub(super) fn tick(now_ms: u64, state: &mut State) -> Outcome {
    let checked = match coordinator_was_away(now_ms, state) {
        Some(away) => away,
        None => evict_silent(now_ms, state),
    };
    if !checked.actions.is_empty() || state.phase != Phase::Gathering {
        return checked;
    }
    match elastic(now_ms, state) {
        started if started.reason.is_empty() => checked,
        started => started,
    }
}

/// A tick long after the last one means the coordinator itself was away (frozen, its host
/// stalled): members could not reach it, so their silence proves nothing. Every member gets
/// a full timeout again instead of being evicted, and the running generation goes on.
fn coordinator_was_away(now_ms: u64, state: &mut State) -> Option<Outcome> {
    let last = std::mem::replace(&mut state.last_tick_ms, now_ms);
    let away = now_ms.saturating_sub(last);
    if last == 0 || away <= state.config.heartbeat_timeout_ms / 2 {
        return None;
    }
    for m in state.members.values_mut() {
        m.last_heartbeat_ms = now_ms;
    }
    Some(Outcome::changed(format!(
        "the coordinator was away for {away} ms: every member gets a full heartbeat timeout again"
    )))
}

/// While gathering: note when the first trainer was ready to go, and once the grace period
/// has passed since then start a generation with the trainers that are there, if the job
/// is elastic and they suffice. A coordinator that started before any trainer (pods still
/// pulling their image) was waiting for no one: the first to arrive would otherwise start
/// alone at once, and the next arrival end that generation again.
fn elastic(now_ms: u64, state: &mut State) -> Outcome {
    if state.config.min_nodes.is_none() {
        return Outcome::quiet();
    }
    if state.gathering_since_ms == 0 {
        if state.ready_trainers().next().is_some() {
            state.gathering_since_ms = now_ms;
        }
        return Outcome::quiet();
    }
    if state.elastic_start(now_ms).is_err() {
        return Outcome::quiet();
    }
    let ready = state.ready_trainers().count();
    let action = start_generation(state);
    Outcome {
        reason: format!(
            "elastic: {ready} of {} trainers present after {} ms; a generation of {ready} ranks starts without the others",
            state.config.trainers, state.config.elastic_grace_ms
        ),
        actions: vec![action],
        refusal: None,
    }
}

fn evict_silent(now_ms: u64, state: &mut State) -> Outcome {
    let timeout = state.config.heartbeat_timeout_ms;
    let dead: Vec<MemberId> = state
        .members
        .values()
        .filter(|m| !m.finished && now_ms.saturating_sub(m.last_heartbeat_ms) > timeout)
        .map(|m| m.id.clone())
        .collect();
    if dead.is_empty() {
        return Outcome::quiet();
    }
    let mut replaced = String::new();
    for id in &dead {
        if let Some(m) = state.members.remove(id) {
            if id.role == Role::Dataloader {
                replaced.push_str(&replace_shards_of(state, m.rank));
            }
        }
    }
    state.failures += dead.len() as u64;
    if state.phase == Phase::Running && dead.iter().any(|id| id.role == Role::Trainer) {
        end_generation(state);
    }
    let shown: Vec<String> = dead.iter().take(8).map(|id| id.to_string()).collect();
    let more = match dead.len() > shown.len() {
        true => format!(" and {} more", dead.len() - shown.len()),
        false => String::new(),
    };
    Outcome {
        reason: format!(
            "{} member(s) missed heartbeats for {timeout} ms: {}{more}{replaced}",
            dead.len(),
            shown.join(", ")
        ),
        actions: vec![Action::Evicted(dead)],
        refusal: None,
    }
}

/// Heartbeats the whole job may send per second: members heartbeat less often in a large
/// job, so the coordinator's load stays bounded whatever its size.
pub const HEARTBEATS_PER_SECOND: u64 = 4_000;

/// How often each member heartbeats, sent to it when it registers: eight times per timeout
/// in a small job; in a large one as often as [`HEARTBEATS_PER_SECOND`] allows, but at least
/// three times per timeout.
pub fn heartbeat_interval_ms(config: &JobConfig) -> u64 {
    let members = (config.trainers + config.dataloaders) as u64;
    let budgeted = members * 1_000 / HEARTBEATS_PER_SECOND;
    let timeout = config.heartbeat_timeout_ms;
    budgeted.max(timeout / 8).min(timeout / 3).max(1)
}
