//! The typed training configuration. Defaults are the seed's `pretrain.py` values.

use std::path::PathBuf;

use lillm_model::{LoraConfig, ModelConfig, MoeConfig};
use serde::{Deserialize, Serialize};

use crate::schedule::LrSchedule;
use crate::{Error, Result};

/// Everything a training run needs. Built by the CLI from defaults < TOML file < `LILLM_*`
/// environment < flags; libraries and tests construct it directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model preset (`lillm-39m`, `lillm-300m`, `tiny`, `lillm-moe-8x39m`, `tiny-moe`);
    /// `model` fields override it.
    pub preset: String,
    /// Overrides of individual model fields (e.g. `d_model = 96`).
    #[serde(default)]
    pub model: ModelOverrides,
    /// Prepared dataset directory (`lillm data prepare --out`).
    pub data: PathBuf,
    /// Run directory: checkpoints, metrics.jsonl, loss.png.
    pub out: PathBuf,
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
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `auto` (bf16 on CUDA, float32 on CPU), `float32` or `bfloat16`.
    pub dtype: String,
    /// Device peak TFLOP/s for MFU; unset: 989 (H100 SXM bf16) on CUDA, measured on CPU.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// CPU threads for libtorch (0 = libtorch's default).
    pub threads: usize,
    /// Continue from the run directory's latest valid checkpoint.
    pub resume: bool,
    /// Start from this checkpoint's weights and model config (fine-tuning); ignored when
    /// resuming.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// `pretrain` (token shards in `data`), `sft` (conversations JSONL in `data`) or `dpo`
    /// (preference pairs JSONL in `data`).
    #[serde(default)]
    pub objective: Objective,
    /// Data-parallel ranks in the job (1 = single process).
    #[serde(default = "one")]
    pub world_size: usize,
    /// This process's rank, 0-based.
    #[serde(default)]
    pub rank: usize,
    /// `host:port` of the rendezvous store (rank 0 serves it); needed when world_size > 1.
    #[serde(default)]
    pub rendezvous: Option<String>,
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
}

fn default_check_params_every() -> u64 {
    100
}

fn one() -> usize {
    1
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

/// Optional per-field overrides of the preset's model config (`[model]` in TOML; the same
/// names as `lillm train` flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    #[arg(long)]
    pub vocab_size: Option<usize>,
    #[arg(long)]
    pub d_model: Option<usize>,
    #[arg(long)]
    pub n_layers: Option<usize>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[arg(long)]
    pub q_heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// SwiGLU hidden size (default: derived from d_model as in the original).
    #[arg(long)]
    pub hidden_dim: Option<usize>,
    /// Dropout on attention and FFN outputs.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// Mixture-of-Experts fields (`[model.moe]`): change an MoE preset's, or make a dense
    /// preset sparse by setting `experts`.
    #[serde(default, skip_serializing_if = "MoeOverrides::is_empty")]
    #[command(flatten)]
    pub moe: MoeOverrides,
}

/// Optional overrides of the fields of [`MoeConfig`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct MoeOverrides {
    /// Mixture of Experts: experts per sparse layer (makes a dense preset sparse).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Mixture of Experts: experts each token is routed to (top-k).
    #[arg(long)]
    pub experts_per_token: Option<usize>,
    /// Mixture of Experts: each expert's hidden size (default: the dense FFN's).
    #[arg(long)]
    pub expert_hidden_dim: Option<usize>,
    /// Mixture of Experts: add a shared expert every token goes through.
    #[arg(long)]
    pub shared_expert: Option<bool>,
    /// Mixture of Experts: weight of the load-balancing loss.
    #[arg(long)]
    pub aux_loss_coef: Option<f64>,
    /// Mixture of Experts: weight of the router z-loss.
    #[arg(long)]
    pub z_loss_coef: Option<f64>,
    /// Mixture of Experts: sparse feed-forward on every n-th layer only.
    #[arg(long = "moe-every")]
    pub every: Option<usize>,
}

