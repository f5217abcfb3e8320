//! The coordinator's transition function: every rule of membership, ranks, generations,
//! liveness and commits, as `decide_in_place(now, &mut State, Event) -> Outcome` (and its
//! copying form `decide(now, &State, Event) -> Decision`).
//!
//! Trainers form a group per generation: a trainer restarting or going silent ends the
//! generation (its survivors are told they are stale, stop, and register again), and the
//! next group forms once every trainer has registered anew. Dataloaders are stateless
//! servers: they keep their index across restarts and never end a generation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

mod commit;
mod group;
mod liveness;
use commit::commit;
pub use group::{host_of, store_of, Assignment, Group};
use liveness::tick;
pub use liveness::{heartbeat_interval_ms, HEARTBEATS_PER_SECOND};

use crate::placement::Placement;
use crate::state::{
    Commit, DatasetShards, EvalResult, JobConfig, Member, MemberId, Phase, Role, State,
};

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
        /// The train shards a dataloader serves (`None` for trainers and older dataloaders).
        dataset: Option<DatasetShards>,
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
        epochs: Option<f64>,
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
    DatasetMismatch { expected: String, got: String },
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
            Refusal::DatasetMismatch { expected, got } => write!(
                f,
                "this dataloader serves dataset {got}, the job's dataloaders serve {expected}; give every dataloader the same --data"
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

/// What applying an event in place ([`decide_in_place`]) decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    pub actions: Vec<Action>,
    /// The event was refused: the state changed at most in a member's liveness.
    pub refusal: Option<Refusal>,
    /// One line saying why, for the log; non-empty exactly when the state changed in a way
    /// worth keeping (so worth saving). Liveness and progress alone are never saved.
    pub reason: String,
}

impl Outcome {
    fn refuse(refusal: Refusal) -> Self {
        Self {
            actions: Vec::new(),
            reason: format!("refused: {refusal}"),
            refusal: Some(refusal),
        }
    }

    fn quiet() -> Self {
        Self::default()
    }

    fn changed(reason: String) -> Self {
        Self {
            reason,
            ..Self::default()
        }
    }

    /// Whether the state changed in a way the store must keep.
    pub fn is_durable_change(&self) -> bool {
        self.refusal.is_none() && !self.reason.is_empty()
    }
}

/// Applies `event` at time `now_ms` to `state`, returning the next state (the rules of
/// [`decide_in_place`] on a copy: for tests and callers that keep every state).
pub fn decide(now_ms: u64, state: &State, event: Event) -> Decision {
    let mut next = state.clone();
    let Outcome {
        actions,
        refusal,
        reason,
    } = decide_in_place(now_ms, &mut next, event);
    Decision {
        state: next,
        actions,
        refusal,
        reason,
    }
}

/// Applies `event` at time `now_ms` to `state` in place. A refused event changes at most a
/// member's liveness. A heartbeat or a waiting trainer costs a map lookup whatever the job's
/// size; a tick scans the members once. A decision that moves the generation is remembered
/// among the state's `changes`, with the group's size and the reason.
pub fn decide_in_place(now_ms: u64, state: &mut State, event: Event) -> Outcome {
    let generation = state.generation;
    let outcome = decide_event(now_ms, state, event);
    if state.generation != generation && outcome.refusal.is_none() {
        let ranks = state.ranked_trainers();
        let size = match state.phase {
            Phase::Running => format!("{ranks} of {} trainers", state.config.trainers),
            Phase::Gathering => "gathering".into(),
        };
        state.changes.push(format!(
            "generation {} ({size}): {}",
            state.generation, outcome.reason
        ));
        let excess = state
            .changes
            .len()
            .saturating_sub(crate::state::CHANGES_KEPT);
        state.changes.drain(..excess);
    }
    outcome
}

fn decide_event(now_ms: u64, state: &mut State, event: Event) -> Outcome {
    match event {
        Event::Register {
            id,
            address,
            config_fingerprint,
            generation,
            grad_accum,
            dataset,
        } => register(
            now_ms,
            state,
            Registration {
                id,
                address,
                config_fingerprint,
                generation,
                grad_accum,
                dataset,
            },
        ),
        Event::Waiting { id } => match alive(now_ms, state, &id) {
            true => Outcome::quiet(),
            false => Outcome::refuse(Refusal::UnknownMember(id)),
        },
        Event::Heartbeat {
            id,
            generation,
            step,
            loss,
            tokens_per_s,
            mfu,
            epochs,
        } => heartbeat(now_ms, state, id, generation, |member| {
            member.step = step;
            member.loss = loss;
            member.tokens_per_s = tokens_per_s;
            member.mfu = mfu;
            member.epochs = epochs;
        }),
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
            state.last_eval = Some(EvalResult {
                step,
                val_loss,
                sample,
            });
            Outcome::changed(format!(
                "checkpoint of step {step} scored val loss {val_loss:.4}"
            ))
        }
        Event::Leave {
            id,
            reason,
            finished,
        } => leave(state, id, reason, finished),
        Event::Tick => tick(now_ms, state),
    }
}

