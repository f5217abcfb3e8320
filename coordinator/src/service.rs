//! The gRPC face of the coordinator: translates requests into [`Event`]s, applies
//! [`decide`], persists the new [`State`] and answers. No rule lives here.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lillm_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::decide::{decide_in_place, heartbeat_interval_ms, Assignment, Group, Outcome};
use crate::store::StateStore;
use crate::{authorize, host_of, DatasetShards, Event, MemberId, Phase, Refusal, Role, State};

/// Milliseconds since the Unix epoch: wall time, so deadlines survive a coordinator restart.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The coordinator's state, its durable copy, and change signals.
#[derive(Clone)]
pub struct Coordinator {
    /// The state and its version. Events apply one at a time, in place, under this lock,
    /// which is never held across an await or the disk.
    inner: Arc<Mutex<Inner>>,
    store: Arc<StateStore>,
    /// One save at a time; a save writes the newest state, covering every decision made
    /// while the previous one ran (group commit: a register storm costs a few writes).
    save_turn: Arc<tokio::sync::Mutex<()>>,
    /// The version the store holds. An answer that depends on a change waits for it.
    saved: watch::Sender<u64>,
    /// Bumped on every durable change (status watchers).
    changed: watch::Sender<u64>,
    /// The generation: trainers waiting for a group wake when it moves, not on every
    /// registration.
    generation: watch::Sender<u64>,
    /// The job's fixed settings (token checks need no lock).
    config: Arc<crate::JobConfig>,
    saves: Arc<AtomicU64>,
}

struct Inner {
    state: State,
    /// Bumped on every change worth saving.
    version: u64,
    /// The running group's shared facts, for `version` (recomputed after a change).
    group: Option<(u64, Arc<Group>)>,
}

impl Coordinator {
    pub fn new(state: State, store: StateStore) -> Self {
        Self {
            config: Arc::new(state.config.clone()),
            generation: watch::channel(state.generation).0,
            inner: Arc::new(Mutex::new(Inner {
                state,
                version: 0,
                group: None,
            })),
            store: Arc::new(store),
            save_turn: Arc::default(),
            saved: watch::channel(0).0,
            changed: watch::channel(0).0,
            saves: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("coordinator state lock")
    }

    /// Reads the state without copying it.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock().state)
    }

    pub fn snapshot(&self) -> State {
        self.read(State::clone)
    }

    /// State saves since start (for `/metrics` and the scale benchmark).
    pub fn saves(&self) -> u64 {
        self.saves.load(Ordering::Relaxed)
    }

    /// Applies one event in place; when it changed something worth keeping, waits until a
    /// save covers it. `read` sees the state right after the event.
    pub async fn apply<R>(
        &self,
        event: Event,
        read: impl FnOnce(&State) -> R,
    ) -> Result<(Outcome, R), Status> {
        let (outcome, answer, version) = {
            let mut inner = self.lock();
            let outcome = decide_in_place(now_ms(), &mut inner.state, event);
            if outcome.is_durable_change() {
                inner.version += 1;
                tracing::info!(generation = inner.state.generation, "{}", outcome.reason);
            } else if outcome.refusal.is_some() {
                tracing::warn!(reason = %outcome.reason, "refused");
            }
            self.generation.send_if_modified(|g| {
                std::mem::replace(g, inner.state.generation) != inner.state.generation
            });
            let answer = read(&inner.state);
            (outcome, answer, inner.version)
        };
        if outcome.is_durable_change() {
            self.persist(version).await?;
            self.changed.send_modify(|v| *v += 1);
        }
        Ok((outcome, answer))
    }

