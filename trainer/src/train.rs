//! The training engine — of one process, or of one rank of a job: batches → forward/backward
//! of the objective's loss → gradient averaging → clip → AdamW, with periodic evaluation,
//! checkpoints (handed to the checkpoint actor), metrics and a progress display. Pretraining,
//! SFT and DPO differ only in their data and their [`Loss`].

use std::path::PathBuf;
use std::sync::Arc;

use lillm_data::manifest::Split;
use lillm_data::shards::BatchKey;
use lillm_model::{upload, weights, LilLM, ModelConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

mod group;
mod init;
mod micro;
mod model_source;
mod resume;
mod start;
mod steps;
use crate::checkpoint::{self, CheckpointState, LoraBase};
use crate::checkpoint_actor::{host_copy, CheckpointActor, Publish, Snapshot};
use crate::config::{Objective, TrainConfig};
use crate::data::{Draw, MicroBatch, TrainData};
use crate::dist::{ProcessGroup, Rendezvous};
use crate::log_window::LogWindow;
use crate::loss::{train_figures, Loss, Reference, FIGURES};
use crate::metrics::{MetricsLog, Record};
use crate::optim::{AdamW, AdamWConfig};
use crate::profile::StepProfile;
use crate::report::{Reporter, Silent};
use crate::stop::{Stop, StopReason};
use crate::{Error, LoadedModel, Result};
use group::join_group;
pub use group::Rewire;
use lillm_data::epochs::DataOrder;
use micro::MicroStep;
pub use micro::StepMode;
use model_source::ModelSource;
pub use start::Start;

/// Gradients are averaged over ranks in flat buckets of at most this many bytes.
const GRADIENT_BUCKET_BYTES: usize = 25 << 20;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub last_checkpoint: std::path::PathBuf,
    pub plot: Option<std::path::PathBuf>,
    /// "N parameters", with the active ones for MoE ([`ModelConfig::size_summary`]).
    pub model_size: String,
    /// Parameters the run trained (with LoRA: the adapters') and its optimizer state's bytes.
    pub trained_params: usize,
    pub optimizer_bytes: usize,
    /// Why the run ended before `max_iters` (`None`: it finished).
    pub stopped: Option<StopReason>,
    /// The most GPU memory any log window of this process allocated (CUDA only).
    pub peak_gpu_bytes: Option<u64>,
}

/// Moves a micro-batch to the device as (inputs, targets) of shape (B, T).
fn batch_tensors(batch: &MicroBatch, device: Device) -> (Tensor, Tensor) {
    let shape = [batch.rows as i64, batch.seq as i64];
    let x = upload(&batch.inputs, device).view(shape);
    let y = upload(&batch.targets, device).view(shape);
    (x, y)
}

/// The model a run starts from, with what trains it.
struct Prepared {
    model: LilLM,
    /// What the optimizer trains: the model's weights, or the LoRA adapters alone.
    vs: VarStore,
    opt: AdamW,
    lora_base: Option<LoraBase>,
    loss: Loss,
}

/// Builds the model from the seed on `device`, then loads what the run starts from into
/// it: the checkpoint resumed (weights and optimizer state, refused when it was trained on
/// other data) or the initial checkpoint (`init_from`, the LoRA base); DPO keeps the
/// initial model as its reference, the loss it trains with.
fn prepare_model(
    cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    lora: Option<&lillm_model::LoraConfig>,
    init: Option<LoadedModel>,
    resume_from: Option<&(PathBuf, CheckpointState)>,
    data: &TrainData,
    device: Device,
) -> Result<Prepared> {
    let init::Initial {
        mut model,
        trained: vs,
        frozen_base,
    } = init::initial_model(model_cfg, lora, cfg.job.seed, device)?;
    model.set_compute_kind(cfg.job.compute_kind(device));
    let mut opt = adamw(cfg, &vs);
    let (init, reference) = dpo_reference(init, cfg, model.compute_kind())?;
    let init = init.as_ref().or(reference.as_ref().map(Reference::loaded));
    if let Some((dir, state)) = resume_from {
        if let Some(reference) = &reference {
            reference.check_resumed(dir, state)?;
        }
        model_source::load_resumed(dir, state, &vs, &mut opt, data.tokenizer_fingerprint())?;
    }
    let lora_base = model_source::load_initial(lora, init, frozen_base.as_ref(), &vs, resume_from)?;
    let loss = match reference {
        Some(r) => Loss::Preference(Box::new(r)),
        None => Loss::NextToken {
            chunked: cfg.job.head_loss.chunked(),
        },
    };
    Ok(Prepared {
        model,
        vs,
        opt,
        lora_base,
        loss,
    })
}

