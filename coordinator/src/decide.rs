//! The coordinator's transition function: every rule of membership, ranks, generations,
//! liveness and commits, as `decide(now, &State, Event) -> Decision`.
//!
//! Trainers form a group per generation: a trainer restarting or going silent ends the
//! generation (its survivors are told they are stale, stop, and register again), and the
//! next group forms once every trainer has registered anew. Dataloaders are stateless
//! servers: they keep their index across restarts and never end a generation.

use std::collections::BTreeMap;
use std::fmt;

use crate::state::{Commit, EvalResult, JobConfig, Member, MemberId, Phase, Role, State};

/// Something that happened: a request from a member, or time passing.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Register {
        id: MemberId,
        address: String,
        /// Hash of a trainer's training config (ignored for dataloaders).
        config_fingerprint: String,
        /// The last generation this process belonged to; `None` for a freshly started one.
        generation: Option<u64>,
        /// A trainer's micro-batches per step (its group's size must divide them).
        grad_accum: Option<u64>,
    },
    /// A registered trainer is waiting for its assignment (counts as a heartbeat).
    Waiting { id: MemberId },
    Heartbeat {
        id: MemberId,
        generation: u64,
        step: u64,
        loss: Option<f64>,
        tokens_per_s: Option<f64>,
        mfu: Option<f64>,
    },
    /// Rank 0 reports a checkpoint written completely (its manifest is on disk).
    Commit {
        id: MemberId,
        generation: u64,
        step: u64,
        path: String,
        val_loss: Option<f64>,
    },
    /// The evaluation actor scored the checkpoint of `step`.
    Eval {
        step: u64,
        val_loss: f64,
        sample: String,
    },
    /// A member shut down on purpose (SIGTERM): it is dropped at once, and a running
    /// generation it belonged to ends without counting a failure. A trainer that
    /// `finished` the job stays listed (for status) and is no longer expected to heartbeat.
    Leave {
        id: MemberId,
        reason: String,
        finished: bool,
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
    TooManyNodes { node: String, nodes: usize },
    UnknownMember(MemberId),
    StaleGeneration { given: u64, current: u64 },
    NotLeader(MemberId),
    StepRegress { given: u64, committed: u64 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadToken => write!(
                f,
                "wrong or missing job token; pass the coordinator's --job-token (LILLM_JOB_TOKEN)"
            ),
            Refusal::ConfigMismatch { expected, got } => write!(
                f,
                "config fingerprint {got} differs from the job's {expected}; start every member from the same training config"
            ),
            Refusal::Full { role, expected } => write!(
                f,
                "the job already has its {expected} {} member(s); raise the coordinator's --nodes or stop the extra process",
                role.name()
            ),
            Refusal::TooManyNodes { node, nodes } => write!(
                f,
                "node `{node}` would be node {} of a job started with --nodes {nodes}; raise --nodes or use an existing node name",
                nodes + 1
            ),
            Refusal::UnknownMember(id) => write!(f, "{id} is not a member; register first"),
            Refusal::StaleGeneration { given, current } => write!(
                f,
                "generation {given} is over (current {current}); re-register to join the new group"
            ),
            Refusal::NotLeader(id) => write!(f, "{id} does not write checkpoints in this generation; rank 0 and the first rank on another node do"),
            Refusal::StepRegress { given, committed } => write!(
                f,
                "step {given} is not after the last committed step {committed}"
            ),
        }
    }
}

/// Accepts a request carrying `token` when the job has no token or the token matches.
pub fn authorize(config: &JobConfig, token: &str) -> Result<(), Refusal> {
    match config.job_token.is_empty() || config.job_token == token {
        true => Ok(()),
        false => Err(Refusal::BadToken),
    }
}

/// What the network layer must tell members.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A new group formed: every trainer learns its global rank, the c10d store and key
    /// prefix, its dataloader and the step to resume from.
    StartGeneration {
        generation: u64,
        ranks: Vec<(MemberId, usize)>,
        store: String,
        prefix: String,
        resume_step: u64,
    },
    /// These members stopped heartbeating and were dropped.
    Evicted(Vec<MemberId>),
    Committed(Commit),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub state: State,
    pub actions: Vec<Action>,
    pub refusal: Option<Refusal>,
    /// One line saying why, for the log (empty when nothing worth logging happened).
    pub reason: String,
}

