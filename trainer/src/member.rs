//! A trainer's membership of a job, as an actor: it registers with the coordinator, waits
//! for its assignment (rank, rendezvous, dataloader, resume point), then runs two tasks on
//! its own runtime — heartbeats (progress out, "your generation is over" in) and commits
//! (checkpoints the writer finished, in order, retried by the one policy) — so neither ever
//! depends on what the training thread is doing. A generation ending is a [`Stop`] request
//! with [`StopReason::Regroup`], obeyed by the training loop between steps.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lillm_dataloader::remote::{Locate, StreamSource};
use lillm_proto::member::{MemberClient, Registration};
use lillm_proto::net::{self, Action, ConnectSettings, NetError, RetryPolicy, WarnEvery};
use lillm_proto::v1 as pb;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::dist::Rendezvous;
use crate::eval_actor::{EvalActor, EvalPlan};
use crate::metrics::Record;
use crate::report::Reporter;
use crate::stop::{Stop, StopReason};
use crate::{Error, Result};

const COORDINATOR: &str = "the coordinator";

#[derive(Debug, Clone)]
pub struct MemberOptions {
    /// Coordinator address, `host:port`.
    pub coordinator: String,
    pub node: String,
    /// GPU (or CPU slot) index on the node.
    pub local_rank: u32,
    /// Address this trainer's c10d connections bind to (rank 0 also serves the store there).
    pub bind_host: String,
    /// Port of the c10d store this process serves when it is rank 0 ([`crate::dist::serve_store`]).
    pub store_port: u16,
    pub job_token: String,
    /// Hash of the job's settings (see `JobConfig::fingerprint`).
    pub fingerprint: String,
    /// Between heartbeats, unless the coordinator says otherwise when this trainer
    /// registers (a large job's coordinator spreads them out).
    pub heartbeat: Duration,
    pub connect: ConnectSettings,
    /// How long an unreachable coordinator or dataloader is retried.
    pub policy: RetryPolicy,
    /// The generation this trainer was in when it joins again from the same process
    /// (`None`: a new process).
    pub rejoining_from: Option<u64>,
    /// Micro-batches per step: the coordinator forms groups whose size divides it.
    pub grad_accum: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    step: u64,
    loss: Option<f64>,
    tokens_per_s: Option<f64>,
    mfu: Option<f64>,
    epochs: Option<f64>,
}

/// A checkpoint on disk, to be committed; or a request to say when all before it are.
enum CommitCmd {
    Commit {
        step: u64,
        path: String,
        val_loss: Option<f64>,
    },
    Flush(oneshot::Sender<()>),
}

/// What the member's tasks share. Owned by [`Membership`]; the tasks hold `Arc`s.
struct Shared {
    opts: MemberOptions,
    /// Register, heartbeat and leave, over one long-lived HTTP/2 connection (re-dialled
    /// when it breaks) that the commit and evaluation calls share.
    member: MemberClient,
    generation: u64,
    /// Between heartbeats, as the coordinator said.
    heartbeat: Duration,
    /// Written by the training thread at log intervals, read by the heartbeat task.
    progress: Mutex<Progress>,
    stop: Stop,
    /// Rank 0's evaluation actor, fed by the commit task.
    evaluator: Mutex<Option<EvalActor>>,
    /// The first commit that failed for good (reported by [`Membership::finish`]).
    commit_error: Mutex<Option<String>>,
}

pub struct Membership {
    /// The member's own threads: heartbeats and commits run here, never on the training
    /// thread.
    rt: Runtime,
    pub assignment: pb::Assignment,
    shared: Arc<Shared>,
    commits: mpsc::Sender<CommitCmd>,
    tasks: TaskTracker,
    /// Ends the heartbeat and commit tasks.
    done: CancellationToken,
    span: tracing::Span,
}

