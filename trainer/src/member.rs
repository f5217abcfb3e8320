//! A trainer actor's membership of a job: it registers with the coordinator, waits for its
//! assignment (rank, rendezvous, dataloader, resume point), then heartbeats its progress and
//! commits checkpoints. When the coordinator says its generation is over — another trainer
//! died or restarted — the process exits with [`EXIT_REGROUP`] so its supervisor restarts
//! it into the next group, which resumes from the last committed checkpoint.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lillm_data::remote::Locate;
use lillm_proto::client::{self, CoordinatorClient};
use lillm_proto::v1 as pb;
use tokio::runtime::Runtime;

use crate::dist::Rendezvous;
use crate::eval_actor::{EvalActor, EvalPlan};
use crate::metrics::Record;
use crate::report::Reporter;
use crate::{Error, Result};

/// Exit status of a trainer whose generation ended (EX_TEMPFAIL: start it again).
pub const EXIT_REGROUP: i32 = 75;

#[derive(Debug, Clone)]
pub struct MemberOptions {
    /// Coordinator address, `host:port`.
    pub coordinator: String,
    pub node: String,
    /// GPU (or CPU slot) index on the node.
    pub local_rank: u32,
    /// Address this trainer's c10d connections bind to (rank 0 also serves the store there).
    pub bind_host: String,
    pub job_token: String,
    /// Hash of the training config (see `TrainConfig::fingerprint`).
    pub fingerprint: String,
    pub heartbeat: Duration,
    /// How long to keep retrying an unreachable coordinator or dataloader.
    pub patience: Duration,
}

#[derive(Default)]
struct Progress {
    step: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    mfu: Option<f64>,
}