impl Decision {
    /// Refuses the event; the state is unchanged.
    fn refuse(state: &State, refusal: Refusal) -> Self {
        Self::refuse_with(state.clone(), refusal)
    }

    /// Refuses the event but keeps `next`, which may differ from the state only in
    /// liveness (a member's last heartbeat): nothing worth saving.
    fn refuse_with(next: State, refusal: Refusal) -> Self {
        Self {
            state: next,
            actions: Vec::new(),
            reason: format!("refused: {refusal}"),
            refusal: Some(refusal),
        }
    }

    fn quiet(state: State) -> Self {
        Self {
            state,
            actions: Vec::new(),
            refusal: None,
            reason: String::new(),
        }
    }
}

/// Applies `event` at time `now_ms` to `state`; a decision that moves the generation is
/// remembered among the state's `changes`, with the group's size and the reason.
pub fn decide(now_ms: u64, state: &State, event: Event) -> Decision {
    let mut decision = decide_event(now_ms, state, event);
    let next = &mut decision.state;
    if next.generation != state.generation && decision.refusal.is_none() {
        let ranks = next.ranked_trainers();
        let size = match next.phase {
            Phase::Running => format!("{ranks} of {} trainers", next.config.trainers),
            Phase::Gathering => "gathering".into(),
        };
        next.changes.push(format!(
            "generation {} ({size}): {}",
            next.generation, decision.reason
        ));
        let excess = next
            .changes
            .len()
            .saturating_sub(crate::state::CHANGES_KEPT);
        next.changes.drain(..excess);
    }
    decision
}

fn decide_event(now_ms: u64, state: &State, event: Event) -> Decision {
    match event {
        Event::Register {
            id,
            address,
            config_fingerprint,
            generation,
            grad_accum,
        } => register(
            now_ms,
            state,
            Registration {
                id,
                address,
                config_fingerprint,
                generation,
                grad_accum,
            },
        ),
        Event::Waiting { id } => match alive(now_ms, state, &id) {
            Some(next) => Decision::quiet(next),
            None => Decision::refuse(state, Refusal::UnknownMember(id)),
        },
        Event::Heartbeat {
            id,
            generation,
            step,
            loss,
            tokens_per_s,
            mfu,
        } => {
            let Some(mut next) = alive(now_ms, state, &id) else {
                return Decision::refuse(state, Refusal::UnknownMember(id));
            };
            if id.role == Role::Trainer && generation < state.generation {
                // A trainer still finishing a step of the generation that ended is alive:
                // its heartbeat is refused (it must register again) but keeps it from
                // eviction, so a step of several seconds does not turn a regroup into a
                // failure of every slow trainer.
                return Decision::refuse_with(
                    next,
                    Refusal::StaleGeneration {
                        given: generation,
                        current: state.generation,
                    },
                );
            }
            if let Some(member) = next.members.get_mut(&id) {
                member.step = step;
                member.loss = loss;
                member.tokens_per_s = tokens_per_s;
                member.mfu = mfu;
            }
            Decision::quiet(next)
        }
        Event::Commit {
            id,
            generation,
            step,
            path,
            val_loss,
        } => commit(state, id, generation, step, path, val_loss),
        Event::Eval {
            step,
            val_loss,
            sample,
        } => {
            let mut next = state.clone();
            next.last_eval = Some(EvalResult {
                step,
                val_loss,
                sample,
            });
            Decision {
                state: next,
                actions: Vec::new(),
                refusal: None,
                reason: format!("checkpoint of step {step} scored val loss {val_loss:.4}"),
            }
        }
        Event::Leave {
            id,
            reason,
            finished,
        } => leave(state, id, reason, finished),
        Event::Tick => tick(now_ms, state),
    }
}

/// `state` with member `id` seen alive at `now_ms`; `None` if it is not a member.
fn alive(now_ms: u64, state: &State, id: &MemberId) -> Option<State> {
    let mut next = state.clone();
    next.members.get_mut(id)?.last_heartbeat_ms = now_ms;
    Some(next)
}