/// Mean figures ([`crate::loss::Scored::add_to`]) over `cfg.eval_iters` seeded batches of a split.
fn estimate(
    model: &LilLM,
    loss: &Loss,
    data: &TrainData,
    cfg: &TrainConfig,
    seq: usize,
    split: Split,
    device: Device,
) -> Result<[f64; FIGURES as usize]> {
    let _guard = tch::no_grad_guard();
    let total = Tensor::zeros([FIGURES], (Kind::Double, device));
    for i in 0..cfg.job.eval_iters {
        let key = BatchKey {
            seed: cfg.job.seed ^ 0xE7A1,
            split,
            step: i,
            micro: 0,
        };
        // The val split in random windows, as the original; the train split in the job's
        // order, so that the exactly-once order reads only placed shards.
        let order = match split {
            Split::Train => cfg.job.data_order,
            Split::Val => DataOrder::Random,
        };
        let (x, y) = batch_tensors(
            &data.batch(key, Draw::Eval { order }, cfg.job.batch_size, seq)?,
            device,
        );
        loss.score(model, &x, &y, false).add_to(&total, 1.0);
    }
    let means = Vec::<f64>::try_from(&(total / cfg.job.eval_iters as f64).to_device(Device::Cpu))?;
    Ok([means[0], means[1], means[2]])
}

/// The data `cfg` trains on (`given` by the job, else opened from `cfg.data`), once it is
/// known to fit the model's vocabulary.
fn open_data(
    cfg: &TrainConfig,
    given: Option<TrainData>,
    checkpoint_tokenizer: Option<&std::path::Path>,
    model_cfg: &ModelConfig,
) -> Result<TrainData> {
    let data = match given {
        Some(data) => data,
        None => TrainData::open(cfg, checkpoint_tokenizer, model_cfg.max_seq_len)?,
    };
    if let Some(vocab) = data.vocab_size().filter(|&v| v > model_cfg.vocab_size) {
        return Err(Error::Config(format!(
            "the dataset {} was tokenized with {vocab} tokens but the model's vocab_size is {}; set model.vocab_size to at least {vocab}",
            cfg.process.data.display(),
            model_cfg.vocab_size,
        )));
    }
    Ok(data)
}

/// AdamW over the weights the run trains, as `cfg` sets it.
fn adamw(cfg: &TrainConfig, vs: &VarStore) -> AdamW {
    let adam = AdamWConfig {
        beta1: cfg.job.beta1,
        beta2: cfg.job.beta2,
        eps: cfg.job.adam_eps,
        weight_decay: cfg.job.weight_decay,
    };
    AdamW::new(adam, vs.variables().into_iter().collect())
}

/// DPO keeps the initial checkpoint on as its frozen reference (in `kind`), so it is no
/// longer the run's plain initial weights; other objectives leave `init` as it is.
fn dpo_reference(
    init: Option<LoadedModel>,
    cfg: &TrainConfig,
    kind: Kind,
) -> Result<(Option<LoadedModel>, Option<Reference>)> {
    match init {
        Some(loaded) if cfg.job.objective == Objective::Dpo => {
            Ok((None, Some(Reference::new(loaded, cfg.job.dpo_beta, kind)?)))
        }
        other => Ok((other, None)),
    }
}

