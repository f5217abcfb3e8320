//! The typed training configuration. Defaults are the seed's `pretrain.py` values.

use std::path::PathBuf;

use lillm_data::epochs::DataOrder;
use lillm_model::{LoraConfig, ModelConfig};
use serde::{Deserialize, Serialize};

pub use crate::model_overrides::{ModelOverrides, MoeOverrides};
use crate::schedule::LrSchedule;
use crate::train::StepMode;
use crate::{Error, Result};

/// A training run: the job's settings, which every rank of a job shares, and this
/// process's own. In TOML, flags and `LILLM_*` variables alike, the two parts are one flat
/// table (`lillm train --print-config`). Built by the CLI from defaults < TOML file <
/// `LILLM_*` environment < flags; libraries and tests construct it directly.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub job: JobConfig,
    #[serde(flatten)]
    pub process: ProcessConfig,
}

/// What a job trains and how: identical on every rank (a member whose
/// [`JobConfig::fingerprint`] differs from the job's is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Model preset (`lillm-39m`, `lillm-300m`, `tiny`, `lillm-moe-8x39m`, `tiny-moe`);
    /// `model` fields override it.
    pub preset: String,
    /// Overrides of individual model fields (e.g. `d_model = 96`).
    #[serde(default)]
    pub model: ModelOverrides,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence (at most the model's `max_seq_len`; 0 = the model's
    /// `max_seq_len`, so every preset trains with its defaults).
    pub block_size: usize,
    /// Micro-batches per optimizer step (divided across ranks).
    pub grad_accum: usize,
    /// Optimizer steps to run in total.
    pub max_iters: u64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub decay_lr: bool,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Evaluate train and val loss every this many steps (and at the end).
    pub eval_interval: u64,
    /// Batches per split in each evaluation.
    pub eval_iters: u64,
    /// Log a training record every this many steps.
    pub log_interval: u64,
    /// Keep this many most recent checkpoints, plus the best-val one.
    pub keep_last: usize,
    /// Also checkpoint every this many steps, apart from evaluations (0: only when
    /// evaluating, at the end and on SIGTERM).
    #[serde(default)]
    pub checkpoint_interval: u64,
    /// Also checkpoint when this many minutes passed since the last checkpoint (0: never by
    /// time). Snapshots go to host memory; the training thread never waits on the disk.
    #[serde(default)]
    pub checkpoint_minutes: f64,
    /// Seed for initialisation, batch order and dropout.
    pub seed: u64,
    /// `auto` (bf16 on CUDA and on CPUs with native bf16 arithmetic, else float32),
    /// `float32` or `bfloat16`.
    pub dtype: String,
    /// Device peak TFLOP/s for MFU; unset: 989 (H100 SXM bf16) on CUDA, measured on CPU.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// Start from this checkpoint's weights and model config (fine-tuning); ignored when
    /// resuming.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// `pretrain` (token shards in `data`), `sft` (conversations JSONL in `data`) or `dpo`
    /// (preference pairs JSONL in `data`).
    #[serde(default)]
    pub objective: Objective,
    /// With several ranks, compare parameter checksums across ranks every this many steps
    /// and stop every rank if they differ (0 = never).
    #[serde(default = "default_check_params_every")]
    pub check_params_every: u64,
    /// SFT and DPO: fraction of conversations (pairs) held out for evaluation.
    #[serde(default = "default_val_fraction", alias = "sft_val_fraction")]
    pub val_fraction: f64,
    /// DPO: β, how far the policy may move from the reference (the implicit reward's scale).
    #[serde(default = "default_dpo_beta")]
    pub dpo_beta: f64,
    /// Fine-tune LoRA adapters on the frozen `init_from` weights instead of all weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Pretraining: `random` windows with replacement (the original lilLM's) or `epochs`,
    /// every `block_size + 1` sequence exactly once per epoch in a seeded order. Left out
    /// of the serialised config when random, so existing jobs keep their fingerprint.
    #[serde(default, skip_serializing_if = "is_random")]
    pub data_order: DataOrder,
    /// How next-token losses go through the output head: `full` logits of a micro-batch at
    /// once (the reference), `chunked` (a chunk of positions at a time, never all the
    /// logits), or `auto`: chunked (faster on a CPU as on a GPU). Left out of the serialised
    /// config when auto.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub head_loss: HeadLoss,
}

fn is_random(order: &DataOrder) -> bool {
    *order == DataOrder::Random
}

fn is_auto(head_loss: &HeadLoss) -> bool {
    *head_loss == HeadLoss::Auto
}

