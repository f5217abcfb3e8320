//! The gRPC face of the coordinator: translates requests into [`Event`]s, applies
//! [`decide`], persists the new [`State`] and answers. No rule lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lillm_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::store::StateStore;
use crate::{
    authorize, decide, host_of, store_of, Decision, Event, MemberId, Phase, Refusal, Role, State,
};

/// Milliseconds since the Unix epoch: wall time, so deadlines survive a coordinator restart.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The coordinator's state, its durable copy, and a change signal.
#[derive(Clone)]
pub struct Coordinator {
    /// Decisions apply one at a time. The async lock is held across the save (an fsync on
    /// the blocking pool), so what is on disk is always the latest decision, and no runtime
    /// thread ever blocks on the disk.
    state: Arc<tokio::sync::Mutex<State>>,
    store: Arc<StateStore>,
    changed: watch::Sender<u64>,
    /// The job's fixed settings (token checks need no lock).
    config: Arc<crate::JobConfig>,
}

impl Coordinator {
    pub fn new(state: State, store: StateStore) -> Self {
        Self {
            config: Arc::new(state.config.clone()),
            state: Arc::new(tokio::sync::Mutex::new(state)),
            store: Arc::new(store),
            changed: watch::channel(0).0,
        }
    }

    pub async fn snapshot(&self) -> State {
        self.state.lock().await.clone()
    }

    /// Applies one event; saves and signals when something worth keeping changed.
    pub async fn apply(&self, event: Event) -> Result<Decision, Status> {
        let mut state = self.state.lock().await;
        let decision = decide(now_ms(), &state, event);
        if decision.refusal.is_some() {
            tracing::warn!(reason = %decision.reason, "refused");
            // A refusal changes at most a member's liveness, which is never saved.
            *state = decision.state.clone();
            return Ok(decision);
        }
        if !decision.reason.is_empty() {
            tracing::info!(
                generation = decision.state.generation,
                "{}",
                decision.reason
            );
            let (store, next) = (self.store.clone(), decision.state.clone());
            tokio::task::spawn_blocking(move || store.save(&next))
                .await
                .map_err(|e| Status::internal(format!("saving the state: {e}")))?
                .map_err(|e| Status::internal(e.to_string()))?;
            self.changed.send_modify(|v| *v += 1);
        }
        *state = decision.state.clone();
        Ok(decision)
    }

    /// Periodic liveness check.
    pub async fn tick(&self) {
        if let Err(e) = self.apply(Event::Tick).await {
            tracing::error!(cause = %e, "tick");
        }
    }

    fn authorize(&self, token: &str) -> Result<(), Status> {
        authorize(&self.config, token).map_err(refusal_status)
    }
}

/// The gRPC status a refusal becomes.
pub fn refusal_status(refusal: Refusal) -> Status {
    let code = match refusal {
        Refusal::BadToken => Code::Unauthenticated,
        Refusal::ConfigMismatch { .. } => Code::FailedPrecondition,
        Refusal::Full { .. } | Refusal::TooManyNodes { .. } => Code::ResourceExhausted,
        Refusal::UnknownMember(_) => Code::NotFound,
        // ABORTED tells a member its generation is over (it regroups); see lillm_proto::net.
        Refusal::StaleGeneration { .. } => Code::Aborted,
        Refusal::StepRegress { .. } => Code::FailedPrecondition,
        Refusal::NotLeader(_) => Code::PermissionDenied,
    };
    Status::new(code, refusal.to_string())
}