/// How a run is wired into a job: its data, its group, its start and whom it reports to.
/// The default is the single-process run that `cfg` describes.
pub struct Setup {
    /// Data to train on; `None` opens `cfg.data`.
    pub data: Option<TrainData>,
    /// The data-parallel group; `None` takes it from `cfg` (`rendezvous`, `rank`).
    pub rendezvous: Option<Rendezvous>,
    pub start: Start,
    pub reporter: Arc<dyn Reporter>,
    /// Membership generation recorded in checkpoints.
    pub generation: u64,
    /// Asks the loop to stop between steps (SIGTERM, or the generation ended).
    pub stop: Stop,
    /// Whether this rank writes checkpoints (`None`: rank 0 alone). A job has two writers
    /// on different nodes, so every checkpoint exists on two disks.
    pub writes_checkpoints: Option<bool>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            data: None,
            rendezvous: None,
            start: Start::Auto,
            reporter: Arc::new(Silent),
            generation: 0,
            stop: Stop::default(),
            writes_checkpoints: None,
        }
    }
}

/// What runs and observes each step from `step` on: the profiler of `--profile-steps`,
/// the log window, and the micro-step (eager or a CUDA graph, as `--step-mode` resolves on
/// this device for this model).
fn step_machinery(
    cfg: &TrainConfig,
    model_cfg: &ModelConfig,
    model: &LilLM,
    device: Device,
    step: u64,
) -> Result<(StepProfile, LogWindow, MicroStep)> {
    let profile = StepProfile::new(
        cfg.profile_steps()?,
        &cfg.process.out,
        cfg.process.rank,
        device,
    );
    let figures = train_figures(model_cfg);
    let window = LogWindow::new(figures, device, step, cfg.process.world_size);
    let step_mode = cfg
        .process
        .step_mode
        .resolve(device, model.is_capturable())?;
    Ok((profile, window, MicroStep::new(step_mode, figures, device)))
}

/// A training run: the model, its optimizer, the data and where to write.
pub struct Trainer {
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    device: Device,
    /// The weights the run trains and checkpoints: the model's, or with LoRA its adapters.
    vs: VarStore,
    model: LilLM,
    /// With LoRA: the frozen base the adapters were attached to.
    lora_base: Option<LoraBase>,
    opt: AdamW,
    data: TrainData,
    loss: Loss,
    /// Tokens per sequence (see [`TrainConfig::sequence_len`]).
    seq: usize,
    tokenizer_dir: Option<std::path::PathBuf>,
    step: u64,
    tokens_seen: u64,
    best_val: Option<f64>,
    evaluated_at_step: bool,
    /// The latest training-step record (every rank computes it): a group re-formed after
    /// rank 0 died between its update and its log line logs it again (see `sync_state`).
    last_window: Option<Record>,
    /// The log window in progress; it goes on through a regroup in place.
    window: LogWindow,
    /// The data-parallel group when the job has several ranks; rank 0 leads (evaluates,
    /// checkpoints, logs).
    group: Option<ProcessGroup>,
    reporter: Arc<dyn Reporter>,
    /// Whether this rank writes checkpoints (see [`Setup::writes_checkpoints`]).
    writes_checkpoints: bool,
    /// The checkpoint writer, on ranks that write.
    writer: Option<CheckpointActor>,
    generation: u64,
    stop: Stop,
    /// `--profile-steps`: libtorch's profiler over a span of steps.
    profile: StepProfile,
    /// Runs each micro-batch's forward and backward (eagerly, or as a CUDA graph).
    micro: MicroStep,
    /// The most GPU memory a log window of this process allocated (CUDA only).
    peak_gpu_bytes: Option<u64>,
}