/// How the next-token loss goes through the output head (see [`JobConfig::head_loss`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadLoss {
    #[default]
    Auto,
    Full,
    Chunked,
}

impl HeadLoss {
    /// Whether the loss is computed a chunk at a time.
    pub fn chunked(self) -> bool {
        match self {
            Self::Auto | Self::Chunked => true,
            Self::Full => false,
        }
    }
}

/// Where this process reads, writes and computes, and its place in the job: may differ
/// from rank to rank and from one generation of a job to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Prepared dataset directory (`lillm data prepare --out`).
    pub data: PathBuf,
    /// Run directory: checkpoints, metrics.jsonl, loss.png.
    pub out: PathBuf,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads for libtorch (0 = libtorch's default).
    pub threads: usize,
    /// Continue from the run directory's latest valid checkpoint.
    pub resume: bool,
    /// Data-parallel ranks in the job (1 = single process).
    pub world_size: usize,
    /// This process's rank, 0-based.
    pub rank: usize,
    /// `host:port` of the rendezvous store (rank 0 serves it); needed when world_size > 1.
    pub rendezvous: Option<String>,
    /// Where this node caches what it fetches from object storage (default:
    /// `$XDG_CACHE_HOME/lillm` or `~/.cache/lillm`).
    pub cache_dir: Option<PathBuf>,
    /// The most the cache may hold of datasets: bytes, or 512M, 50G, 1T (default 100G).
    pub cache_bytes: Option<String>,
    /// Object-storage credentials (`key = value` lines, the AWS credentials-file form),
    /// when the usual environment variables are not set.
    pub credentials_file: Option<PathBuf>,
    /// The run directory's bucket URL when `out` named one (`s3://…`); `out` is then its
    /// local mirror in the cache. Set by [`TrainConfig::localize`], not by hand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_url: Option<String>,
    /// Record steps FIRST..END-1 with libtorch's profiler (`FIRST:END`, see
    /// [`crate::profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_steps: Option<String>,
    /// How a training step's forward and backward run: `auto` (a CUDA graph on CUDA when
    /// the model can be captured, eager elsewhere), `eager`, `static` (the graph's work
    /// uncaptured) or `graphs` (see [`crate::train::StepMode`]).
    #[serde(skip_serializing_if = "is_auto_step")]
    pub step_mode: StepMode,
}

fn is_auto_step(mode: &StepMode) -> bool {
    *mode == StepMode::Auto
}

impl ProcessConfig {
    /// Where and how this process reaches object storage.
    pub fn store_options(&self) -> Result<lillm_store::StoreOptions> {
        let cache_bytes = match &self.cache_bytes {
            Some(text) => lillm_store::cache::parse_bytes(text)
                .map_err(|e| Error::Config(format!("cache_bytes: {e}")))?,
            None => lillm_store::DEFAULT_CACHE_BYTES,
        };
        Ok(lillm_store::StoreOptions {
            cache_dir: self
                .cache_dir
                .clone()
                .unwrap_or_else(lillm_store::default_cache_dir),
            cache_bytes,
            credentials_file: self.credentials_file.clone(),
        })
    }

    /// The run directory in its bucket, when `out` is one.
    pub fn run_bucket(&self) -> Result<Option<lillm_store::RunBucket>> {
        match &self.out_url {
            Some(url) => Ok(Some(self.store_options()?.run(url)?)),
            None => Ok(None),
        }
    }
}

fn default_check_params_every() -> u64 {
    100
}

fn default_val_fraction() -> f64 {
    0.05
}

fn default_dpo_beta() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Next-token prediction on every token of the corpus.
    #[default]
    Pretrain,
    /// Next-token prediction on assistant tokens of chat conversations only.
    Sft,
    /// Direct Preference Optimization on (prompt, chosen, rejected) pairs, against a frozen
    /// copy of the initial checkpoint.
    Dpo,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            preset: "lillm-39m".into(),
            model: ModelOverrides::default(),
            batch_size: 128,
            block_size: 0,
            grad_accum: 8,
            max_iters: 20_000,
            lr: 6e-4,
            min_lr: 6e-5,
            warmup_iters: 2000,
            lr_decay_iters: 20_000,
            decay_lr: true,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            eval_interval: 200,
            eval_iters: 20,
            log_interval: 10,
            keep_last: 2,
            checkpoint_interval: 0,
            checkpoint_minutes: 0.0,
            seed: 1337,
            dtype: "auto".into(),
            peak_tflops: None,
            init_from: None,
            objective: Objective::Pretrain,
            check_params_every: default_check_params_every(),
            val_fraction: default_val_fraction(),
            dpo_beta: default_dpo_beta(),
            lora: None,
            data_order: DataOrder::Random,
            head_loss: HeadLoss::Auto,
        }
    }
}