fn decided(d: Decision) -> Result<Decision, Status> {
    match d.refusal {
        Some(r) => Err(refusal_status(r)),
        None => Ok(d),
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
        let d = decided(
            self.apply(Event::Register {
                id: id.clone(),
                address: r.address,
                config_fingerprint: r.config_fingerprint,
                generation: (r.rejoining_from > 0).then_some(r.rejoining_from),
                grad_accum: (r.grad_accum > 0).then_some(r.grad_accum),
            })
            .await?,
        )?;
        let member = &d.state.members[&id];
        Ok(Response::new(pb::RegisterReply {
            generation: d.state.generation,
            dataloader_index: match id.role {
                Role::Dataloader => member.rank.map(|r| r as u32),
                Role::Trainer => None,
            },
            message: d.reason,
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
        let mut changes = self.changed.subscribe();
        loop {
            let state = decided(self.apply(Event::Waiting { id: id.clone() }).await?)?.state;
            if let Some(a) = assignment(&state, &id) {
                return Ok(Response::new(a));
            }
            let woke = tokio::time::timeout_at(deadline, changes.changed()).await;
            if woke.is_err() {
                return Ok(Response::new(pb::Assignment {
                    waiting: gathering_message(&state),
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
        let d = self
            .apply(Event::Heartbeat {
                id,
                generation: r.generation,
                step: r.step,
                loss: finite("loss", r.loss)?,
                tokens_per_s: finite("tokens_per_s", r.tokens_per_s)?,
                mfu: finite("mfu", r.mfu)?,
            })
            .await?;
        match d.refusal {
            Some(Refusal::StaleGeneration { current, .. }) => {
                Ok(Response::new(pb::HeartbeatReply {
                    generation: current,
                    stale: true,
                }))
            }
            Some(other) => Err(refusal_status(other)),
            None => Ok(Response::new(pb::HeartbeatReply {
                generation: d.state.generation,
                stale: false,
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
        decided(
            self.apply(Event::Commit {
                id,
                generation: r.generation,
                step: r.step,
                path: r.path,
                val_loss: finite("val_loss", r.val_loss)?,
            })
            .await?,
        )?;
        Ok(Response::new(pb::CommitReply {}))
    }

    async fn report_eval(
        &self,
        request: Request<pb::EvalReport>,
    ) -> Result<Response<pb::EvalReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        decided(
            self.apply(Event::Eval {
                step: r.step,
                val_loss: finite("val_loss", Some(r.val_loss))?.unwrap_or_default(),
                sample: r.sample,
            })
            .await?,
        )?;
        Ok(Response::new(pb::EvalReply {}))
    }

    async fn locate_dataloader(
        &self,
        request: Request<pb::LocateDataloaderRequest>,
    ) -> Result<Response<pb::DataloaderLocation>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let index = r.dataloader_index;
        let state = self.snapshot().await;
        match state.dataloader(index as usize) {
            Some(m) => Ok(Response::new(pb::DataloaderLocation {
                dataloader_index: index,
                address: m.address.clone(),
            })),
            None => Err(Status::unavailable(format!(
                "dataloader {index} is not registered (yet)"
            ))),
        }
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let r = request.into_inner();
        self.authorize(&r.job_token)?;
        let id = member_id(r.id)?;
        decided(
            self.apply(Event::Leave {
                id,
                reason: r.reason,
                finished: r.finished,
            })
            .await?,
        )?;
        Ok(Response::new(pb::LeaveReply {}))
    }
}

/// The trainer's assignment once its generation runs.
fn assignment(state: &State, id: &MemberId) -> Option<pb::Assignment> {
    let member = state.members.get(id)?;
    if state.phase != Phase::Running || !member.ready {
        return None;
    }
    let rank = member.rank?;
    let leader = state.trainer_with_rank(0)?;
    // A job whose trainers read their data themselves (SFT, DPO) has no dataloader.
    let loader = match member.dataloader {
        Some(index) => Some((index, state.dataloader(index)?)),
        None if state.config.dataloaders == 0 => None,
        None => return None,
    };
    let (resume_step, _) = state.resume_point();
    // One reader per node that holds a copy: its first rank.
    let first_on_node = !state.members.values().any(|m| {
        m.id.role == Role::Trainer && m.id.node == id.node && m.rank.is_some_and(|r| r < rank)
    });
    let resume_path = first_on_node
        .then(|| state.resume_copy_on(&id.node))
        .flatten();
    let (store_host, store_port) = store_of(&leader.address, state.config.store_port);
    Some(pb::Assignment {
        generation: state.generation,
        rank: rank as u32,
        // The generation's ranks: fewer than the job's trainers after an elastic start.
        world_size: state.ranked_trainers() as u32,
        store_host,
        store_port: u32::from(store_port),
        store_prefix: format!("lillm/gen{}", state.generation),
        resume_step,
        resume_path: resume_path.unwrap_or_default().to_string(),
        dataloader_index: loader.map_or(0, |(index, _)| index as u32),
        dataloader_address: loader.map_or_else(String::new, |(_, m)| m.address.clone()),
        waiting: String::new(),
        writes_checkpoints: state.checkpoint_writers().contains(&rank),
    })
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

/// The job as `lillm status` shows it.
pub fn job_status(state: &State, now: u64) -> pb::JobStatus {
    let members = state
        .members
        .values()
        .map(|m| pb::MemberStatus {
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
        })
        .collect();
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
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus, Status>> + Send>>;

#[tonic::async_trait]
impl pb::status_server::Status for Coordinator {
    async fn get_status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Ok(Response::new(job_status(&self.snapshot().await, now_ms())))
    }

    type WatchStatusStream = StatusStream;

    async fn watch_status(
        &self,
        request: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<StatusStream>, Status> {
        let interval = match request.into_inner().interval_ms {
            0 => 500,
            ms => ms.max(50),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let mut changes = this.changed.subscribe();
            loop {
                let status = job_status(&this.snapshot().await, now_ms());
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
