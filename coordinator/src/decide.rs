//! The coordinator's transition function: every rule of membership, ranks, generations,
//! liveness and commits, as `decide(now, &State, Event) -> Decision`.

use std::fmt;

use crate::state::{Commit, Member, MemberId, Phase, Role, State};

/// Something that happened: a request from a member, or time passing.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Register {
        id: MemberId,
        address: String,
        job_token: String,
        config_fingerprint: String,
        /// The last generation this process belonged to; `None` for a freshly started one.
        generation: Option<u64>,
    },
    Heartbeat {
        id: MemberId,
        generation: u64,
        step: u64,
        loss: Option<f64>,
        tokens_per_s: Option<f64>,
    },
    /// Rank 0 reports a checkpoint written completely (its manifest is on disk).
    Commit {
        id: MemberId,
        generation: u64,
        step: u64,
        path: String,
        val_loss: Option<f64>,
    },
    /// Periodic liveness check.
    Tick,
}

/// Why a request was refused; the text is what the member is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    BadToken,
    ConfigMismatch { expected: String, got: String },
    Full { role: Role, expected: usize },
    UnknownMember(MemberId),
    StaleGeneration { given: u64, current: u64 },
    NotLeader(MemberId),
    StepRegress { given: u64, committed: u64 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadToken => write!(f, "wrong or missing job token"),
            Refusal::ConfigMismatch { expected, got } => write!(
                f,
                "config fingerprint {got} differs from the job's {expected}; start every member from the same config"
            ),
            Refusal::Full { role, expected } => write!(
                f,
                "the job already has its {expected} {role:?} member(s); raise --nodes or stop the extra process"
            ),
            Refusal::UnknownMember(id) => write!(f, "{id:?} is not a member; register first"),
            Refusal::StaleGeneration { given, current } => write!(
                f,
                "generation {given} is over (current {current}); re-register to join the new group"
            ),
            Refusal::NotLeader(id) => write!(f, "{id:?} is not rank 0; only rank 0 commits checkpoints"),
            Refusal::StepRegress { given, committed } => write!(
                f,
                "step {given} is not after the last committed step {committed}"
            ),
        }
    }
}

/// What the network layer must tell members.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A new group formed: every member learns its rank (trainers: global rank; dataloaders:
    /// shard index), the c10d store and key prefix, and the step to resume from.
    StartGeneration {
        generation: u64,
        ranks: Vec<(MemberId, usize)>,
        store: String,
        prefix: String,
        resume_step: u64,
    },
    /// These members stopped heartbeating and were dropped; survivors must regroup.
    Evicted(Vec<MemberId>),
    Committed(Commit),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: State,
    pub actions: Vec<Action>,
    pub refusal: Option<Refusal>,
    /// One line saying why, for the log (empty when nothing changed).
    pub reason: String,
}

impl Decision {
    fn refuse(state: &State, refusal: Refusal) -> Self {
        Self {
            state: state.clone(),
            actions: Vec::new(),
            reason: format!("refused: {refusal}"),
            refusal: Some(refusal),
        }
    }
}

/// Applies `event` at time `now_ms` to `state`.
pub fn decide(now_ms: u64, state: &State, event: Event) -> Decision {
    match event {
        Event::Register {
            id,
            address,
            job_token,
            config_fingerprint,
            generation,
        } => {
            if !state.config.job_token.is_empty() && job_token != state.config.job_token {
                return Decision::refuse(state, Refusal::BadToken);
            }
            if config_fingerprint != state.config.config_fingerprint {
                return Decision::refuse(
                    state,
                    Refusal::ConfigMismatch {
                        expected: state.config.config_fingerprint.clone(),
                        got: config_fingerprint,
                    },
                );
            }
            register(now_ms, state, id, address, generation)
        }
        Event::Heartbeat {
            id,
            generation,
            step,
            loss,
            tokens_per_s,
        } => {
            let Some(member) = state.members.get(&id) else {
                return Decision::refuse(state, Refusal::UnknownMember(id));
            };
            if generation < state.generation {
                return Decision::refuse(
                    state,
                    Refusal::StaleGeneration {
                        given: generation,
                        current: state.generation,
                    },
                );
            }
            let mut next = state.clone();
            next.members.insert(
                id,
                Member {
                    last_heartbeat_ms: now_ms,
                    step,
                    loss,
                    tokens_per_s,
                    ..member.clone()
                },
            );
            Decision {
                state: next,
                actions: Vec::new(),
                refusal: None,
                reason: String::new(),
            }
        }
        Event::Commit {
            id,
            generation,
            step,
            path,
            val_loss,
        } => {
            if generation != state.generation || state.phase != Phase::Running {
                return Decision::refuse(
                    state,
                    Refusal::StaleGeneration {
                        given: generation,
                        current: state.generation,
                    },
                );
            }
            match state.members.get(&id) {
                None => return Decision::refuse(state, Refusal::UnknownMember(id)),
                Some(m) if m.id.role != Role::Trainer || m.rank != Some(0) => {
                    return Decision::refuse(state, Refusal::NotLeader(id))
                }
                Some(_) => {}
            }
            if let Some(last) = &state.last_commit {
                if step <= last.step {
                    return Decision::refuse(
                        state,
                        Refusal::StepRegress {
                            given: step,
                            committed: last.step,
                        },
                    );
                }
            }
            let commit = Commit {
                step,
                path,
                generation,
                val_loss,
            };
            let mut next = state.clone();
            next.last_commit = Some(commit.clone());
            Decision {
                state: next,
                actions: vec![Action::Committed(commit)],
                refusal: None,
                reason: format!("committed step {step}"),
            }
        }
        Event::Tick => tick(now_ms, state),
    }
}

