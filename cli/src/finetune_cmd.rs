//! `lillm sft` (and `lillm data sft-render`): supervised fine-tuning on conversations.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lillm_data::sft;
use lillm_data::tokenizer::Tokenizer;
use lillm_model::LoraConfig;
use lillm_trainer::config::{ModelOverrides, Objective};
use lillm_trainer::{JobConfig, ProcessConfig, TrainConfig};

#[derive(Args)]
pub struct SftArgs {
    /// Pretrained checkpoint (or run directory) to start from; its tokenizer is used.
    #[arg(long)]
    init: PathBuf,
    /// Conversations JSONL (`conversation` or `messages`: a list of {role, content}).
    #[arg(long)]
    data: PathBuf,
    /// Run directory.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 300)]
    max_iters: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Constant learning rate (the seed's SFT uses 3e-4).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Dropout during fine-tuning (the seed's SFT uses 0.2).
    #[arg(long, default_value_t = 0.2)]
    dropout: f64,
    /// Fraction of conversations held out for evaluation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[command(flatten)]
    run: FineTuneRun,
}

/// LoRA flags of `sft` and `dpo`.
#[derive(Args)]
pub struct LoraArgs {
    /// Train LoRA adapters of this rank on the frozen --init weights instead of all weights
    /// (the original: 8); checkpoints then hold only the adapters.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA scale numerator: adapters add (alpha / rank)·B·A.
    #[arg(long, default_value_t = 16.0, requires = "lora_rank")]
    lora_alpha: f64,
    /// Projections that get adapters, among wq, wk, wv, wo, w1, w2, w3 (default: the
    /// square ones, wq and wo, as the original).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "wq,wo",
        requires = "lora_rank"
    )]
    lora_targets: Vec<String>,
}

impl LoraArgs {
    fn config(&self) -> Option<LoraConfig> {
        self.lora_rank.map(|rank| LoraConfig {
            rank,
            alpha: self.lora_alpha,
            targets: self.lora_targets.clone(),
        })
    }
}

/// The flags `sft` and `dpo` share: evaluation and logging, seed, LoRA, and where the run
/// executes.
#[derive(Args)]
pub struct FineTuneRun {
    #[arg(long, default_value_t = 50)]
    eval_interval: u64,
    /// Batches per split in each evaluation.
    #[arg(long, default_value_t = 5)]
    eval_iters: u64,
    #[arg(long, default_value_t = 10)]
    log_interval: u64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Continue the run in --out from its latest checkpoint (same --init, data and flags).
    #[arg(long)]
    resume: bool,
    /// CPU threads for libtorch (default: libtorch's; with --nproc, a share of the cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    lora: LoraArgs,
    /// Where a bucket's --data, --init or --out is cached, and its credentials.
    #[command(flatten)]
    store: lillm_store::StoreArgs,
    /// Here, as `--nproc` local ranks (grad-accum is divided over them), or in a job.
    #[command(flatten)]
    launch: crate::job_cmd::LaunchArgs,
}

impl FineTuneRun {
    /// The run of `job` (its objective, data shape and optimizer) on `data` into `out`:
    /// a constant learning rate, one checkpoint kept, and these flags.
    fn config(&self, job: JobConfig, data: PathBuf, out: PathBuf) -> TrainConfig {
        TrainConfig {
            job: JobConfig {
                min_lr: job.lr,
                decay_lr: false,
                warmup_iters: 0,
                eval_interval: self.eval_interval,
                eval_iters: self.eval_iters,
                log_interval: self.log_interval,
                seed: self.seed,
                keep_last: 1,
                lora: self.lora.config(),
                ..job
            },
            process: ProcessConfig {
                data,
                out,
                device: self.device.clone(),
                resume: self.resume,
                threads: self.threads.unwrap_or(0),
                cache_dir: self.store.cache_dir.clone(),
                cache_bytes: self.store.cache_bytes.map(|b| b.to_string()),
                credentials_file: self.store.credentials_file.clone(),
                ..ProcessConfig::default()
            },
        }
    }

