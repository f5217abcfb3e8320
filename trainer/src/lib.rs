//! Training lilLM.
//!
//! Layout:
//! - `config`: [`TrainConfig`], the typed run configuration (seed defaults): the job's
//!   settings, shared by every rank, apart from the process's own.
//! - `model_overrides`: its `[model]` table, the preset's fields a run may change.
//! - `schedule`: warmup + cosine learning-rate schedule.
//! - `optim`: AdamW with checkpointable state, gradient clipping.
//! - `data`: token shards, SFT conversations or DPO pairs behind one deterministic batch
//!   function.
//! - `loss`: what a step minimises: next-token cross-entropy, or DPO's preference loss
//!   against a frozen reference.
//! - `dist`: c10d process groups (the `lillm-c10d` crate, re-exported): rendezvous,
//!   gradient averaging, broadcast, abort.
//! - `train`: the training engine ([`Trainer`]) of every objective, with evaluation and
//!   checkpointing.
//! - `checkpoint`: the checkpoint format (the `lillm-checkpoint` crate, re-exported).
//! - `checkpoint_actor`: writes checkpoints off the training thread.
//! - `eval_actor`: scores committed checkpoints beside training.
//! - `report`: [`report::Reporter`], progress and commits for whoever coordinates the run.
//! - `remote_data`: batches streamed from a dataloader actor.
//! - `member`: a trainer actor's membership of a job, as an actor (register, assignment,
//!   heartbeats and commits on its own runtime).
//! - `stop`: [`stop::Stop`], how a run is asked to stop between steps, and why.
//! - `metrics`, `plot`, `flops`: JSONL metrics, PNG loss curves, MFU's peak.
//! - `profile`: `--profile-steps`, libtorch's profiler over a span of steps.

pub use lillm_checkpoint as checkpoint;
pub mod actor;
pub mod cadence;
pub mod checkpoint_actor;
pub mod config;
pub mod data;
pub use lillm_c10d as dist;
mod error;
pub mod eval_actor;
pub mod flops;
pub mod log_window;
pub mod loss;
pub mod member;
pub mod metrics;
mod model_overrides;
pub mod optim;
pub mod plot;
pub mod profile;
pub mod remote_data;
pub mod report;
pub mod schedule;
pub mod stop;
pub mod train;

pub use config::{JobConfig, ProcessConfig, TrainConfig};
pub use error::{Error, Result};
pub use lillm_checkpoint::{check_vocab, LoadedModel};
pub use train::{Rewire, Setup, Start, TrainSummary, Trainer};