/// Member `id` heartbeats at `now_ms` as a member of `generation`; `record` writes its
/// progress into its entry.
fn heartbeat(
    now_ms: u64,
    state: &mut State,
    id: MemberId,
    generation: u64,
    record: impl FnOnce(&mut Member),
) -> Outcome {
    if !alive(now_ms, state, &id) {
        return Outcome::refuse(Refusal::UnknownMember(id));
    }
    if id.role == Role::Trainer && generation < state.generation {
        // A trainer still finishing a step of the generation that ended is alive: its
        // heartbeat is refused (it must register again) but keeps it from eviction, so a
        // step of several seconds does not turn a regroup into a failure of every slow
        // trainer.
        return Outcome::refuse(Refusal::StaleGeneration {
            given: generation,
            current: state.generation,
        });
    }
    if let Some(member) = state.members.get_mut(&id) {
        record(member);
    }
    Outcome::quiet()
}

/// Member `id` seen alive at `now_ms`; false if it is not a member.
fn alive(now_ms: u64, state: &mut State, id: &MemberId) -> bool {
    match state.members.get_mut(id) {
        Some(m) => {
            m.last_heartbeat_ms = now_ms;
            true
        }
        None => false,
    }
}

fn leave(state: &mut State, id: MemberId, why: String, finished: bool) -> Outcome {
    let Some(member) = state.members.get_mut(&id) else {
        return Outcome::refuse(Refusal::UnknownMember(id));
    };
    if finished {
        member.finished = true;
        return Outcome::changed(format!("{id} finished"));
    }
    let ranked = member.rank.is_some();
    let index = member.rank;
    state.members.remove(&id);
    let mut reason = format!("{id} left ({why})");
    if id.role == Role::Dataloader {
        reason.push_str(&replace_shards_of(state, index));
    }
    if id.role == Role::Trainer && ranked && state.phase == Phase::Running {
        end_generation(state);
        reason.push_str("; the group re-forms when it is complete again");
    }
    Outcome::changed(reason)
}

struct Registration {
    id: MemberId,
    address: String,
    config_fingerprint: String,
    generation: Option<u64>,
    grad_accum: Option<u64>,
    dataset: Option<DatasetShards>,
}

fn register(now_ms: u64, state: &mut State, r: Registration) -> Outcome {
    if let Err(refusal) = admission(state, &r) {
        return Outcome::refuse(refusal);
    }
    let Registration {
        id,
        address,
        config_fingerprint,
        generation,
        grad_accum,
        dataset,
    } = r;
    if id.role == Role::Trainer {
        state.config_fingerprint = Some(config_fingerprint);
        state.grad_accum = grad_accum.or(state.grad_accum);
    }
    let previous_rank = state.members.get(&id).map(|m| m.rank);
    // A fresh process in a known slot: its predecessor died.
    let restarted = previous_rank.is_some() && generation.is_none();
    if restarted {
        state.failures += 1;
    }
    let mut reason = match restarted {
        true => format!("{id} restarted"),
        false => format!("{id} registered"),
    };
    let rank = match id.role {
        Role::Dataloader => Some(
            previous_rank
                .flatten()
                .unwrap_or_else(|| lowest_free_dataloader_index(state)),
        ),
        Role::Trainer => None,
    };
    let step = state.last_commit.as_ref().map_or(0, |c| c.step);
    state.members.insert(
        id.clone(),
        Member::registered(id.clone(), address, now_ms, rank, step),
    );
    if let (Role::Dataloader, Some(index)) = (id.role, rank) {
        reason.push_str(&place_shards_on(state, dataset, index));
    }
    if id.role == Role::Trainer && state.phase == Phase::Running {
        // The group changed under a running generation: end it; survivors learn from
        // their next heartbeat that they must register again.
        end_generation(state);
        if let Some(m) = state.members.get_mut(&id) {
            m.ready = true;
        }
        reason.push_str("; the group re-forms");
    }
    let mut actions = Vec::new();
    if state.phase == Phase::Gathering && state.can_start() {
        actions.push(start_generation(state));
        reason.push_str("; all members present, new generation");
    }
    Outcome {
        actions,
        refusal: None,
        reason,
    }
}