fn leave(state: &State, id: MemberId, why: String, finished: bool) -> Decision {
    let Some(member) = state.members.get(&id) else {
        return Decision::refuse(state, Refusal::UnknownMember(id));
    };
    let mut next = state.clone();
    if finished {
        if let Some(m) = next.members.get_mut(&id) {
            m.finished = true;
        }
        return Decision {
            state: next,
            actions: Vec::new(),
            refusal: None,
            reason: format!("{id} finished"),
        };
    }
    next.members.remove(&id);
    let mut reason = format!("{id} left ({why})");
    if id.role == Role::Trainer && member.rank.is_some() && next.phase == Phase::Running {
        end_generation(&mut next);
        reason.push_str("; the group re-forms when it is complete again");
    }
    Decision {
        state: next,
        actions: Vec::new(),
        refusal: None,
        reason,
    }
}

struct Registration {
    id: MemberId,
    address: String,
    config_fingerprint: String,
    generation: Option<u64>,
    grad_accum: Option<u64>,
}

fn register(now_ms: u64, state: &State, r: Registration) -> Decision {
    let Registration {
        id,
        address,
        config_fingerprint,
        generation,
        grad_accum,
    } = r;
    // Trainers must share one training config; dataloaders serve whatever they are asked.
    let checked = id.role == Role::Trainer;
    if let (true, Some(expected)) = (checked, &state.config_fingerprint) {
        if *expected != config_fingerprint {
            return Decision::refuse(
                state,
                Refusal::ConfigMismatch {
                    expected: expected.clone(),
                    got: config_fingerprint,
                },
            );
        }
    }
    let previous = state.members.get(&id);
    if previous.is_none() {
        if state.count(id.role) >= state.expected(id.role) {
            return Decision::refuse(
                state,
                Refusal::Full {
                    role: id.role,
                    expected: state.expected(id.role),
                },
            );
        }
        let nodes = state.nodes();
        if !nodes.contains(id.node.as_str()) && nodes.len() >= state.config.nodes {
            return Decision::refuse(
                state,
                Refusal::TooManyNodes {
                    node: id.node.clone(),
                    nodes: state.config.nodes,
                },
            );
        }
    }
    let mut next = state.clone();
    if checked {
        next.config_fingerprint = Some(config_fingerprint);
        next.grad_accum = grad_accum.or(next.grad_accum);
    }
    // A fresh process in a known slot: its predecessor died.
    let restarted = previous.is_some() && generation.is_none();
    if restarted {
        next.failures += 1;
    }
    let mut reason = match restarted {
        true => format!("{id} restarted"),
        false => format!("{id} registered"),
    };
    let rank = match id.role {
        Role::Dataloader => Some(
            previous
                .and_then(|m| m.rank)
                .unwrap_or_else(|| lowest_free_dataloader_index(state)),
        ),
        Role::Trainer => None,
    };
    next.members.insert(
        id.clone(),
        Member {
            id: id.clone(),
            address,
            last_heartbeat_ms: now_ms,
            rank,
            ready: id.role == Role::Trainer,
            dataloader: None,
            step: state.last_commit.as_ref().map_or(0, |c| c.step),
            loss: None,
            tokens_per_s: None,
            mfu: None,
            finished: false,
        },
    );
    if id.role == Role::Trainer && next.phase == Phase::Running {
        // The group changed under a running generation: end it; survivors learn from
        // their next heartbeat that they must register again.
        end_generation(&mut next);
        if let Some(m) = next.members.get_mut(&id) {
            m.ready = true;
        }
        reason.push_str("; the group re-forms");
    }
    let mut actions = Vec::new();
    if next.phase == Phase::Gathering && next.can_start() {
        actions.push(start_generation(&mut next));
        reason.push_str("; all members present, new generation");
    }
    Decision {
        state: next,
        actions,
        refusal: None,
        reason,
    }
}

fn lowest_free_dataloader_index(state: &State) -> usize {
    (0..)
        .find(|i| state.dataloader(*i).is_none())
        .expect("a free index exists")
}