pub struct Membership {
    rt: Runtime,
    pub assignment: pb::Assignment,
    /// Who this trainer is and what it reports (options, id, progress, evaluator).
    reporter: Arc<CoordinatorReporter>,
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Membership {
    /// Registers and waits until a group forms. Refusals (token, config, full) are errors;
    /// an unreachable coordinator is retried for `patience`.
    pub fn join(opts: MemberOptions) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| Error::Distributed(format!("cannot start the async runtime: {e}")))?;
        let id = client::member_id(&opts.node, pb::Role::Trainer, opts.local_rank);
        let assignment = rt.block_on(Self::register_and_wait(&opts, &id))?;
        tracing::info!(
            "generation {}: rank {} of {}, dataloader {} at {}, resuming from step {}",
            assignment.generation,
            assignment.rank,
            assignment.world_size,
            assignment.dataloader_index,
            assignment.dataloader_address,
            assignment.resume_step
        );
        let reporter = Arc::new(CoordinatorReporter {
            rt: rt.handle().clone(),
            opts,
            id,
            generation: assignment.generation,
            progress: Arc::default(),
            evaluator: Mutex::new(None),
        });
        Ok(Self {
            rt,
            assignment,
            reporter,
        })
    }

    async fn connect(opts: &MemberOptions) -> Result<CoordinatorClient> {
        let started = tokio::time::Instant::now();
        loop {
            match client::coordinator(&opts.coordinator).await {
                Ok(c) => return Ok(c),
                Err(e) if started.elapsed() >= opts.patience => {
                    return Err(Error::Distributed(e));
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn register_and_wait(opts: &MemberOptions, id: &pb::MemberId) -> Result<pb::Assignment> {
        let mut c = Self::connect(opts).await?;
        let reply = c
            .register(pb::RegisterRequest {
                id: Some(id.clone()),
                address: opts.bind_host.clone(),
                job_token: opts.job_token.clone(),
                config_fingerprint: opts.fingerprint.clone(),
            })
            .await
            .map_err(|s| {
                Error::Distributed(format!(
                    "the coordinator at {} refused this trainer: {}",
                    opts.coordinator,
                    status_text(&s)
                ))
            })?
            .into_inner();
        tracing::info!("{}", reply.message);
        loop {
            let answer = c
                .await_assignment(pb::AwaitAssignmentRequest {
                    id: Some(id.clone()),
                    job_token: opts.job_token.clone(),
                    wait_ms: 2_000,
                })
                .await;
            match answer {
                Ok(a) => return Ok(a.into_inner()),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tracing::info!("{}", s.message());
                    if s.message().contains("cannot reach") || s.message().contains("transport") {
                        c = Self::connect(opts).await?;
                    }
                }
                Err(s) => {
                    return Err(Error::Distributed(format!(
                        "waiting for an assignment: {}",
                        status_text(&s)
                    )))
                }
            }
        }
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.rt.handle().clone()
    }

    /// The c10d rendezvous of this generation.
    pub fn rendezvous(&self, timeout: Duration) -> Rendezvous {
        let a = &self.assignment;
        Rendezvous {
            store_host: a.store_host.clone(),
            store_port: a.store_port as u16,
            bind_host: self.reporter.opts.bind_host.clone(),
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            prefix: a.store_prefix.clone(),
            timeout_ms: timeout.as_millis() as u64,
        }
    }

    /// Where this trainer's dataloader is: the assigned address first; after a failure, the
    /// address the coordinator now lists for the same dataloader index (it may have moved).
    pub fn locate_dataloader(&self) -> Locate {
        let coordinator = self.reporter.opts.coordinator.clone();
        let index = self.assignment.dataloader_index;
        let rt = self.handle();
        let first = Mutex::new(Some(self.assignment.dataloader_address.clone()));
        Arc::new(move || {
            if let Some(address) = first.lock().expect("lock").take() {
                return Ok(address);
            }
            rt.block_on(async {
                let mut status =
                    pb::status_client::StatusClient::new(client::channel(&coordinator).await?);
                let job = status
                    .get_status(pb::StatusRequest {})
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                job.members
                    .iter()
                    .find(|m| {
                        m.id.as_ref()
                            .is_some_and(|id| id.role == pb::Role::Dataloader as i32)
                            && m.rank == Some(index)
                    })
                    .map(|m| m.address.clone())
                    .ok_or_else(|| format!("dataloader {index} is not registered (yet)"))
            })
        })
    }

    fn heartbeat_request(&self) -> pb::HeartbeatRequest {
        heartbeat_request(
            &self.reporter.opts,
            &self.reporter.id,
            self.assignment.generation,
            &self.reporter.progress,
        )
    }

    /// Sends one last heartbeat so the coordinator shows where this trainer stopped.
    pub fn final_heartbeat(&self) {
        let request = self.heartbeat_request();
        let coordinator = self.reporter.opts.coordinator.clone();
        let sent = self.rt.block_on(async move {
            let mut c = client::coordinator(&coordinator).await?;
            c.heartbeat(request).await.map_err(|s| status_text(&s))
        });
        if let Err(e) = sent {
            tracing::warn!("final heartbeat: {e}");
        }
    }

    /// Starts heartbeating. A reply saying the generation is over ends the process with
    /// [`EXIT_REGROUP`].
    pub fn start_heartbeats(&self) {
        let (opts, id, progress, generation) = (
            self.reporter.opts.clone(),
            self.reporter.id.clone(),
            self.reporter.progress.clone(),
            self.assignment.generation,
        );
        self.rt.spawn(async move {
            let mut client: Option<CoordinatorClient> = None;
            loop {
                tokio::time::sleep(opts.heartbeat).await;
                if client.is_none() {
                    client = client::coordinator(&opts.coordinator).await.ok();
                }
                let Some(c) = client.as_mut() else {
                    tracing::warn!("coordinator {} unreachable; will retry", opts.coordinator);
                    continue;
                };
                let request = heartbeat_request(&opts, &id, generation, &progress);
                match c.heartbeat(request).await {
                    Ok(reply) if reply.get_ref().stale => {
                        eprintln!(
                            "error: generation {generation} is over (the job is now at generation {}): another trainer died or restarted; exiting so this trainer can be restarted into the new group",
                            reply.get_ref().generation
                        );
                        std::process::exit(EXIT_REGROUP);
                    }
                    Ok(_) => {}
                    Err(s) => {
                        tracing::warn!("heartbeat: {}", status_text(&s));
                        client = None;
                    }
                }
            }
        });
    }
}

fn heartbeat_request(
    opts: &MemberOptions,
    id: &pb::MemberId,
    generation: u64,
    progress: &Mutex<Progress>,
) -> pb::HeartbeatRequest {
    let p = progress.lock().expect("progress lock");
    pb::HeartbeatRequest {
        id: Some(id.clone()),
        job_token: opts.job_token.clone(),
        generation,
        step: p.step,
        loss: p.loss,
        tokens_per_s: p.tokens_per_s,
        mfu: p.mfu,
    }
}

/// Reports a trainer's progress into its heartbeats and its checkpoints as commits.
pub struct CoordinatorReporter {
    rt: tokio::runtime::Handle,
    opts: MemberOptions,
    id: pb::MemberId,
    generation: u64,
    progress: Arc<Mutex<Progress>>,
    /// Scores each committed checkpoint (rank 0).
    evaluator: Mutex<Option<EvalActor>>,
}

impl Membership {
    pub fn reporter(&self) -> Arc<dyn Reporter> {
        self.reporter.clone()
    }

    /// Starts the evaluation actor: every committed checkpoint is scored and the score
    /// reported to the coordinator.
    pub fn start_evaluator(&self, plan: EvalPlan) {
        let (rt, coordinator, token) = (
            self.handle(),
            self.reporter.opts.coordinator.clone(),
            self.reporter.opts.job_token.clone(),
        );
        let sink = Box::new(move |step: u64, val_loss: f64, sample: &str| {
            let request = pb::EvalReport {
                job_token: token.clone(),
                step,
                val_loss,
                sample: sample.to_string(),
            };
            let coordinator = coordinator.clone();
            let sent = rt.block_on(async move {
                let mut c = client::coordinator(&coordinator).await?;
                c.report_eval(request).await.map_err(|s| status_text(&s))
            });
            match sent {
                Ok(_) => tracing::info!("checkpoint of step {step}: val loss {val_loss:.4}"),
                Err(e) => tracing::warn!("reporting the evaluation of step {step}: {e}"),
            }
        });
        *self.reporter.evaluator.lock().expect("evaluator lock") =
            Some(EvalActor::start(plan, sink));
    }

    /// Waits for the evaluation actor to score what it has queued.
    pub fn finish_evaluations(&self) {
        let evaluator = self
            .reporter
            .evaluator
            .lock()
            .expect("evaluator lock")
            .take();
        if let Some(mut e) = evaluator {
            e.finish();
        }
    }
}

impl Reporter for CoordinatorReporter {
    fn progress(&self, record: &Record) {
        let mut p = self.progress.lock().expect("progress lock");
        p.step = record.step;
        p.loss = record.loss;
        p.tokens_per_s = record.tokens_per_s;
        p.mfu = record.mfu;
    }

    fn checkpoint_written(&self, step: u64, dir: &Path, val_loss: Option<f64>) -> Result<()> {
        let request = pb::CommitRequest {
            id: Some(self.id.clone()),
            job_token: self.opts.job_token.clone(),
            generation: self.generation,
            step,
            path: std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
                .to_string(),
            val_loss,
        };
        let (coordinator, patience) = (self.opts.coordinator.clone(), self.opts.patience);
        // An unreachable coordinator (restarting, say) is waited for; a refusal is final.
        self.rt.block_on(async move {
            let started = tokio::time::Instant::now();
            loop {
                let refused = match client::coordinator(&coordinator).await {
                    Ok(mut c) => match c.commit(request.clone()).await {
                        Ok(_) => return Ok(()),
                        Err(s) if s.code() == tonic::Code::Unavailable => None,
                        Err(s) => Some(status_text(&s)),
                    },
                    Err(_) => None,
                };
                if let Some(reason) = refused {
                    return Err(Error::Distributed(format!(
                        "the coordinator did not accept the checkpoint of step {step}: {reason}"
                    )));
                }
                if started.elapsed() >= patience {
                    return Err(Error::Distributed(format!(
                        "could not reach the coordinator at {coordinator} to commit the checkpoint of step {step}"
                    )));
                }
                tracing::warn!("coordinator {coordinator} unreachable; the commit of step {step} waits");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })?;
        tracing::info!("committed the checkpoint of step {step}");
        if let Some(e) = self.evaluator.lock().expect("evaluator lock").as_ref() {
            e.submit(step, dir.to_path_buf());
        }
        Ok(())
    }
}
