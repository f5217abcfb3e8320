//! `lillm sft` (and `lillm data sft-render`): supervised fine-tuning on conversations.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lillm_data::sft;
use lillm_data::tokenizer::Tokenizer;
use lillm_trainer::config::{ModelOverrides, Objective};
use lillm_trainer::{TrainConfig, Trainer};

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
    #[arg(long, default_value_t = 50)]
    eval_interval: u64,
    #[arg(long, default_value_t = 5)]
    eval_iters: u64,
    #[arg(long, default_value_t = 10)]
    log_interval: u64,
    /// Fraction of conversations held out for evaluation.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// CPU threads for libtorch (default: libtorch's; with --nproc, a share of the cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Here, as `--nproc` local ranks (grad-accum is divided over them), or in a job.
    #[command(flatten)]
    launch: crate::job_cmd::LaunchArgs,
}

/// Fine-tunes until done or until `shutdown` (SIGTERM/Ctrl-C), which checkpoints the
/// current step first so `--resume` continues it.
pub fn sft(args: SftArgs, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    let cfg = TrainConfig {
        objective: Objective::Sft,
        init_from: Some(args.init),
        data: args.data,
        out: args.out,
        max_iters: args.max_iters,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        min_lr: args.lr,
        decay_lr: false,
        warmup_iters: 0,
        model: ModelOverrides {
            dropout: Some(args.dropout),
            ..Default::default()
        },
        eval_interval: args.eval_interval,
        eval_iters: args.eval_iters,
        log_interval: args.log_interval,
        sft_val_fraction: args.val_fraction,
        seed: args.seed,
        device: args.device,
        resume: args.resume,
        keep_last: 1,
        threads: args.threads.unwrap_or(0),
        ..TrainConfig::default()
    };
    if let Some(launched) = crate::job_cmd::launch(&cfg, &args.launch, args.threads, &shutdown) {
        return launched;
    }
    std::fs::create_dir_all(&cfg.out)?;
    let setup = lillm_trainer::Setup {
        stop: lillm_trainer::stop::Stop::new(&shutdown),
        ..Default::default()
    };
    let mut trainer = Trainer::with(cfg.clone(), setup)?;
    std::fs::write(cfg.out.join("config.toml"), toml::to_string_pretty(&cfg)?)?;
    let summary = trainer.run(crate::interactive())?;
    crate::train_cmd::report(&summary, &cfg.out);
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
    /// Pairs per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 50)]
    eval_interval: u64,
    #[arg(long, default_value_t = 10)]
    log_interval: u64,
    /// Fraction of pairs held out for evaluation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Continue the run in --out from its latest checkpoint (same --init, data and flags).
    #[arg(long)]
    resume: bool,
}

pub fn dpo(args: DpoArgs) -> Result<()> {
    let device = lillm_trainer::config::parse_device(&args.device)?;
    let cfg = lillm_trainer::dpo::DpoConfig {
        init: args.init,
        data: args.data,
        out: args.out,
        beta: args.beta,
        lr: args.lr,
        weight_decay: 0.0,
        grad_clip: 1.0,
        max_iters: args.max_iters,
        batch_size: args.batch_size,
        eval_interval: args.eval_interval,
        log_interval: args.log_interval,
        val_fraction: args.val_fraction,
        seed: args.seed,
        device,
        resume: args.resume,
    };
    let s = lillm_trainer::dpo::run_dpo(&cfg, crate::interactive())?;
    println!(
        "DPO: {} steps on {} pairs ({} held out, {} filtered as too long)",
        s.steps, s.train_pairs, s.val_pairs, s.filtered
    );
    println!(
        "held-out reward accuracy {:.3} → {:.3}, margin {:.3} → {:.3}, loss {:.4} → {:.4}",
        s.initial.reward_accuracy,
        s.last.reward_accuracy,
        s.initial.reward_margin,
        s.last.reward_margin,
        s.initial.loss,
        s.last.loss
    );
    println!("checkpoint: {}", s.last_checkpoint.display());
    if let Some(p) = s.plot {
        println!("loss plot: {}", p.display());
    }
    Ok(())
}
