//! A trainer actor: joins a job's coordinator, trains in the group it is assigned, and when
//! that group ends (a peer died, left or joined) joins the next one in the same process with
//! the weights, optimizer state and step it has ([`Trainer::regroup`]).
//!
//! `lillm train --coordinator` only parses its flags and calls [`run`], as the coordinator
//! and dataloader commands call theirs.

use std::path::PathBuf;
use std::time::Duration;

use lillm_proto::net::{ConnectSettings, RetryPolicy};
use lillm_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::config::Objective;
use crate::data::TrainData;
use crate::eval_actor::EvalPlan;
use crate::member::{MemberOptions, Membership};
use crate::remote_data::RemoteData;
use crate::stop::{Stop, StopReason};
use crate::{
    Error, ProcessConfig, Result, Rewire, Setup, Start, TrainConfig, TrainSummary, Trainer,
};

/// Between two heartbeats when the coordinator names no interval (an older one): eight fit
/// in its default 2 s timeout.
const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long an unreachable coordinator or dataloader is retried before a trainer gives up.
const PATIENCE: Duration = Duration::from_secs(300);
/// How long ranks wait for each other in a collective before failing. It bounds how long
/// rank 0's evaluation may take while the others wait at the next all-reduce.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// Who this trainer is in its job and how it reaches the coordinator.
#[derive(Clone, Debug)]
pub struct ActorOptions {
    /// The coordinator's address (host:port).
    pub coordinator: String,
    pub node: String,
    /// GPU (or CPU slot) index of this trainer on its node.
    pub local_rank: u32,
    /// Where this trainer's collective connections (and rank 0's c10d store) bind.
    pub bind_host: String,
    pub job_token: String,
    /// CA certificate (PEM) of the servers' TLS certificates, if they use TLS.
    pub tls_ca: Option<PathBuf>,
    /// Draw the progress display when this trainer is rank 0.
    pub interactive: bool,
}

/// Runs one trainer actor until the job's run is complete (`Some(summary)` on the rank 0
/// that finished it, for the user; `None` elsewhere) or `shutdown` (checkpointing first,
/// then leaving the job). Only if re-forming a group in place fails does it return
/// [`Error::Regroup`], for its supervisor to start it afresh.
pub fn run(
    cfg: TrainConfig,
    actor: ActorOptions,
    shutdown: &CancellationToken,
) -> Result<Option<TrainSummary>> {
    // Every log line of this trainer (and of its membership tasks) carries who it is; within
    // a group also its rank and generation (the membership's span); lines about a step
    // carry it as a field.
    let span = tracing::info_span!(
        "trainer",
        role = "trainer",
        node = %actor.node,
        local_rank = actor.local_rank,
    );
    let _entered = span.enter();
    let mut options = MemberOptions {
        coordinator: actor.coordinator.clone(),
        node: actor.node.clone(),
        local_rank: actor.local_rank,
        bind_host: actor.bind_host.clone(),
        store_port: crate::dist::serve_store(COLLECTIVE_TIMEOUT)?,
        job_token: actor.job_token.clone(),
        fingerprint: cfg.job.fingerprint(),
        heartbeat: HEARTBEAT,
        connect: ConnectSettings::with_tls_ca(actor.tls_ca.clone()),
        policy: RetryPolicy {
            patience: PATIENCE,
            ..RetryPolicy::default()
        },
        rejoining_from: None,
        grad_accum: cfg.job.grad_accum as u64,
    };
    let mut trainer = None;
    loop {
        let stop = Stop::new(shutdown);
        let membership = match Membership::join(options.clone(), stop.clone()) {
            Err(_) if stop.reason() == Some(StopReason::Shutdown) => return Ok(None),
            other => other?,
        };
        let summary = match train_in_group(&cfg, &actor, &membership, stop.clone(), &mut trainer) {
            Ok(summary) => summary,
            // The generation ended while its group was forming (a peer froze or vanished
            // before the rendezvous): the state, if any, is intact; join the next one.
            Err(e) if stop.regrouping() => {
                tracing::warn!(cause = %e, "the group did not form; joining the next one");
                options.rejoining_from = trainer.as_ref().map(|_| membership.assignment.generation);
                membership.finish(None)?;
                continue;
            }
            Err(e) => {
                let _ = membership.finish(Some("failed"));
                return Err(e);
            }
        };
        match summary.stopped {
            Some(StopReason::Regroup { .. } | StopReason::PeerShutdown) => {
                options.rejoining_from = Some(membership.assignment.generation);
                membership.finish(None)?;
                tracing::info!(
                    step = summary.steps,
                    "the group is over; joining the next one in place"
                );
            }
            // Commits what was checkpointed, then leaves: the others stop at once.
            Some(StopReason::Shutdown) => {
                membership.finish(Some("shut down"))?;
                return Ok(None);
            }
            None => {
                let leader = membership.assignment.rank == 0;
                membership.finish(None)?;
                return Ok(leader.then_some(summary));
            }
        }
    }
}

/// Trains in the group `membership` was assigned to; rank 0 also evaluates and reports.
/// The first group builds `trainer`; later ones move it into the new group.
fn train_in_group(
    cfg: &TrainConfig,
    actor: &ActorOptions,
    membership: &Membership,
    stop: Stop,
    trainer: &mut Option<Trainer>,
) -> Result<TrainSummary> {
    let _in_group = membership.span().enter();
    let cfg = group_config(cfg, &membership.assignment)?;
    let leader = cfg.process.rank == 0;
    std::fs::create_dir_all(&cfg.process.out).map_err(|e| Error::io(&cfg.process.out, e))?;
    let data = rank_data(&cfg, membership)?;
    // The evaluator scores next-token loss; DPO's held-out loss needs the reference, and
    // rank 0 reports it with each commit instead.
    if leader && cfg.job.objective != Objective::Dpo {
        start_evaluator(&cfg, membership)?;
    }
    let trainer = enter_group(trainer, &cfg, membership, data, stop)?;
    if leader {
        cfg.write_resolved()?;
    }
    trainer.run(leader && actor.interactive)
}