impl Membership {
    /// Registers and waits until a group forms, then starts heartbeats and the commit task.
    /// Refusals (token, config, full) are errors; an unreachable coordinator is retried by
    /// `opts.policy`; a stop requested meanwhile ends the wait.
    pub fn join(opts: MemberOptions, stop: Stop) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("membership")
            .enable_all()
            .build()
            .map_err(|e| Error::Membership(format!("cannot start the async runtime: {e}")))?;
        let member = {
            let _in_runtime = rt.enter();
            MemberClient::new(
                &opts.coordinator,
                (&opts.node, pb::Role::Trainer, opts.local_rank),
                &opts.job_token,
                opts.connect.clone(),
                opts.policy,
            )?
        };
        let stopped = stop.token();
        let (assignment, heartbeat) = rt.block_on(async {
            tokio::select! {
                a = register_and_wait(&opts, &member) => a,
                _ = stopped.cancelled() => {
                    // Registered and counted as present: say we are gone, or the next group
                    // would form with us in it.
                    leave(&member, "shut down while waiting for a group", false).await;
                    Err(Error::Membership(format!(
                        "stopped before a group formed: {}",
                        stop.reason().unwrap_or(StopReason::Shutdown)
                    )))
                }
            }
        })?;
        tracing::info!(
            generation = assignment.generation,
            rank = assignment.rank,
            world_size = assignment.world_size,
            dataloader = assignment.dataloader_index,
            dataloader_address = %assignment.dataloader_address,
            resume_step = assignment.resume_step,
            "joined the group"
        );
        let shared = Arc::new(Shared {
            opts,
            member,
            generation: assignment.generation,
            heartbeat,
            progress: Mutex::default(),
            stop,
            evaluator: Mutex::new(None),
            commit_error: Mutex::new(None),
        });
        let (commits, inbox) = mpsc::channel(64);
        let tasks = TaskTracker::new();
        let done = CancellationToken::new();
        // The tasks log under the trainer's span (role, node) and this group's.
        let span = tracing::info_span!(
            "group",
            rank = assignment.rank,
            generation = assignment.generation
        );
        tasks.spawn_on(
            heartbeats(shared.clone(), done.clone()).instrument(span.clone()),
            rt.handle(),
        );
        tasks.spawn_on(
            commit_loop(shared.clone(), inbox, done.clone()).instrument(span.clone()),
            rt.handle(),
        );
        Ok(Self {
            rt,
            assignment,
            shared,
            commits,
            tasks,
            done,
            span,
        })
    }

    /// The span of this trainer in its group (rank, generation): the training thread enters
    /// it too, so all of the trainer's log lines carry both.
    pub fn span(&self) -> &tracing::Span {
        &self.span
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
            bind_host: self.shared.opts.bind_host.clone(),
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            prefix: a.store_prefix.clone(),
            timeout_ms: timeout.as_millis() as u64,
        }
    }

    /// How to reach this trainer's dataloader: the assigned address, and after a failure
    /// wherever the coordinator now lists it.
    pub fn dataloader(&self) -> StreamSource {
        let opts = &self.shared.opts;
        StreamSource {
            locate: Locate::Coordinator {
                client: self.shared.member.coordinator(),
                job_token: opts.job_token.clone(),
                index: self.assignment.dataloader_index,
                assigned: self.assignment.dataloader_address.clone(),
            },
            settings: opts.connect.clone(),
            policy: opts.policy,
        }
    }

    pub fn reporter(&self) -> Arc<dyn Reporter> {
        Arc::new(MemberReporter {
            shared: self.shared.clone(),
            commits: self.commits.clone(),
        })
    }

    /// Starts the evaluation actor: every committed checkpoint is scored and the score
    /// reported to the coordinator.
    pub fn start_evaluator(&self, plan: EvalPlan) {
        let (rt, shared) = (self.handle(), self.shared.clone());
        let sink = Box::new(move |step: u64, val_loss: f64, sample: &str| {
            let request = pb::EvalReport {
                job_token: shared.opts.job_token.clone(),
                step,
                val_loss,
                sample: sample.to_string(),
            };
            let mut client = shared.member.coordinator();
            let sent = rt.block_on(net::call(
                COORDINATOR,
                &shared.opts.connect,
                client.report_eval(request),
            ));
            match sent {
                Ok(_) => tracing::info!(step, val_loss, "evaluated the committed checkpoint"),
                Err(e) => tracing::warn!(step, cause = %e, "could not report an evaluation"),
            }
        });
        *self.shared.evaluator.lock().expect("evaluator lock") = Some(EvalActor::start(plan, sink));
    }

    /// Tells the coordinator this trainer is leaving on purpose, so its generation ends now
    /// rather than after a heartbeat timeout.
    fn leave(&self, reason: &str, finished: bool) {
        let s = &self.shared;
        self.rt.block_on(leave(&s.member, reason, finished));
    }

    /// Waits until every checkpoint handed over is committed and scored, then either leaves
    /// the job (`leaving`: why) or, when the run finished, sends a last heartbeat (so status
    /// shows where this trainer stopped) and says it finished; then stops the tasks.
    pub fn finish(self, leaving: Option<&str>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.commits.blocking_send(CommitCmd::Flush(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
        let evaluator = self.shared.evaluator.lock().expect("evaluator lock").take();
        if let Some(mut e) = evaluator {
            e.finish();
        }
        if let Some(reason) = leaving {
            self.leave(reason, false);
        } else if self.shared.stop.reason().is_none() {
            // Done: a last heartbeat so status shows the final step, then say so, so that
            // the coordinator stops expecting heartbeats while the others finish.
            let request = heartbeat_request(&self.shared);
            let sent = self.rt.block_on(self.shared.member.heartbeat(request));
            if let Err(e) = sent {
                tracing::warn!(cause = %e, "final heartbeat");
            }
            self.leave("finished", true);
        }
        self.done.cancel();
        drop(self.commits);
        self.tasks.close();
        self.rt.block_on(self.tasks.wait());
        match self
            .shared
            .commit_error
            .lock()
            .expect("commit error lock")
            .take()
        {
            Some(e) => Err(Error::Membership(e)),
            None => Ok(()),
        }
    }
}

/// Tells the coordinator this trainer is leaving on purpose (`finished`: it completed the
/// job), so its generation ends now rather than after a heartbeat timeout.
async fn leave(member: &MemberClient, reason: &str, finished: bool) {
    match member.leave(reason, finished).await {
        Ok(()) => tracing::info!(reason, "left the job"),
        Err(e) => tracing::warn!(cause = %e, "could not tell the coordinator this trainer leaves"),
    }
}

/// Registers (retrying an unreachable coordinator), then asks for the assignment until a
/// group forms; registers again if the coordinator forgot this trainer meanwhile. Returns
/// the assignment and how often to heartbeat.
async fn register_and_wait(
    opts: &MemberOptions,
    member: &MemberClient,
) -> Result<(pb::Assignment, Duration)> {
    let registration = Registration {
        address: format!("{}:{}", opts.bind_host, opts.store_port),
        config_fingerprint: opts.fingerprint.clone(),
        rejoining_from: opts.rejoining_from.unwrap_or(0),
        grad_accum: opts.grad_accum,
        ..Registration::default()
    };
    let register = || async {
        member
            .register(&registration, opts.heartbeat)
            .await
            .map(|r| r.heartbeat)
            .map_err(|e| refused(opts, e))
    };
    let mut heartbeat = register().await?;
    let mut last_said = String::new();
    loop {
        let request = pb::AwaitAssignmentRequest {
            id: Some(member.id().clone()),
            job_token: opts.job_token.clone(),
            wait_ms: 2_000,
        };
        let answer =
            opts.policy
                .run("wait for a group", || {
                    let mut c = member.coordinator();
                    let request = request.clone();
                    async move {
                        net::call(COORDINATOR, &opts.connect, c.await_assignment(request)).await
                    }
                })
                .await;
        match answer {
            Ok(a) if a.waiting.is_empty() => return Ok((a, heartbeat)),
            Ok(a) => {
                if a.waiting != last_said {
                    tracing::info!(waiting = %a.waiting, "no group yet");
                    last_said = a.waiting;
                }
            }
            Err(e) if e.action() == Action::Register => heartbeat = register().await?,
            Err(e) => return Err(refused(opts, e)),
        }
    }
}

fn refused(opts: &MemberOptions, e: NetError) -> Error {
    match e {
        NetError::Status { code, message, .. } if e.action() == Action::Fail => {
            Error::Refused(format!("{} answered {code:?}: {message}", opts.coordinator))
        }
        e => Error::Network(e),
    }
}

/// This trainer's progress, for a heartbeat (the member client adds who sends it).
fn heartbeat_request(shared: &Shared) -> pb::HeartbeatRequest {
    let p = *shared.progress.lock().expect("progress lock");
    pb::HeartbeatRequest {
        generation: shared.generation,
        step: p.step,
        loss: p.loss,
        tokens_per_s: p.tokens_per_s,
        mfu: p.mfu,
        epochs: p.epochs,
        ..Default::default()
    }
}

/// How long a trainer told that its generation is over keeps heartbeating while its
/// training thread finishes the step in progress: the coordinator counts those (refused)
/// heartbeats as signs of life, so a multi-second step is not taken for a dead trainer.
const LEAVING_HEARTBEATS: Duration = Duration::from_secs(600);

/// Heartbeats every `opts.heartbeat` until `done`. A reply saying the generation is over
/// (or that the coordinator evicted this trainer) requests a regroup stop; heartbeats go
/// on (see [`LEAVING_HEARTBEATS`]) until the training thread has stopped and `done` ends
/// them.
async fn heartbeats(shared: Arc<Shared>, done: CancellationToken) {
    let mut every = tokio::time::interval(shared.heartbeat);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<tokio::time::Instant> = None;
    let mut warn = WarnEvery::new(Duration::from_secs(5));
    let mut leaving_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = every.tick() => {}
        }
        let answer = shared.member.heartbeat(heartbeat_request(&shared)).await;
        if let Some(since) = leaving_since {
            if since.elapsed() > LEAVING_HEARTBEATS {
                tracing::warn!("the training thread has not stopped after its generation ended; heartbeats stop");
                return;
            }
            continue;
        }
        let ended = match answer {
            Ok(reply) if reply.stale => Some(format!(
                "generation {} is over (the job is at generation {})",
                shared.generation, reply.generation
            )),
            Ok(_) => {
                if failing_since.take().is_some() {
                    tracing::info!("the coordinator answers heartbeats again");
                }
                None
            }
            Err(e) if matches!(e.action(), Action::Regroup | Action::Register) => {
                Some(format!("the coordinator dropped this trainer: {e}"))
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if warn.due() {
                    tracing::warn!(cause = %e, failing_for_s = since.elapsed().as_secs(), "heartbeat not delivered; training goes on");
                }
                None
            }
        };
        if let Some(why) = ended {
            tracing::warn!(reason = %why, "leaving the group to join the next one");
            shared.stop.request(StopReason::Regroup {
                generation: shared.generation,
            });
            leaving_since = Some(tokio::time::Instant::now());
        }
    }
}