    /// Runs `cfg` here or as `--nproc` ranks or in a job (see [`crate::job_cmd::launch`]).
    fn train(
        &self,
        cfg: &TrainConfig,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<lillm_trainer::TrainSummary>> {
        if let Some(launched) = crate::job_cmd::launch(cfg, &self.launch, self.threads, shutdown) {
            return launched.map(|()| None);
        }
        Ok(Some(crate::train_cmd::train_here(cfg, shutdown)?))
    }
}

/// Fine-tunes until done or until `shutdown` (SIGTERM/Ctrl-C), which checkpoints the
/// current step first so `--resume` continues it.
pub fn sft(args: SftArgs, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    let job = JobConfig {
        objective: Objective::Sft,
        init_from: Some(args.init),
        max_iters: args.max_iters,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        model: ModelOverrides {
            dropout: Some(args.dropout),
            ..Default::default()
        },
        val_fraction: args.val_fraction,
        ..JobConfig::default()
    };
    let cfg = args.run.config(job, args.data, args.out);
    args.run.train(&cfg, &shutdown)?;
    Ok(())
}

#[derive(Args)]
pub struct SftRenderArgs {
    /// tokenizer.json or a directory holding one.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Conversations JSONL.
    #[arg(long)]
    input: PathBuf,
    /// Conversations whose encoding has at least this many tokens are dropped (and counted).
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
}

/// Prints `{"text", "ids", "mask"}` per kept conversation: exactly what SFT learns from.
pub fn sft_render(args: SftRenderArgs) -> Result<()> {
    let tok = Tokenizer::load(&args.tokenizer)?;
    let mut dropped = 0;
    for conv in sft::read_conversations(&args.input)? {
        let (text, ex) = sft::encode_conversation(&tok, &conv)?;
        if ex.ids.len() >= args.max_seq_len {
            dropped += 1;
            continue;
        }
        println!(
            "{}",
            serde_json::json!({"text": text, "ids": ex.ids, "mask": ex.mask})
        );
    }
    eprintln!(
        "filtered {dropped} conversation(s) with ≥ {} tokens",
        args.max_seq_len
    );
    Ok(())
}

#[derive(Args)]
pub struct DpoArgs {
    /// Checkpoint (or run directory) to start from; also the frozen reference model.
    #[arg(long)]
    init: PathBuf,
    /// Pairs JSONL: {"prompt": text or [{role, content}], "chosen": text, "rejected": text}.
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Strength of the KL anchor to the reference.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 200)]
    max_iters: u64,
    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches per step (divided over the ranks with --nproc).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Fraction of pairs held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// With LoRA the policy is --init plus adapters; the reference is --init itself.
    #[command(flatten)]
    run: FineTuneRun,
}

/// Preference-tunes until done or until `shutdown`, through the same engine as `sft`.
pub fn dpo(args: DpoArgs, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    let job = JobConfig {
        objective: Objective::Dpo,
        init_from: Some(args.init),
        dpo_beta: args.beta,
        max_iters: args.max_iters,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        weight_decay: 0.0,
        // The policy is the reference at step 0 and neither drops out.
        model: ModelOverrides {
            dropout: Some(0.0),
            ..Default::default()
        },
        val_fraction: args.val_fraction,
        ..JobConfig::default()
    };
    let cfg = args.run.config(job, args.data, args.out);
    let Some(summary) = args.run.train(&cfg, &shutdown)? else {
        return Ok(());
    };
    // The held-out figures at the start (the reference's) and at the last evaluation.
    let evals: Vec<_> =
        lillm_trainer::metrics::read_records(&cfg.process.out.join("metrics.jsonl"))?
            .into_iter()
            .filter(|r| r.reward_accuracy.is_some() && r.val_loss.is_some())
            .collect();
    if let (Some(first), Some(last), None) = (evals.first(), evals.last(), summary.stopped) {
        let figures = |r: &lillm_trainer::metrics::Record| {
            (
                r.reward_accuracy.unwrap_or(0.0),
                r.reward_margin.unwrap_or(0.0),
                r.val_loss.unwrap_or(0.0),
            )
        };
        let ((a0, m0, l0), (a1, m1, l1)) = (figures(first), figures(last));
        println!(
            "held-out reward accuracy {a0:.3} → {a1:.3}, margin {m0:.3} → {m1:.3}, loss {l0:.4} → {l1:.4}"
        );
    }
    Ok(())
}