impl MoeOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `base` (the preset's MoE section, if any) with these fields set.
    fn apply(&self, base: Option<MoeConfig>) -> Result<MoeConfig> {
        let mut moe = match (base, self.experts) {
            (Some(moe), _) => moe,
            (None, Some(experts)) => MoeConfig::new(experts, 2.min(experts), None),
            (None, None) => {
                return Err(Error::Config(
                    "model.moe sets fields of a dense preset without model.moe.experts; set it (--experts N) or choose an MoE preset (tiny-moe, lillm-moe-8x39m)".into(),
                ))
            }
        };
        moe.experts = self.experts.unwrap_or(moe.experts);
        moe.experts_per_token = self.experts_per_token.unwrap_or(moe.experts_per_token);
        moe.expert_hidden_dim = self.expert_hidden_dim.or(moe.expert_hidden_dim);
        moe.shared_expert = self.shared_expert.unwrap_or(moe.shared_expert);
        moe.aux_loss_coef = self.aux_loss_coef.unwrap_or(moe.aux_loss_coef);
        moe.z_loss_coef = self.z_loss_coef.unwrap_or(moe.z_loss_coef);
        moe.every = self.every.unwrap_or(moe.every);
        Ok(moe)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            preset: "lillm-39m".into(),
            model: ModelOverrides::default(),
            data: PathBuf::from("data"),
            out: PathBuf::from("runs/pretrain"),
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
            device: "auto".into(),
            dtype: "auto".into(),
            peak_tflops: None,
            threads: 0,
            resume: false,
            init_from: None,
            objective: Objective::Pretrain,
            world_size: 1,
            rank: 0,
            rendezvous: None,
            check_params_every: default_check_params_every(),
            val_fraction: default_val_fraction(),
            dpo_beta: default_dpo_beta(),
            lora: None,
        }
    }
}

impl TrainConfig {
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

    /// Hash of everything that must be equal on every rank of a job: the config minus the
    /// per-process fields (rank, world size, rendezvous, threads, resume, device, data path).
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let shared = TrainConfig {
            rank: 0,
            world_size: 1,
            rendezvous: None,
            threads: 0,
            resume: false,
            device: String::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            ..self.clone()
        };
        let json = serde_json::to_vec(&shared).expect("config serialises");
        hex::encode(&Sha256::digest(&json)[..8])
    }

    /// Checks values the loop relies on; each error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
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
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} is not within world_size {}",
                self.rank, self.world_size
            ));
        }
        if !self.grad_accum.is_multiple_of(self.world_size) {
            return bad(format!(
                "grad_accum ({}) must be divisible by world_size ({}): the accumulation steps are divided across ranks",
                self.grad_accum, self.world_size
            ));
        }
        if !matches!(self.dtype.as_str(), "auto" | "float32" | "bfloat16") {
            return bad(format!(
                "dtype `{}` is not one of auto, float32, bfloat16",
                self.dtype
            ));
        }
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

    /// The c10d rendezvous of this rank, when the job has several.
    pub fn rendezvous(&self) -> Result<Option<crate::dist::Rendezvous>> {
        if self.world_size == 1 {
            return Ok(None);
        }
        let Some(addr) = self.rendezvous.as_deref() else {
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
            rank: self.rank,
            world_size: self.world_size,
            prefix: "lillm/0".into(),
            timeout_ms: 600_000,
        }))
    }

    /// The libtorch device this config asks for.
    pub fn device(&self) -> Result<tch::Device> {
        Ok(parse_device(&self.device)?)
    }

    /// Activation dtype (weights and optimizer state stay float32): bf16 on CUDA and on CPUs
    /// with native bf16 arithmetic (see [`cpu_has_native_bf16`]), else float32, unless set
    /// explicitly.
    pub fn compute_kind(&self, device: tch::Device) -> tch::Kind {
        match self.dtype.as_str() {
            "float32" => tch::Kind::Float,
            "bfloat16" => tch::Kind::BFloat16,
            _ if device.is_cuda() || cpu_has_native_bf16() => tch::Kind::BFloat16,
            _ => tch::Kind::Float,
        }
    }
}

/// Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX-BF16), where bf16
/// mixed precision roughly doubles training throughput over float32 (2.15× for lillm-39m on
/// an AVX512-BF16 CPU); elsewhere libtorch emulates bf16 and it is slower.
pub fn cpu_has_native_bf16() -> bool {
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| cpu_flags_have_bf16(&info))
    })
}

fn cpu_flags_have_bf16(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|flag| flag == "avx512_bf16" || flag == "amx_bf16")
}

pub use lillm_model::parse_device;

#[cfg(test)]
mod tests {
    #[test]
    fn native_bf16_is_read_from_the_cpu_flags() {
        let with = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n";
        let amx = "flags\t\t: fpu amx_bf16 amx_tile\n";
        let without = "flags\t\t: fpu sse avx2 avx512f\nbugs\t\t: avx512_bf16\n";
        assert!(super::cpu_flags_have_bf16(with));
        assert!(super::cpu_flags_have_bf16(amx));
        assert!(!super::cpu_flags_have_bf16(without));
    }
}
