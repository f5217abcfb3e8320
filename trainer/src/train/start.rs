//! Where a run's state comes from: nothing (fresh), the run directory's latest checkpoint
//! (`--resume`), or the step the coordinator committed, read from this node's copy or
//! received from a peer. The decision for a committed step is [`resume::plan_committed`],
//! a pure function; this module gathers what it needs (the bucket, the copy's checksum) and
//! acts on its answer.

use std::path::PathBuf;

use lillm_store::RunBucket;

use super::resume::{self, ResumePlan};
use crate::checkpoint::{self, CheckpointState};
use crate::config::TrainConfig;
use crate::{Error, Result};

/// Where a run starts from.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// Fresh (or `init_from`), or with `cfg.resume` the run directory's latest valid
    /// checkpoint; a run directory that already holds checkpoints needs `cfg.resume`.
    #[default]
    Auto,
    /// Exactly this checkpoint, the one of `step` (`None`: fresh, or this rank holds no
    /// copy of it), whatever else the run directory holds: a distributed job resumes from
    /// the coordinator's last durable commit, never from a checkpoint an ended generation
    /// wrote but did not commit. The ranks given a copy read it (one per node that holds
    /// one); the others receive weights and optimizer state from the lowest of those, so
    /// nodes need no shared file system, and a lost or damaged copy costs nothing while
    /// another node has one.
    Committed {
        checkpoint: Option<PathBuf>,
        step: u64,
    },
}

/// `start` with its checkpoint brought from the run's bucket into the local mirror: with
/// `--resume`, the newest committed one; in a job, the committed step the coordinator
/// names by URL. The log comes along, so the leader continues it.
fn fetch_from_bucket(
    start: &Start,
    bucket: Option<&RunBucket>,
    cfg: &TrainConfig,
) -> Result<Start> {
    let Some(bucket) = bucket else {
        return Ok(start.clone());
    };
    let fetch_log = || -> Result<()> {
        if cfg.process.rank == 0 {
            bucket.fetch_file(crate::metrics::METRICS_FILE)?;
        }
        Ok(())
    };
    match start {
        Start::Auto if cfg.process.resume => {
            if bucket.fetch_latest()?.is_some() {
                fetch_log()?;
            }
            Ok(Start::Auto)
        }
        Start::Committed {
            checkpoint: Some(dir),
            step,
        } if lillm_store::is_url(&dir.to_string_lossy()) => {
            let local = bucket.fetch_checkpoint(*step)?;
            fetch_log()?;
            Ok(Start::Committed {
                checkpoint: Some(local),
                step: *step,
            })
        }
        other => Ok(other.clone()),
    }
}

/// The state a run resumes from.
pub(crate) struct Resumed {
    /// A verified checkpoint to load.
    pub from: Option<(PathBuf, CheckpointState)>,
    /// Set when this rank resumes at that step with the state another rank sends it.
    pub received_step: Option<u64>,
}

impl Resumed {
    fn fresh() -> Self {
        Self {
            from: None,
            received_step: None,
        }
    }
}

/// Where the run's counters start.
#[derive(Debug, PartialEq)]
pub(crate) struct Counters {
    pub step: u64,
    pub tokens_seen: u64,
    pub best_val: Option<f64>,
    pub evaluated_at_step: bool,
}

/// The counters of the checkpoint `resumed`, or of the `received_step` whose state another
/// rank sends (which brings the weights, the optimizer and the step: the rest is the
/// leader's to report), or of a fresh run.
pub(crate) fn counters(resumed: Option<&CheckpointState>, received_step: Option<u64>) -> Counters {
    match (resumed, received_step) {
        (Some(s), _) => Counters {
            step: s.step,
            tokens_seen: s.tokens_seen,
            best_val: s.best_val_loss,
            evaluated_at_step: s.evaluated_at_step,
        },
        (None, step) => Counters {
            step: step.unwrap_or(0),
            tokens_seen: 0,
            best_val: None,
            evaluated_at_step: false,
        },
    }
}

/// Decides where the run described by `cfg` and `start` resumes from, fetching the
/// checkpoint from the run's bucket first when the run directory is there. A fresh run
/// refuses a run directory that already holds checkpoints.
pub(crate) fn resolve(cfg: &TrainConfig, start: &Start, in_group: bool) -> Result<Resumed> {
    let run_bucket = cfg.process.run_bucket()?;
    match fetch_from_bucket(start, run_bucket.as_ref(), cfg)? {
        Start::Committed { checkpoint, step } => from_committed(checkpoint, step, in_group),
        Start::Auto if cfg.process.resume => Ok(Resumed {
            from: checkpoint::latest_valid(&cfg.process.out),
            received_step: None,
        }),
        Start::Auto => {
            refuse_a_used_run_directory(cfg, run_bucket.as_ref())?;
            Ok(Resumed::fresh())
        }
    }
}

/// The committed `step`, from this node's copy at `checkpoint` or from a peer.
fn from_committed(checkpoint: Option<PathBuf>, step: u64, in_group: bool) -> Result<Resumed> {
    let verified = checkpoint.as_deref().map(checkpoint::verify_checkpoint);
    let copy = match &verified {
        None => resume::Copy::NotNamed,
        Some(Ok(state)) => resume::Copy::Holds(state.step),
        Some(Err(_)) => resume::Copy::Damaged,
    };
    let dir = checkpoint.unwrap_or_default();
    match (resume::plan_committed(step, copy, in_group), verified) {
        (ResumePlan::Fresh, _) => Ok(Resumed::fresh()),
        (ResumePlan::UseCopy, Some(Ok(state))) => Ok(Resumed {
            from: Some((dir, state)),
            received_step: None,
        }),
        (ResumePlan::Receive(step), verified) => {
            if verified.is_some() {
                tracing::warn!(
                    checkpoint = %dir.display(),
                    step,
                    "this node's copy of the checkpoint is missing or damaged: taking the state from a rank that has one"
                );
            }
            Ok(Resumed {
                from: None,
                received_step: Some(step),
            })
        }
        (ResumePlan::WrongStep { holds }, _) => Err(Error::checkpoint(
            dir,
            format!("holds step {holds}, not the committed step {step}"),
        )),
        (ResumePlan::Damaged, Some(Err(e))) => Err(e.into()),
        (plan, _) => unreachable!("{plan:?} is planned only from a copy that verified as it says"),
    }
}

/// A run that neither resumes nor was placed by a coordinator must not write over another
/// run's checkpoints.
fn refuse_a_used_run_directory(cfg: &TrainConfig, bucket: Option<&RunBucket>) -> Result<()> {
    let in_bucket = match bucket {
        Some(bucket) => !bucket.committed_steps()?.is_empty(),
        None => false,
    };
    if in_bucket || !checkpoint::list_checkpoints(&cfg.process.out).is_empty() {
        return Err(Error::Config(format!(
            "{} already holds checkpoints; pass --resume to continue that run or choose another --out",
            cfg.process.out_url
                .clone()
                .unwrap_or_else(|| cfg.process.out.display().to_string())
        )));
    }
    Ok(())
}