impl Trainer {
    /// Builds the run: fresh weights, `init_from` weights, or — with `resume` — the latest
    /// valid checkpoint of `cfg.out` with its optimizer state and data cursor.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        Self::with(cfg, Setup::default())
    }

    /// Builds the run as `setup` wires it (see [`Setup`]).
    pub fn with(cfg: TrainConfig, setup: Setup) -> Result<Self> {
        cfg.validate()?;
        if cfg.process.threads > 0 {
            tch::set_num_threads(cfg.process.threads as i32);
        }
        let device = cfg.device()?;
        let in_group = setup.rendezvous.is_some() || cfg.process.world_size > 1;
        let start::Resumed {
            from: resume_from,
            received_step,
        } = start::resolve(&cfg, &setup.start, in_group)?;
        let ModelSource {
            model_cfg,
            lora,
            init,
            checkpoint_tokenizer,
        } = model_source::choose(&cfg, resume_from.as_ref(), device)?;
        let data = open_data(
            &cfg,
            setup.data,
            checkpoint_tokenizer.as_deref(),
            &model_cfg,
        )?;
        let tokenizer_dir = data.tokenizer_dir().or(checkpoint_tokenizer);
        let seq = cfg.job.sequence_len(&model_cfg);
        let Prepared {
            model,
            vs,
            opt,
            lora_base,
            loss,
        } = prepare_model(
            &cfg,
            &model_cfg,
            lora.as_ref(),
            init,
            resume_from.as_ref(),
            &data,
            device,
        )?;
        let group = join_group(&cfg, setup.rendezvous, device, &setup.stop)?;
        let start::Counters {
            step,
            tokens_seen,
            best_val,
            evaluated_at_step,
        } = start::counters(resume_from.as_ref().map(|(_, state)| state), received_step);
        let cfg_rank_is_leader = cfg.process.rank == 0;
        let (profile, window, micro) = step_machinery(&cfg, &model_cfg, &model, device, step)?;
        let mut trainer = Self {
            cfg,
            model_cfg,
            device,
            vs,
            model,
            lora_base,
            opt,
            data,
            loss,
            seq,
            tokenizer_dir,
            step,
            tokens_seen,
            best_val,
            evaluated_at_step,
            last_window: None,
            window,
            group: None,
            writes_checkpoints: setup.writes_checkpoints.unwrap_or(cfg_rank_is_leader),
            writer: None,
            reporter: setup.reporter,
            generation: setup.generation,
            stop: setup.stop,
            micro,
            profile,
            peak_gpu_bytes: None,
        };
        if let Some(group) = group {
            trainer.stop.abort_on_regroup(group.abort_handle());
            // A rank > 0 resuming left the checkpoint to rank 0: it has no state of its own.
            trainer.sync_state(&group, received_step.is_none())?;
            trainer.group = Some(group);
        }
        Ok(trainer)
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model_cfg
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Hands a snapshot of the run to the checkpoint actor; returns where it will be.
    fn save_checkpoint(&mut self, val_loss: Option<f64>) -> Result<PathBuf> {
        let dir = checkpoint::checkpoint_dir(&self.cfg.process.out, self.step);
        let state = CheckpointState {
            step: self.step,
            tokens_seen: self.tokens_seen,
            val_loss,
            best_val_loss: self.best_val,
            model: self.model_cfg.clone(),
            train: Some(serde_json::to_value(&self.cfg).expect("the config serialises")),
            world_size: self.cfg.process.world_size,
            seed: self.cfg.job.seed,
            generation: self.generation,
            evaluated_at_step: self.evaluated_at_step,
            dataset_fingerprint: Some(self.data.tokenizer_fingerprint().to_string()),
            source: match self.loss {
                Loss::NextToken { .. } => "train".into(),
                Loss::Preference(_) => "dpo".into(),
            },
            reference_sha256: match &self.loss {
                Loss::NextToken { .. } => None,
                Loss::Preference(r) => Some(r.sha256.clone()),
            },
            lora: self.lora_base.clone(),
        };
        let snapshot = Snapshot {
            dir: dir.clone(),
            state,
            model: host_copy(&weights::var_store_tensors(&self.vs)),
            optimizer: host_copy(&self.opt.state_tensors()),
            tokenizer: self.tokenizer_dir.clone(),
        };
        let (out, keep, reporter) = (
            self.cfg.process.out.clone(),
            self.cfg.job.keep_last,
            self.reporter.clone(),
        );
        let tag = if self.cfg.process.rank == 0 {
            ""
        } else {
            "-copy"
        };
        if self.writer.is_none() {
            let publish = match self.cfg.process.rank {
                0 => self
                    .cfg
                    .process
                    .run_bucket()?
                    .map(|bucket| Publish { bucket }),
                _ => None,
            };
            self.writer = Some(CheckpointActor::start(out, keep, tag, reporter, publish));
        }
        self.writer
            .as_mut()
            .expect("the writer was just started")
            .submit(snapshot)?;
        Ok(dir)
    }

    /// Train and val loss of the current weights, logged (for DPO with the held-out reward
    /// accuracy and margin).
    fn evaluate(&self, log: &mut MetricsLog) -> Result<(f64, f64)> {
        let eval = |split| {
            estimate(
                &self.model,
                &self.loss,
                &self.data,
                &self.cfg,
                self.seq,
                split,
                self.device,
            )
        };
        let (train, val) = (eval(Split::Train)?, eval(Split::Val)?);
        let preference = self.loss.is_preference();
        log.append(&Record {
            step: self.step,
            val_loss: Some(val[0]),
            train_loss: Some(train[0]),
            tokens_seen: Some(self.tokens_seen),
            reward_accuracy: preference.then_some(val[1]),
            reward_margin: preference.then_some(val[2]),
            ..Record::default()
        })?;
        Ok((train[0], val[0]))
    }

    /// Runs until `max_iters` steps are done or a stop is requested (see [`Stop`]); returns
    /// what happened. A regroup comes back as `stopped`, as does a shutdown, after which
    /// rank 0 has checkpointed the step it stopped at.
    pub fn run(&mut self, show_progress: bool) -> Result<TrainSummary> {
        match self.run_steps(show_progress) {
            Err(Error::Stopped(reason)) => Ok(self.summary(None, None, Some(reason))),
            other => other,
        }
    }

    /// With the exactly-once data order, the sequences of one epoch (counted once per run,
    /// over every shard).
    fn epoch_sequences(&self) -> Option<u64> {
        match self.cfg.job.data_order {
            DataOrder::Epochs => self.data.epoch_sequences(self.seq),
            DataOrder::Random => None,
        }
    }

    fn summary(
        &self,
        last_val: Option<f64>,
        last_checkpoint: Option<PathBuf>,
        stopped: Option<StopReason>,
    ) -> TrainSummary {
        TrainSummary {
            steps: self.step,
            final_val_loss: last_val,
            best_val_loss: self.best_val,
            last_checkpoint: last_checkpoint
                .unwrap_or_else(|| checkpoint::checkpoint_dir(&self.cfg.process.out, self.step)),
            plot: None,
            model_size: self.model_cfg.size_summary(),
            trained_params: self.opt.trained_numel(),
            optimizer_bytes: self.opt.state_bytes(),
            stopped,
            peak_gpu_bytes: self.peak_gpu_bytes,
        }
    }
}

/// The dropout seed of one micro-batch of one step.
fn dropout_seed(seed: u64, step: u64, micro: u64) -> i64 {
    (seed ^ step.wrapping_mul(0x9E37_79B9) ^ micro.wrapping_mul(0x85EB_CA6B).rotate_left(32)) as i64
}

/// How the run computes, for its banner: says when `--dtype auto` chose bf16 and why.
fn precision(asked: &str, kind: Kind, device: tch::Device) -> String {
    match (asked, kind) {
        ("auto", Kind::BFloat16) if device.is_cuda() => "bf16 mixed precision (auto: CUDA)".into(),
        ("auto", Kind::BFloat16) => {
            "bf16 mixed precision (auto: this CPU has native bf16; --dtype float32 to change)"
                .into()
        }
        ("auto", _) => "float32 (auto: no native bf16 on this device)".into(),
        (_, Kind::BFloat16) => "bf16 mixed precision".into(),
        _ => "float32".into(),
    }
}