/// The keys serde reads for the struct `T`, aliases included: what a config file may say.
pub fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldProbe(&mut names));
    names
}

/// A deserializer that only notes which fields a struct asks for.
struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("fields noted"))
    }

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        _visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("data"),
            out: PathBuf::from("runs/pretrain"),
            device: "auto".into(),
            threads: 0,
            resume: false,
            world_size: 1,
            rank: 0,
            rendezvous: None,
            cache_dir: None,
            cache_bytes: None,
            credentials_file: None,
            out_url: None,
            profile_steps: None,
            step_mode: StepMode::Auto,
        }
    }
}

impl JobConfig {
    /// The model config: the preset with overrides applied, validated.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let mut cfg = ModelConfig::preset(&self.preset)?;
        let o = &self.model;
        cfg.vocab_size = o.vocab_size.unwrap_or(cfg.vocab_size);
        cfg.d_model = o.d_model.unwrap_or(cfg.d_model);
        cfg.n_layers = o.n_layers.unwrap_or(cfg.n_layers);
        cfg.max_seq_len = o.max_seq_len.unwrap_or(cfg.max_seq_len);
        cfg.q_heads = o.q_heads.unwrap_or(cfg.q_heads);
        cfg.kv_heads = o.kv_heads.unwrap_or(cfg.kv_heads);
        cfg.hidden_dim = o.hidden_dim.or(cfg.hidden_dim);
        cfg.dropout = o.dropout.unwrap_or(cfg.dropout);
        if !o.moe.is_empty() {
            cfg.moe = Some(o.moe.apply(cfg.moe.take())?);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_iters: self.warmup_iters,
            lr_decay_iters: self.lr_decay_iters,
            decay_lr: self.decay_lr,
        }
    }

    /// Hash of the job's settings, which every rank must share.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("config serialises");
        hex::encode(&Sha256::digest(&json)[..8])
    }

    /// Checks values the loop relies on; each error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.data_order == DataOrder::Epochs && self.objective != Objective::Pretrain {
            return bad(
                "data_order = epochs orders token shards: it is for pretraining only (SFT and DPO draw conversations and pairs)".into(),
            );
        }
        if self.objective == Objective::Dpo {
            if self.init_from.is_none() {
                return bad("DPO needs init_from: the checkpoint the policy and its frozen reference start from".into());
            }
            if self.dpo_beta.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                return bad(format!("beta must be positive, got {}", self.dpo_beta));
            }
        }
        if let Some(lora) = &self.lora {
            if self.init_from.is_none() {
                return bad(
                    "LoRA adapts a trained model: set init_from (--init), the base checkpoint"
                        .into(),
                );
            }
            lora.validate()?;
        }
        if self.init_from.is_none() {
            self.check_against_model(&self.model_config()?)?;
        }
        for (field, v) in [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("keep_last", self.keep_last),
        ] {
            if v == 0 {
                return bad(format!("{field} must be at least 1, got 0"));
            }
        }
        for (field, v) in [
            ("eval_interval", self.eval_interval),
            ("eval_iters", self.eval_iters),
            ("log_interval", self.log_interval),
        ] {
            if v == 0 {
                return bad(format!(
                    "{field} must be at least 1 (steps between two), got 0"
                ));
            }
        }
        if !(self.checkpoint_minutes >= 0.0 && self.checkpoint_minutes.is_finite()) {
            return bad(format!(
                "checkpoint_minutes must be 0 (off) or a positive number of minutes, got {}",
                self.checkpoint_minutes
            ));
        }
        if self.lr.is_nan() || self.lr <= 0.0 || self.min_lr < 0.0 || self.min_lr > self.lr {
            return bad(format!(
                "need 0 <= min_lr <= lr and lr > 0, got lr={} min_lr={}",
                self.lr, self.min_lr
            ));
        }
        lillm_model::parse_dtype(&self.dtype).map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
    }

    /// Checks the settings that depend on the model's shape.
    pub fn check_against_model(&self, model: &ModelConfig) -> Result<()> {
        if self.objective == Objective::Pretrain && self.block_size > model.max_seq_len {
            return Err(Error::Config(format!(
                "block_size ({}) exceeds the model's max_seq_len ({}); lower block_size or raise model.max_seq_len",
                self.block_size, model.max_seq_len
            )));
        }
        Ok(())
    }

    /// Tokens per sequence: `block_size` for pretraining; for SFT and DPO the model's
    /// context, since every kept conversation (reply) is shorter than it.
    pub fn sequence_len(&self, model: &ModelConfig) -> usize {
        match self.objective {
            Objective::Pretrain if self.block_size > 0 => self.block_size,
            Objective::Pretrain | Objective::Sft | Objective::Dpo => model.max_seq_len,
        }
    }

    /// Activation dtype (weights and optimizer state stay float32): bf16 on CUDA and on CPUs
    /// with native bf16 arithmetic (see [`cpu_has_native_bf16`]), else float32, unless set
    /// explicitly.
    pub fn compute_kind(&self, device: tch::Device) -> tch::Kind {
        match lillm_model::parse_dtype(&self.dtype) {
            Ok(Some(kind)) => kind,
            _ if device.is_cuda() || cpu_has_native_bf16() => tch::Kind::BFloat16,
            _ => tch::Kind::Float,
        }
    }
}