    /// Returns once the store holds `version` or a later one.
    async fn persist(&self, version: u64) -> Result<(), Status> {
        if *self.saved.borrow() >= version {
            return Ok(());
        }
        let _turn = self.save_turn.lock().await;
        if *self.saved.borrow() >= version {
            return Ok(());
        }
        let (snapshot, at) = {
            let inner = self.lock();
            (inner.state.clone(), inner.version)
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save(&snapshot))
            .await
            .map_err(|e| Status::internal(format!("saving the state: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        self.saves.fetch_add(1, Ordering::Relaxed);
        self.saved.send_replace(at);
        Ok(())
    }

    /// Periodic liveness check.
    pub async fn tick(&self) {
        if let Err(e) = self.apply(Event::Tick, |_| ()).await {
            tracing::error!(cause = %e, "tick");
        }
    }

    /// Trainer `id`'s assignment if its group runs, and the version it was read at.
    fn assignment(&self, id: &MemberId) -> (Option<Assignment>, u64) {
        let mut inner = self.lock();
        let version = inner.version;
        let group = match &inner.group {
            Some((at, group)) if *at == version => Some(group.clone()),
            _ => {
                let group = Group::of(&inner.state).map(Arc::new);
                inner.group = group.clone().map(|g| (version, g));
                group
            }
        };
        let assignment = group.and_then(|g| g.assignment(&inner.state, id));
        (assignment, version)
    }

    fn authorize(&self, token: &str) -> Result<(), Status> {
        authorize(&self.config, token).map_err(refusal_status)
    }
}

/// The gRPC status a refusal becomes.
pub fn refusal_status(refusal: Refusal) -> Status {
    let code = match refusal {
        Refusal::BadToken => Code::Unauthenticated,
        Refusal::ConfigMismatch { .. } | Refusal::DatasetMismatch { .. } => {
            Code::FailedPrecondition
        }
        Refusal::Full { .. } | Refusal::TooManyNodes { .. } => Code::ResourceExhausted,
        Refusal::UnknownMember(_) => Code::NotFound,
        // ABORTED tells a member its generation is over (it regroups); see lillm_proto::net.
        Refusal::StaleGeneration { .. } => Code::Aborted,
        Refusal::StepRegress { .. } => Code::FailedPrecondition,
        Refusal::NotLeader(_) => Code::PermissionDenied,
    };
    Status::new(code, refusal.to_string())
}

fn decided<R>((outcome, answer): (Outcome, R)) -> Result<R, Status> {
    match outcome.refusal {
        Some(r) => Err(refusal_status(r)),
        None => Ok(answer),
    }
}

fn member_id(id: Option<pb::MemberId>) -> Result<MemberId, Status> {
    let id = id.ok_or_else(|| Status::invalid_argument("`id` is missing"))?;
    let role = match pb::Role::try_from(id.role) {
        Ok(pb::Role::Trainer) => Role::Trainer,
        Ok(pb::Role::Dataloader) => Role::Dataloader,
        _ => {
            return Err(Status::invalid_argument(format!(
                "`id.role` is {}; use ROLE_TRAINER or ROLE_DATALOADER",
                id.role
            )))
        }
    };
    if id.node.trim().is_empty() {
        return Err(Status::invalid_argument(
            "`id.node` is empty; name the node",
        ));
    }
    Ok(MemberId {
        node: id.node,
        role,
        local_index: id.local_index as usize,
    })
}

fn finite(name: &str, v: Option<f64>) -> Result<Option<f64>, Status> {
    match v {
        Some(x) if !x.is_finite() => Err(Status::invalid_argument(format!(
            "`{name}` is {x}; send a finite number or leave it unset"
        ))),
        _ => Ok(v),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Coordinator {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        if r.address.trim().is_empty() {
            return Err(Status::invalid_argument(
                "`address` is empty; send host:port (dataloaders: where they serve; trainers: the host they bind and the port of their c10d store)",
            ));
        }
        if id.role == Role::Dataloader && host_of(&r.address) == r.address {
            return Err(Status::invalid_argument(format!(
                "dataloader address `{}` has no port; send host:port",
                r.address
            )));
        }
        let event = Event::Register {
            id: id.clone(),
            address: r.address,
            config_fingerprint: r.config_fingerprint,
            generation: (r.rejoining_from > 0).then_some(r.rejoining_from),
            grad_accum: (r.grad_accum > 0).then_some(r.grad_accum),
            dataset: (!r.dataset_fingerprint.is_empty()).then_some(DatasetShards {
                fingerprint: r.dataset_fingerprint,
                shard_tokens: r.train_shard_tokens,
            }),
        };
        let (outcome, (generation, index)) = self
            .apply(event, |s| {
                (s.generation, s.members.get(&id).and_then(|m| m.rank))
            })
            .await?;
        if let Some(refusal) = outcome.refusal {
            return Err(refusal_status(refusal));
        }
        Ok(Response::new(pb::RegisterReply {
            generation,
            dataloader_index: match id.role {
                Role::Dataloader => index.map(|r| r as u32),
                Role::Trainer => None,
            },
            message: outcome.reason,
            heartbeat_interval_ms: heartbeat_interval_ms(&self.config),
        }))
    }

    async fn await_assignment(
        &self,
        request: Request<pb::AwaitAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        if id.role != Role::Trainer {
            return Err(Status::invalid_argument(
                "only trainers receive assignments",
            ));
        }
        let wait = Duration::from_millis(r.wait_ms.clamp(1, 60_000));
        let deadline = tokio::time::Instant::now() + wait;
        let mut generations = self.generation.subscribe();
        loop {
            decided(
                self.apply(Event::Waiting { id: id.clone() }, |_| ())
                    .await?,
            )?;
            if let (Some(a), version) = self.assignment(&id) {
                // Answer only what the store holds: a restart must not forget this group.
                self.persist(version).await?;
                return Ok(Response::new(assignment_message(a)));
            }
            // A trainer waiting here is alive: its liveness is refreshed a few times per
            // timeout even when no generation moves.
            let refresh = tokio::time::Instant::now()
                + Duration::from_millis(self.config.heartbeat_timeout_ms / 4);
            let woke = tokio::time::timeout_at(deadline.min(refresh), generations.changed()).await;
            if woke.is_err() && tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(pb::Assignment {
                    waiting: self.read(gathering_message),
                    ..Default::default()
                }));
            }
        }
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        let held = r.placement_version;
        let event = Event::Heartbeat {
            id: id.clone(),
            generation: r.generation,
            step: r.step,
            loss: finite("loss", r.loss)?,
            tokens_per_s: finite("tokens_per_s", r.tokens_per_s)?,
            mfu: finite("mfu", r.mfu)?,
            epochs: finite("epochs", r.epochs)?,
        };
        // A dataloader is sent its shards only when the placement changed since the version
        // it holds: a heartbeat costs a lookup, not a scan of the shards.
        let (outcome, (generation, placed)) = self
            .apply(event, |s| (s.generation, placed_on(s, &id, held)))
            .await?;
        let (placement_version, shards) = placed.unwrap_or_default();
        match outcome.refusal {
            Some(Refusal::StaleGeneration { current, .. }) => {
                Ok(Response::new(pb::HeartbeatReply {
                    generation: current,
                    stale: true,
                    ..Default::default()
                }))
            }
            Some(other) => Err(refusal_status(other)),
            None => Ok(Response::new(pb::HeartbeatReply {
                generation,
                stale: false,
                shards,
                placement_version,
            })),
        }
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        if r.path.is_empty() {
            return Err(Status::invalid_argument("`path` is empty"));
        }
        let event = Event::Commit {
            id,
            generation: r.generation,
            step: r.step,
            path: r.path,
            val_loss: finite("val_loss", r.val_loss)?,
        };
        decided(self.apply(event, |_| ()).await?)?;
        Ok(Response::new(pb::CommitReply {}))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::EvalReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let event = Event::Eval {
            step: r.step,
            val_loss: finite("val_loss", Some(r.val_loss))?.unwrap_or_default(),
            sample: r.sample,
        };
        decided(self.apply(event, |_| ()).await?)?;
        Ok(Response::new(pb::EvalReply {}))
    }

    async fn locate_dataloader(
        &self,
        request: Request<pb::LocateDataloaderRequest>,
    ) -> Result<Response<pb::DataloaderLocation>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let index = r.dataloader_index;
        match self.read(|s| s.dataloader(index as usize).map(|m| m.address.clone())) {
            Some(address) => Ok(Response::new(pb::DataloaderLocation {
                dataloader_index: index,
                address,
            })),
            None => Err(Status::unavailable(format!(
                "dataloader {index} is not registered (yet)"
            ))),
        }
    }

    async fn get_placement(
        &self,
        request: Request<pb::PlacementRequest>,
    ) -> Result<Response<pb::ShardPlacement>, Status> {
        self.authorize(&request.into_inner().job_token)?;
        Ok(Response::new(self.read(placement_message)))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        let event = Event::Leave {
            id,
            reason: r.reason,
            finished: r.finished,
        };
        decided(self.apply(event, |_| ()).await?)?;
        Ok(Response::new(pb::LeaveReply {}))
    }
}

/// The shards placed on dataloader `id` and the placement's version, when it holds another
/// version than `held`.
fn placed_on(state: &State, id: &MemberId, held: u64) -> Option<(u64, Vec<u32>)> {
    let placement = state.placement.as_ref()?;
    let index = state
        .members
        .get(id)
        .filter(|m| m.id.role == Role::Dataloader)?
        .rank?;
    (placement.version() != held).then(|| {
        let shards = placement.shards_of(index as u32);
        (
            placement.version(),
            shards.into_iter().map(|s| s as u32).collect(),
        )
    })
}

/// Every shard's holders and the present dataloaders' addresses.
fn placement_message(state: &State) -> pb::ShardPlacement {
    let Some(placement) = &state.placement else {
        return pb::ShardPlacement::default();
    };
    pb::ShardPlacement {
        shards: (0..placement.shards())
            .map(|s| pb::ShardHolders {
                dataloaders: placement.holders(s).to_vec(),
            })
            .collect(),
        addresses: state
            .members
            .values()
            .filter(|m| m.id.role == Role::Dataloader)
            .filter_map(|m| Some((m.rank? as u32, m.address.clone())))
            .collect(),
    }
}

fn assignment_message(a: Assignment) -> pb::Assignment {
    let (dataloader_index, dataloader_address) = a.dataloader.unwrap_or_default();
    pb::Assignment {
        generation: a.generation,
        rank: a.rank as u32,
        world_size: a.world_size as u32,
        store_host: a.store_host,
        store_port: u32::from(a.store_port),
        store_prefix: a.store_prefix,
        resume_step: a.resume_step,
        resume_path: a.resume_path.unwrap_or_default(),
        dataloader_index: dataloader_index as u32,
        dataloader_address,
        waiting: String::new(),
        writes_checkpoints: a.writes_checkpoints,
    }
}

fn gathering_message(state: &State) -> String {
    let ready = state.ready_trainers().count();
    let mut message = format!(
        "waiting for members: {ready}/{} trainers registered, {}/{} dataloaders",
        state.config.trainers,
        state.count(Role::Dataloader),
        state.config.dataloaders
    );
    if state.config.min_nodes.is_some() {
        if let Err(why) = state.elastic_start(now_ms()) {
            message.push_str(&format!(" (elastic: {why})"));
        }
    }
    message
}

/// The job as `lillm status` shows it: the summary, and the first `member_limit` members in
/// id order (0: all).
pub fn job_status(state: &State, now: u64, member_limit: usize) -> pb::JobStatus {
    let limit = match member_limit {
        0 => usize::MAX,
        n => n,
    };
    let members: Vec<pb::MemberStatus> = state
        .members
        .values()
        .take(limit)
        .map(|m| member_status(m, now))
        .collect();
    let summary = summary(state, now, members.len());
    pb::JobStatus {
        generation: state.generation,
        phase: match state.phase {
            Phase::Gathering => "gathering",
            Phase::Running => "running",
        }
        .into(),
        expected_trainers: state.config.trainers as u32,
        expected_dataloaders: state.config.dataloaders as u32,
        members,
        last_checkpoint: state.last_commit.as_ref().map(|c| pb::CheckpointStatus {
            step: c.step,
            path: c.path.clone(),
            generation: c.generation,
            val_loss: c.val_loss,
            copies: c
                .copies
                .iter()
                .map(|(node, path)| format!("{node}: {path}"))
                .collect(),
        }),
        eval_step: state.last_eval.as_ref().map(|e| e.step),
        eval_val_loss: state.last_eval.as_ref().map(|e| e.val_loss),
        eval_sample: state
            .last_eval
            .as_ref()
            .map(|e| e.sample.clone())
            .unwrap_or_default(),
        restarts: state.failures,
        changes: state.changes.clone(),
        tokens_per_s: state
            .members
            .values()
            .filter(|m| m.id.role == Role::Trainer)
            .filter_map(|m| m.tokens_per_s)
            .sum(),
        summary: Some(summary),
        placement: placement_status(state),
    }
}

/// Shards of the placement listed per dataloader in status.
const SHARDS_LISTED: usize = 64;

/// Each dataloader index's shards and tokens: one pass over the placement.
fn placement_status(state: &State) -> Vec<pb::DataloaderShards> {
    let (Some(placement), Some(dataset)) = (&state.placement, &state.dataset) else {
        return Vec::new();
    };
    let mut rows: Vec<pb::DataloaderShards> = (0..state.config.dataloaders)
        .map(|index| pb::DataloaderShards {
            dataloader_index: index as u32,
            ..Default::default()
        })
        .collect();
    for m in state.members.values() {
        if let (Role::Dataloader, Some(index)) = (m.id.role, m.rank) {
            if let Some(row) = rows.get_mut(index) {
                row.address = m.address.clone();
            }
        }
    }
    for (shard, &tokens) in dataset.shard_tokens.iter().enumerate() {
        for &holder in placement.holders(shard) {
            let Some(row) = rows.get_mut(holder as usize) else {
                continue;
            };
            row.shards += 1;
            row.tokens += tokens;
            if row.first_shards.len() < SHARDS_LISTED {
                row.first_shards.push(shard as u32);
            }
        }
    }
    rows
}

/// One node's members alone: a lookup, whatever the job's size.
pub fn node_status(state: &State, now: u64, node: &str) -> pb::JobStatus {
    let first = MemberId {
        node: node.to_string(),
        role: Role::Trainer,
        local_index: 0,
    };
    let members = state
        .members
        .range(first..)
        .take_while(|(id, _)| id.node == node)
        .map(|(_, m)| member_status(m, now))
        .collect();
    pb::JobStatus {
        generation: state.generation,
        members,
        ..Default::default()
    }
}

fn member_status(m: &crate::Member, now: u64) -> pb::MemberStatus {
    pb::MemberStatus {
        id: Some(pb::MemberId {
            node: m.id.node.clone(),
            role: match m.id.role {
                Role::Trainer => pb::Role::Trainer,
                Role::Dataloader => pb::Role::Dataloader,
            } as i32,
            local_index: m.id.local_index as u32,
        }),
        address: m.address.clone(),
        rank: m.rank.map(|r| r as u32),
        heartbeat_age_ms: now.saturating_sub(m.last_heartbeat_ms),
        step: m.step,
        loss: m.loss,
        tokens_per_s: m.tokens_per_s,
        mfu: m.mfu,
        dataloader_index: m.dataloader.map(|d| d as u32),
        epochs: m.epochs,
    }
}

/// The job in a few numbers, whatever its size.
fn summary(state: &State, now: u64, listed: usize) -> pb::JobSummary {
    let trainers = || {
        state
            .members
            .values()
            .filter(|m| m.id.role == Role::Trainer)
    };
    let rank0 = state.trainer_with_rank(0);
    pb::JobSummary {
        members: state.members.len() as u32,
        members_listed: listed as u32,
        trainers: trainers().count() as u32,
        ranked_trainers: state.ranked_trainers() as u32,
        dataloaders: state.count(Role::Dataloader) as u32,
        nodes: state.nodes().len() as u32,
        step: trainers().map(|m| m.step).max().unwrap_or(0),
        slowest_step: trainers()
            .filter(|m| !m.finished)
            .map(|m| m.step)
            .min()
            .unwrap_or(0),
        loss: rank0.and_then(|m| m.loss),
        mfu: rank0.and_then(|m| m.mfu),
        epochs: rank0.and_then(|m| m.epochs),
        oldest_heartbeat_ms: state
            .members
            .values()
            .filter(|m| !m.finished)
            .map(|m| now.saturating_sub(m.last_heartbeat_ms))
            .max()
            .unwrap_or(0),
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::status_server::Status for Coordinator {
    async fn get_status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let request = request.into_inner();
        let limit = request.member_limit as usize;
        Ok(Response::new(self.read(|s| match request.node.as_str() {
            "" => job_status(s, now_ms(), limit),
            node => node_status(s, now_ms(), node),
        })))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let request = request.into_inner();
        let interval = match request.interval_ms {
            0 => 500,
            ms => ms.max(50),
        };
        let limit = request.member_limit as usize;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let mut changes = this.changed.subscribe();
            loop {
                let status = this.read(|s| job_status(s, now_ms(), limit));
                if tx.send(Ok(status)).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(interval)).await;
                // Progress from heartbeats is not signalled: update at least every second.
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