/// Whether the job takes registration `r` as it stands, and if not, why: a dataset or (for
/// a trainer) a training config other than the job's, or a new member beyond the job's
/// members of its role or its nodes. A member already known is always taken back.
fn admission(state: &State, r: &Registration) -> Result<(), Refusal> {
    if let (Some(known), Some(given)) = (&state.dataset, &r.dataset) {
        if known.fingerprint != given.fingerprint {
            return Err(Refusal::DatasetMismatch {
                expected: known.fingerprint.clone(),
                got: given.fingerprint.clone(),
            });
        }
    }
    // Trainers must share one training config; dataloaders serve whatever they are asked.
    if let (Role::Trainer, Some(expected)) = (r.id.role, &state.config_fingerprint) {
        if *expected != r.config_fingerprint {
            return Err(Refusal::ConfigMismatch {
                expected: expected.clone(),
                got: r.config_fingerprint.clone(),
            });
        }
    }
    if state.members.contains_key(&r.id) {
        return Ok(());
    }
    if state.count(r.id.role) >= state.expected(r.id.role) {
        return Err(Refusal::Full {
            role: r.id.role,
            expected: state.expected(r.id.role),
        });
    }
    // Only a node not seen before needs the (allocating) count of nodes.
    let known_node = state.members.keys().any(|k| k.node == r.id.node);
    if !known_node && state.nodes().len() >= state.config.nodes {
        return Err(Refusal::TooManyNodes {
            node: r.id.node.clone(),
            nodes: state.config.nodes,
        });
    }
    Ok(())
}

/// The first dataloader to report the dataset fixes it and places every shard on the job's
/// dataloader indices; a dataloader taking an index that holds nothing (it departed and its
/// shards went elsewhere) takes a fair share back. Returns what changed, for the reason.
fn place_shards_on(state: &mut State, dataset: Option<DatasetShards>, index: usize) -> String {
    if state.dataset.is_none() {
        let Some(dataset) = dataset else {
            return String::new();
        };
        let placement = Placement::new(&dataset.shard_tokens, state.config.dataloaders);
        let shards = dataset.shard_tokens.len();
        state.dataset = Some(dataset);
        state.placement = Some(placement);
        return format!("; {shards} train shards placed on the dataloaders");
    }
    let (Some(dataset), Some(placement)) = (&state.dataset, &state.placement) else {
        return String::new();
    };
    if placement.is_present(index as u32) {
        return String::new();
    }
    let next = placement.with(&dataset.shard_tokens, index as u32);
    let gained = next.shards_of(index as u32).len();
    state.placement = Some(next);
    format!("; it takes {gained} shards back")
}

/// A dataloader index left empty (its dataloader left or went silent): the shards it held
/// go to the survivors, each keeping what it has. Returns what changed, for the reason.
fn replace_shards_of(state: &mut State, index: Option<usize>) -> String {
    let (Some(index), Some(dataset), Some(placement)) = (index, &state.dataset, &state.placement)
    else {
        return String::new();
    };
    if !placement.is_present(index as u32) {
        return String::new();
    }
    let moved = placement.shards_of(index as u32).len();
    state.placement = Some(placement.without(&dataset.shard_tokens, &[index as u32]));
    format!("; its {moved} shards move to the other dataloaders")
}

fn lowest_free_dataloader_index(state: &State) -> usize {
    let taken: BTreeSet<usize> = state
        .members
        .values()
        .filter(|m| m.id.role == Role::Dataloader)
        .filter_map(|m| m.rank)
        .collect();
    (0..)
        .find(|i| !taken.contains(i))
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
    let mut loaders: Vec<usize> = Vec::new();
    let mut local: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for m in state.members.values() {
        if let (Role::Dataloader, Some(index)) = (m.id.role, m.rank) {
            loaders.push(index);
            local.entry(m.id.node.as_str()).or_default().push(index);
        }
    }
    let mut pairs = Vec::with_capacity(trainers.len());
    let mut per_node_seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (rank, id) in trainers.iter().enumerate() {
        let seen = per_node_seen.entry(id.node.as_str()).or_default();
        let dataloader = match local.get(id.node.as_str()) {
            Some(on_node) => Some(on_node[*seen % on_node.len()]),
            None if !loaders.is_empty() => Some(loaders[rank % loaders.len()]),
            None => None,
        };
        *seen += 1;
        pairs.push((rank, dataloader));
    }
    let mut ranks = Vec::with_capacity(trainers.len());
    for (id, (rank, dataloader)) in trainers.into_iter().zip(pairs) {
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