fn register(
    now_ms: u64,
    state: &State,
    id: MemberId,
    address: String,
    generation: Option<u64>,
) -> Decision {
    let mut next = state.clone();
    let previous = state.members.get(&id);
    let restarted = match (previous, generation) {
        (None, _) => false,
        // A survivor of an older generation catching up: the current group already holds it.
        (Some(_), Some(_)) => false,
        // A fresh process in a known slot: its predecessor died.
        (Some(_), None) => true,
    };
    if previous.is_none() && state.count(id.role) >= state.expected(id.role) {
        return Decision::refuse(
            state,
            Refusal::Full {
                role: id.role,
                expected: state.expected(id.role),
            },
        );
    }
    let member = Member {
        id: id.clone(),
        address,
        last_heartbeat_ms: now_ms,
        rank: previous.and_then(|m| m.rank),
        step: state.last_commit.as_ref().map_or(0, |c| c.step),
        loss: None,
        tokens_per_s: None,
    };
    next.members.insert(id.clone(), member);
    let mut reason = format!("{id:?} registered");
    if restarted && state.phase == Phase::Running {
        next.failures += 1;
        next.phase = Phase::Gathering;
        reason = format!("{id:?} restarted; the group re-forms");
    }
    if next.is_complete() && next.phase == Phase::Gathering {
        let action = start_generation(&mut next);
        return Decision {
            state: next,
            actions: vec![action],
            refusal: None,
            reason: format!("{reason}; all members present, new generation"),
        };
    }
    Decision {
        state: next,
        actions: Vec::new(),
        refusal: None,
        reason,
    }
}

/// Assigns ranks in member-id order (node, role, local index) so the same members always get
/// the same ranks, bumps the generation and names the rendezvous.
fn start_generation(state: &mut State) -> Action {
    state.generation += 1;
    state.phase = Phase::Running;
    let mut ranks = Vec::new();
    for role in [Role::Trainer, Role::Dataloader] {
        let ids: Vec<MemberId> = state
            .members
            .keys()
            .filter(|id| id.role == role)
            .cloned()
            .collect();
        for (rank, id) in ids.into_iter().enumerate() {
            if let Some(m) = state.members.get_mut(&id) {
                m.rank = Some(rank);
            }
            ranks.push((id, rank));
        }
    }
    let leader_host = state
        .trainer_with_rank(0)
        .map(|m| {
            m.address
                .rsplit_once(':')
                .map_or(m.address.clone(), |(h, _)| h.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    Action::StartGeneration {
        generation: state.generation,
        ranks,
        store: format!("{leader_host}:{}", state.config.store_port),
        prefix: format!("lillm/gen{}", state.generation),
        resume_step: state.last_commit.as_ref().map_or(0, |c| c.step),
    }
}

fn tick(now_ms: u64, state: &State) -> Decision {
    let timeout = state.config.heartbeat_timeout_ms;
    let dead: Vec<MemberId> = state
        .members
        .values()
        .filter(|m| now_ms.saturating_sub(m.last_heartbeat_ms) > timeout)
        .map(|m| m.id.clone())
        .collect();
    if dead.is_empty() {
        return Decision {
            state: state.clone(),
            actions: Vec::new(),
            refusal: None,
            reason: String::new(),
        };
    }
    let mut next = state.clone();
    for id in &dead {
        next.members.remove(id);
    }
    for m in next.members.values_mut() {
        m.rank = None;
    }
    next.failures += dead.len() as u64;
    next.generation += 1;
    next.phase = Phase::Gathering;
    Decision {
        reason: format!(
            "{} member(s) missed heartbeats for {timeout} ms: {dead:?}",
            dead.len()
        ),
        state: next,
        actions: vec![Action::Evicted(dead)],
        refusal: None,
    }
}