/// Ends the running generation: ranks are withdrawn and every trainer must register anew.
fn end_generation(state: &mut State) {
    state.generation += 1;
    state.phase = Phase::Gathering;
    for m in state.members.values_mut() {
        if m.id.role == Role::Trainer {
            m.rank = None;
            m.ready = false;
            m.dataloader = None;
        }
    }
}

/// Assigns ranks in member-id order (node, local index) so the same members always get the
/// same ranks, pairs each trainer with a dataloader (one on its own node when there is one),
/// bumps the generation and names the rendezvous.
fn start_generation(state: &mut State) -> Action {
    state.generation += 1;
    state.phase = Phase::Running;
    state.gathering_since_ms = 0;
    // The ready trainers: all of them, except in an elastic start without the missing.
    let trainers: Vec<MemberId> = state.ready_trainers().map(|m| m.id.clone()).collect();
    let loaders: Vec<(String, usize)> = state
        .members
        .values()
        .filter(|m| m.id.role == Role::Dataloader)
        .filter_map(|m| Some((m.id.node.clone(), m.rank?)))
        .collect();
    let mut ranks = Vec::new();
    let mut per_node_seen: std::collections::BTreeMap<String, usize> = Default::default();
    for (rank, id) in trainers.into_iter().enumerate() {
        let local: Vec<usize> = loaders
            .iter()
            .filter(|(node, _)| *node == id.node)
            .map(|(_, i)| *i)
            .collect();
        let seen = per_node_seen.entry(id.node.clone()).or_default();
        let dataloader = match (local.is_empty(), loaders.is_empty()) {
            (false, _) => Some(local[*seen % local.len()]),
            (true, false) => Some(loaders[rank % loaders.len()].1),
            (true, true) => None,
        };
        *seen += 1;
        if let Some(m) = state.members.get_mut(&id) {
            m.rank = Some(rank);
            m.dataloader = dataloader;
        }
        ranks.push((id, rank));
    }
    let (store_host, store_port) = state
        .trainer_with_rank(0)
        .map(|m| store_of(&m.address, state.config.store_port))
        .unwrap_or_else(|| ("127.0.0.1".into(), state.config.store_port));
    Action::StartGeneration {
        generation: state.generation,
        ranks,
        store: format!("{store_host}:{store_port}"),
        prefix: format!("lillm/gen{}", state.generation),
        resume_step: state.resume_point().0,
    }
}

/// Where rank 0 serves the c10d store: a trainer registers `host:port` with the port of
/// the store its process serves for its whole life (so a group it gave up never blocks the
/// next one's port); a trainer that sends only a host serves it on the job's `store_port`.
pub fn store_of(trainer_address: &str, store_port: u16) -> (String, u16) {
    match trainer_address.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(port) => (host.to_string(), port),
            Err(_) => (trainer_address.to_string(), store_port),
        },
        None => (trainer_address.to_string(), store_port),
    }
}

/// The host part of `host:port` (or the whole string when it has no port).
pub fn host_of(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host.to_string(),
        _ => address.to_string(),
    }
}