/// This trainer's config in group `a`: the rank and world size the coordinator assigned; the
/// group's rendezvous and where to start come from the assignment, not from flags.
fn group_config(cfg: &TrainConfig, a: &pb::Assignment) -> Result<TrainConfig> {
    let cfg = TrainConfig {
        job: cfg.job.clone(),
        process: ProcessConfig {
            rank: a.rank as usize,
            world_size: a.world_size as usize,
            rendezvous: None,
            resume: false,
            ..cfg.process.clone()
        },
    };
    cfg.validate()?;
    Ok(cfg)
}

/// This rank's share of the dataloaders' stream (its micro-batches of each step), or `None`
/// where the trainer reads its data itself (SFT, DPO), which serves every rank.
fn rank_data(cfg: &TrainConfig, membership: &Membership) -> Result<Option<TrainData>> {
    if !TrainData::streamed(cfg.job.objective) {
        return Ok(None);
    }
    let a = &membership.assignment;
    let local = (cfg.job.grad_accum / cfg.process.world_size) as u32;
    Ok(Some(TrainData::Remote(Box::new(RemoteData::connect(
        membership.handle(),
        membership.dataloader(),
        (a.rank * local, local),
        // Checkpoint writers put the tokenizer into every checkpoint.
        a.writes_checkpoints
            .then(|| cfg.process.out.join("tokenizer")),
    )?))))
}

/// Rank 0's evaluator, on its own stream of validation batches.
fn start_evaluator(cfg: &TrainConfig, membership: &Membership) -> Result<()> {
    let data = match TrainData::streamed(cfg.job.objective) {
        true => TrainData::Remote(Box::new(RemoteData::connect(
            membership.handle(),
            membership.dataloader(),
            (0, 1),
            None,
        )?)),
        false => TrainData::open_like_trainer(cfg)?,
    };
    membership.start_evaluator(EvalPlan {
        data,
        seed: cfg.job.seed,
        batches: cfg.job.eval_iters,
        rows: cfg.job.batch_size,
        seq: cfg.job.sequence_len(&cfg.job.model_config()?),
        sample_tokens: 24,
    });
    Ok(())
}

/// Builds the trainer in its first group (from the checkpoint the coordinator names, if
/// any), or moves the one this process has into the new group. A move that fails outside
/// a regroup is [`Error::Regroup`]: the supervisor starts this trainer afresh.
fn enter_group<'a>(
    trainer: &'a mut Option<Trainer>,
    cfg: &TrainConfig,
    membership: &Membership,
    data: Option<TrainData>,
    stop: Stop,
) -> Result<&'a mut Trainer> {
    let a = &membership.assignment;
    // A group even for one rank: a job runs the same collectives at every size.
    let rendezvous = membership.rendezvous(COLLECTIVE_TIMEOUT);
    if trainer.is_none() {
        let start = Start::Committed {
            checkpoint: (!a.resume_path.is_empty()).then(|| PathBuf::from(&a.resume_path)),
            step: a.resume_step,
        };
        return Ok(trainer.insert(Trainer::with(
            cfg.clone(),
            Setup {
                data,
                rendezvous: Some(rendezvous),
                start,
                reporter: membership.reporter(),
                generation: a.generation,
                stop,
                writes_checkpoints: Some(a.writes_checkpoints),
            },
        )?));
    }
    let trainer = trainer.as_mut().expect("built in an earlier group");
    let regrouping = stop.clone();
    let moved = trainer.regroup(Rewire {
        rank: cfg.process.rank,
        world_size: cfg.process.world_size,
        data,
        rendezvous,
        reporter: membership.reporter(),
        generation: a.generation,
        stop,
        writes_checkpoints: a.writes_checkpoints,
    });
    match moved {
        Ok(()) => Ok(trainer),
        Err(e) if regrouping.regrouping() => Err(e),
        Err(e) => {
            tracing::warn!(cause = %e, "could not re-form the group in place");
            Err(Error::Regroup(StopReason::Regroup {
                generation: a.generation,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(rank: u32, world_size: u32) -> pb::Assignment {
        pb::Assignment {
            rank,
            world_size,
            ..Default::default()
        }
    }

    #[test]
    fn a_group_sets_the_rank_and_size_and_nothing_the_flags_said_about_starting() {
        let mut given = TrainConfig::default();
        given.process.resume = true;
        given.process.rank = 5;
        given.process.world_size = 8;
        let cfg = group_config(&given, &assignment(1, 4)).unwrap();
        assert_eq!((cfg.process.rank, cfg.process.world_size), (1, 4));
        // The coordinator names the checkpoint to start from and forms the group.
        assert!(!cfg.process.resume);
        assert!(cfg.process.rendezvous.is_none());
        assert_eq!(cfg.job, given.job);
    }

    #[test]
    fn a_group_whose_size_does_not_divide_the_accumulation_is_refused() {
        let mut given = TrainConfig::default();
        given.job.grad_accum = 8;
        let refused = group_config(&given, &assignment(0, 3))
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("grad_accum (8)") && refused.contains("world_size (3)"),
            "{refused}"
        );
    }
}