/// Commits what the checkpoint writer hands over, in the order written, until `done`
/// (which `finish` cancels after a flush: the run that holds the other end of `inbox` may
/// live on into the next group). An unreachable coordinator is waited for (by the retry
/// policy); a stale generation requests a regroup; any other refusal is remembered for
/// [`Membership::finish`].
async fn commit_loop(
    shared: Arc<Shared>,
    mut inbox: mpsc::Receiver<CommitCmd>,
    done: CancellationToken,
) {
    loop {
        let cmd = tokio::select! {
            cmd = inbox.recv() => match cmd {
                Some(cmd) => cmd,
                None => return,
            },
            _ = done.cancelled() => return,
        };
        let (step, path, val_loss) = match cmd {
            CommitCmd::Flush(tx) => {
                let _ = tx.send(());
                continue;
            }
            CommitCmd::Commit {
                step,
                path,
                val_loss,
            } => (step, path, val_loss),
        };
        let request = pb::CommitRequest {
            id: Some(shared.member.id().clone()),
            job_token: shared.opts.job_token.clone(),
            generation: shared.generation,
            step,
            path: path.clone(),
            val_loss,
        };
        let what = format!("commit the checkpoint of step {step}");
        let committed = shared
            .opts
            .policy
            .run(&what, || {
                let mut c = shared.member.coordinator();
                let request = request.clone();
                let connect = &shared.opts.connect;
                async move { net::call(COORDINATOR, connect, c.commit(request)).await }
            })
            .await;
        match committed {
            Ok(_) => {
                tracing::info!(step, "committed the checkpoint");
                if let Some(e) = shared.evaluator.lock().expect("evaluator lock").as_ref() {
                    e.submit(step, path.into());
                }
            }
            Err(e) if e.action() == Action::Regroup => {
                tracing::warn!(step, cause = %e, "checkpoint not committed: the generation is over");
                shared.stop.request(StopReason::Regroup {
                    generation: shared.generation,
                });
            }
            Err(e) => {
                tracing::error!(step, cause = %e, "checkpoint not committed");
                let mut first = shared.commit_error.lock().expect("commit error lock");
                first.get_or_insert_with(|| {
                    format!("the checkpoint of step {step} was not committed: {e}")
                });
            }
        }
    }
}

/// The training loop's view of the membership: progress into heartbeats, checkpoints into
/// the commit task (never blocking on the network).
struct MemberReporter {
    shared: Arc<Shared>,
    commits: mpsc::Sender<CommitCmd>,
}

impl Reporter for MemberReporter {
    fn progress(&self, record: &Record) {
        *self.shared.progress.lock().expect("progress lock") = Progress {
            step: record.step,
            loss: record.loss,
            tokens_per_s: record.tokens_per_s,
            mfu: record.mfu,
            epochs: record.epochs,
        };
    }

    fn checkpoint_written(&self, step: u64, dir: &Path, val_loss: Option<f64>) -> Result<()> {
        let path = std::fs::canonicalize(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
            .to_string();
        self.commits
            .blocking_send(CommitCmd::Commit {
                step,
                path,
                val_loss,
            })
            .map_err(|_| Error::Membership("the commit task has stopped".into()))
    }

    fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .blocking_send(CommitCmd::Flush(tx))
            .map_err(|_| Error::Membership("the commit task has stopped".into()))?;
        rx.blocking_recv()
            .map_err(|_| Error::Membership("the commit task has stopped".into()))
    }
}