fn commit(
    state: &State,
    id: MemberId,
    generation: u64,
    step: u64,
    path: String,
    val_loss: Option<f64>,
) -> Decision {
    if generation != state.generation || state.phase != Phase::Running {
        return Decision::refuse(
            state,
            Refusal::StaleGeneration {
                given: generation,
                current: state.generation,
            },
        );
    }
    let writers = state.checkpoint_writers();
    match state.members.get(&id) {
        None => return Decision::refuse(state, Refusal::UnknownMember(id)),
        Some(m) if m.id.role != Role::Trainer || !m.rank.is_some_and(|r| writers.contains(&r)) => {
            return Decision::refuse(state, Refusal::NotLeader(id))
        }
        Some(_) => {}
    }
    let node = id.node.clone();
    let done = |reason: String| Decision {
        state: state.clone(),
        actions: Vec::new(),
        refusal: None,
        reason,
    };
    let mut next = state.clone();
    if let Some(last) = next.last_commit.as_mut() {
        if step == last.step {
            let known = last.copies.get(&node);
            // A retry whose reply was lost (say, the coordinator restarted after saving it).
            if known == Some(&path) || (last.copies.is_empty() && last.path == path) {
                return done(format!("step {step} was already committed"));
            }
            // A late copy of a durable checkpoint, from a node without one.
            if known.is_none() && !last.copies.is_empty() {
                last.copies.insert(node.clone(), path);
                return Decision {
                    state: next,
                    actions: Vec::new(),
                    refusal: None,
                    reason: format!("step {step}: another copy, on {node}"),
                };
            }
        }
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
    // Oldest first: the first copy of a step inserts it in order.
    let at = next.pending_commits.partition_point(|c| c.step < step);
    if next.pending_commits.get(at).is_none_or(|c| c.step != step) {
        let first = Commit {
            step,
            path: path.clone(),
            generation,
            val_loss,
            copies: BTreeMap::new(),
        };
        next.pending_commits.insert(at, first);
    }
    let pending = &mut next.pending_commits[at];
    pending.copies.insert(node.clone(), path);
    pending.val_loss = pending.val_loss.or(val_loss);
    let copies = pending.copies.len();
    let needed = state.copies_needed();
    if copies < needed {
        // Bounded: a copy that never comes (its writer died) must not grow the state.
        let excess = next
            .pending_commits
            .len()
            .saturating_sub(PENDING_COMMITS_KEPT);
        next.pending_commits.drain(..excess);
        return Decision {
            state: next,
            actions: Vec::new(),
            refusal: None,
            reason: format!("step {step}: copy {copies} of {needed}, on {node}"),
        };
    }
    let commit = pending.clone();
    next.pending_commits.retain(|c| c.step > step);
    next.last_commit = Some(commit.clone());
    Decision {
        state: next,
        actions: vec![Action::Committed(commit)],
        refusal: None,
        reason: format!("committed step {step} ({copies} copies)"),
    }
}

/// Checkpoints waiting for their second copy that the state keeps.
const PENDING_COMMITS_KEPT: usize = 4;

fn tick(now_ms: u64, state: &State) -> Decision {
    let evicted = evict_silent(now_ms, state);
    if !evicted.actions.is_empty() || state.phase != Phase::Gathering {
        return evicted;
    }
    elastic(now_ms, state)
}

/// While gathering: note when it began, and once the grace period has passed start a
/// generation with the trainers that are there, if the job is elastic and they suffice.
fn elastic(now_ms: u64, state: &State) -> Decision {
    if state.config.min_nodes.is_none() {
        return Decision::quiet(state.clone());
    }
    let mut next = state.clone();
    if next.gathering_since_ms == 0 {
        next.gathering_since_ms = now_ms;
        return Decision::quiet(next);
    }
    if state.elastic_start(now_ms).is_err() {
        return Decision::quiet(next);
    }
    let ready = state.ready_trainers().count();
    let action = start_generation(&mut next);
    Decision {
        reason: format!(
            "elastic: {ready} of {} trainers present after {} ms; a generation of {ready} ranks starts without the others",
            state.config.trainers, state.config.elastic_grace_ms
        ),
        state: next,
        actions: vec![action],
        refusal: None,
    }
}

fn evict_silent(now_ms: u64, state: &State) -> Decision {
    let timeout = state.config.heartbeat_timeout_ms;
    let dead: Vec<MemberId> = state
        .members
        .values()
        .filter(|m| !m.finished && now_ms.saturating_sub(m.last_heartbeat_ms) > timeout)
        .map(|m| m.id.clone())
        .collect();
    if dead.is_empty() {
        return Decision::quiet(state.clone());
    }
    let mut next = state.clone();
    for id in &dead {
        next.members.remove(id);
    }
    next.failures += dead.len() as u64;
    if next.phase == Phase::Running && dead.iter().any(|id| id.role == Role::Trainer) {
        end_generation(&mut next);
    }
    let names: Vec<String> = dead.iter().map(|id| id.to_string()).collect();
    Decision {
        reason: format!(
            "{} member(s) missed heartbeats for {timeout} ms: {}",
            dead.len(),
            names.join(", ")
        ),
        state: next,
        actions: vec![Action::Evicted(dead)],
        refusal: None,
    }
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Trainer => "trainer",
            Role::Dataloader => "dataloader",
        }
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}{}", self.node, self.role.name(), self.local_index)
    }
}