impl TrainConfig {
    /// Checks the job's settings and this process's place in it; each error names the field.
    /// An `out` that names a bucket becomes its local mirror in the cache, the URL kept in
    /// `out_url`; the bucket is checked now (a missing bucket, wrong credentials or an
    /// unreachable endpoint fail before any training).
    pub fn localize(&mut self) -> Result<()> {
        let out = self.process.out.to_string_lossy().into_owned();
        if self.process.out_url.is_some() || !lillm_store::is_url(&out) {
            return Ok(());
        }
        let options = self.process.store_options()?;
        let run = options.run(&out)?;
        run.probe()?;
        self.process.out = run.mirror().to_path_buf();
        self.process.out_url = Some(run.url().to_string());
        Ok(())
    }

    /// Writes the resolved configuration beside the run's checkpoints (`RUN/config.toml`):
    /// every setting the run used, whether it came from a file, a flag or a default.
    pub fn write_resolved(&self) -> Result<std::path::PathBuf> {
        let path = self.process.out.join("config.toml");
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot write the config as TOML: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }

    pub fn validate(&self) -> Result<()> {
        self.job.validate()?;
        self.profile_steps()?;
        let (rank, world_size) = (self.process.rank, self.process.world_size);
        if world_size == 0 || rank >= world_size {
            return Err(Error::Config(format!(
                "rank {rank} is not within world_size {world_size}"
            )));
        }
        if !self.job.grad_accum.is_multiple_of(world_size) {
            return Err(Error::Config(format!(
                "grad_accum ({}) must be divisible by world_size ({world_size}): the accumulation steps are divided across ranks",
                self.job.grad_accum
            )));
        }
        Ok(())
    }

    /// The steps `--profile-steps` records, when given.
    pub fn profile_steps(&self) -> Result<Option<crate::profile::StepRange>> {
        self.process
            .profile_steps
            .as_deref()
            .map(crate::profile::StepRange::parse)
            .transpose()
    }

    /// The c10d rendezvous of this rank, when the job has several.
    pub fn rendezvous(&self) -> Result<Option<crate::dist::Rendezvous>> {
        if self.process.world_size == 1 {
            return Ok(None);
        }
        let Some(addr) = self.process.rendezvous.as_deref() else {
            return Err(Error::Config(
                "world_size > 1 needs rendezvous = \"host:port\" (or a coordinator: --coordinator)"
                    .into(),
            ));
        };
        let (host, port) = addr
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            .ok_or_else(|| Error::Config(format!("rendezvous `{addr}` is not host:port")))?;
        Ok(Some(crate::dist::Rendezvous {
            store_host: host.clone(),
            store_port: port,
            bind_host: host,
            rank: self.process.rank,
            world_size: self.process.world_size,
            prefix: "lillm/0".into(),
            timeout_ms: 600_000,
        }))
    }

    /// The libtorch device this config asks for.
    pub fn device(&self) -> Result<tch::Device> {
        Ok(parse_device(&self.process.device)?)
    }
}

pub use lillm_model::{cpu_has_native_bf16, parse_device};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flat_table_splits_by_field_name_into_job_and_process() {
        let process = field_names::<ProcessConfig>();
        let job = field_names::<JobConfig>();
        assert!(process.contains(&"rank") && process.contains(&"out"));
        assert!(job.contains(&"lr") && job.contains(&"sft_val_fraction"));
        assert!(job.iter().all(|k| !process.contains(k)));
    }
}
