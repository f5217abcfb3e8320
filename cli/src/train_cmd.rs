//! `lillm train`, `lillm plot`, `lillm model`: configuration layering and the training run.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lillm_model::{ModelConfig, PRESETS};
use lillm_trainer::{plot, TrainConfig, TrainSummary, Trainer};

/// Every field of the training config as an optional flag; unset flags leave the value from
/// the lower layers (defaults < --config TOML < LILLM_* environment < flags).
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any fields of the training config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Model preset: lillm-39m, lillm-300m, tiny, or a Mixture of Experts: lillm-moe-8x39m,
    /// tiny-moe (`lillm model presets`).
    #[arg(long)]
    preset: Option<String>,
    /// Prepared dataset directory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, loss.png).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    block_size: Option<usize>,
    #[arg(long)]
    grad_accum: Option<usize>,
    #[arg(long)]
    max_iters: Option<u64>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long)]
    warmup_iters: Option<u64>,
    #[arg(long)]
    lr_decay_iters: Option<u64>,
    #[arg(long)]
    decay_lr: Option<bool>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    beta1: Option<f64>,
    #[arg(long)]
    beta2: Option<f64>,
    #[arg(long)]
    adam_eps: Option<f64>,
    #[arg(long)]
    grad_clip: Option<f64>,
    #[arg(long)]
    eval_interval: Option<u64>,
    #[arg(long)]
    eval_iters: Option<u64>,
    #[arg(long)]
    log_interval: Option<u64>,
    /// Most recent checkpoints to keep (the best-val one is always kept too).
    #[arg(long)]
    keep_last: Option<usize>,
    /// Also checkpoint every N steps, apart from evaluations (0: only at evaluations).
    #[arg(long)]
    checkpoint_interval: Option<u64>,
    /// Also checkpoint when this many minutes passed since the last one (0: off).
    #[arg(long)]
    checkpoint_minutes: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// auto, float32 or bfloat16.
    #[arg(long)]
    dtype: Option<String>,
    /// Device peak TFLOP/s for MFU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    #[arg(long)]
    threads: Option<usize>,
    /// Dropout on attention and FFN outputs.
    #[arg(long)]
    dropout: Option<f64>,
    #[arg(long)]
    d_model: Option<usize>,
    #[arg(long)]
    n_layers: Option<usize>,
    #[arg(long)]
    q_heads: Option<usize>,
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long)]
    max_seq_len: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// SwiGLU hidden size (default: derived from d_model as in the original).
    #[arg(long)]
    hidden_dim: Option<usize>,
    /// Mixture of Experts: experts per sparse layer (makes a dense preset sparse).
    #[arg(long)]
    experts: Option<usize>,
    /// Mixture of Experts: experts each token is routed to (top-k).
    #[arg(long)]
    experts_per_token: Option<usize>,
    /// Mixture of Experts: each expert's hidden size (default: the dense FFN's).
    #[arg(long)]
    expert_hidden_dim: Option<usize>,
    /// Mixture of Experts: sparse feed-forward on every n-th layer only.
    #[arg(long)]
    moe_every: Option<usize>,
    /// Mixture of Experts: add a shared expert every token goes through.
    #[arg(long)]
    shared_expert: Option<bool>,
    /// Mixture of Experts: weight of the load-balancing loss.
    #[arg(long)]
    aux_loss_coef: Option<f64>,
    /// Mixture of Experts: weight of the router z-loss.
    #[arg(long)]
    z_loss_coef: Option<f64>,
    /// Continue from the run directory's latest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start from this checkpoint's weights.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Where the run executes: here, as `--nproc` local ranks, or as part of a job.
    #[command(flatten)]
    pub(crate) launch: crate::job_cmd::LaunchArgs,
    /// This process's rank in a data-parallel job (set by --nproc or a launcher).
    #[arg(long)]
    rank: Option<usize>,
    /// Ranks in the job.
    #[arg(long)]
    world_size: Option<usize>,
    /// host:port of the rendezvous store that rank 0 serves.
    #[arg(long)]
    rendezvous: Option<String>,
    /// Compare parameters across ranks every N steps and stop if they differ (0 = never).
    #[arg(long)]
    check_params_every: Option<u64>,
}

/// `LILLM_<FIELD>` variables naming a config field (`LILLM_MODEL__D_MODEL` for nested ones).
fn env_overrides(known: &toml::Table) -> HashMap<String, String> {
    std::env::vars()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("LILLM_")?.to_ascii_lowercase();
            let top = key.split("__").next()?;
            known.contains_key(top).then(|| (key.replace("__", "."), v))
        })
        .collect()
}

pub(crate) fn resolve_config(args: &TrainArgs) -> Result<TrainConfig> {
    let defaults = TrainConfig::default();
    let default_table = toml::Table::try_from(&defaults)?;
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        &toml::to_string(&default_table)?,
        config::FileFormat::Toml,
    ));
    if let Some(path) = &args.config {
        if !path.is_file() {
            anyhow::bail!("{}: config file not found", path.display());
        }
        builder =
            builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
    }
    for (key, value) in env_overrides(&default_table) {
        builder = builder.set_override(key, value)?;
    }
    macro_rules! flag {
        ($($field:ident => $key:expr),* $(,)?) => {
            $(if let Some(v) = &args.$field {
                builder = builder.set_override($key, config::Value::from(v.clone()))?;
            })*
        };
    }
    let path_str = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let Some(p) = path_str(&args.data) {
        builder = builder.set_override("data", p)?;
    }
    if let Some(p) = path_str(&args.out) {
        builder = builder.set_override("out", p)?;
    }
    if let Some(p) = path_str(&args.init_from) {
        builder = builder.set_override("init_from", p)?;
    }
    if let Some(r) = &args.rendezvous {
        builder = builder.set_override("rendezvous", r.clone())?;
    }
    flag!(
        preset => "preset", device => "device", dtype => "dtype",
        lr => "lr", min_lr => "min_lr", weight_decay => "weight_decay", grad_clip => "grad_clip",
        peak_tflops => "peak_tflops", dropout => "model.dropout", decay_lr => "decay_lr",
        beta1 => "beta1", beta2 => "beta2", adam_eps => "adam_eps",
        checkpoint_minutes => "checkpoint_minutes", shared_expert => "model.moe.shared_expert",
        aux_loss_coef => "model.moe.aux_loss_coef", z_loss_coef => "model.moe.z_loss_coef",
    );
    macro_rules! int_flag {
        ($($field:ident => $key:expr),* $(,)?) => {
            $(if let Some(v) = args.$field {
                builder = builder.set_override($key, v as i64)?;
            })*
        };
    }
    int_flag!(
        batch_size => "batch_size", block_size => "block_size", grad_accum => "grad_accum",
        max_iters => "max_iters", warmup_iters => "warmup_iters", lr_decay_iters => "lr_decay_iters",
        eval_interval => "eval_interval", eval_iters => "eval_iters", log_interval => "log_interval",
        keep_last => "keep_last", seed => "seed", threads => "threads",
        checkpoint_interval => "checkpoint_interval",
        rank => "rank", world_size => "world_size", check_params_every => "check_params_every",
        d_model => "model.d_model", n_layers => "model.n_layers", q_heads => "model.q_heads",
        kv_heads => "model.kv_heads", max_seq_len => "model.max_seq_len", vocab_size => "model.vocab_size",
        hidden_dim => "model.hidden_dim", experts => "model.moe.experts",
        experts_per_token => "model.moe.experts_per_token",
        expert_hidden_dim => "model.moe.expert_hidden_dim", moe_every => "model.moe.every",
    );
    if args.resume {
        builder = builder.set_override("resume", true)?;
    }
    let cfg: TrainConfig = builder
        .build()?
        .try_deserialize()
        .context("invalid training config (check field names and value types)")?;
    cfg.validate()?;
    Ok(cfg)
}

/// Trains until done or until `shutdown` (SIGTERM/Ctrl-C), which checkpoints the current
/// step first so `--resume` continues with the very next batch.
pub fn run(args: TrainArgs, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    let cfg = resolve_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    if let Some(launched) = crate::job_cmd::launch(&cfg, &args.launch, args.threads, &shutdown) {
        return launched;
    }
    train_here(&cfg, &shutdown)?;
    Ok(())
}

/// Runs `cfg` in this process (as the rank it names) until done or `shutdown`; rank 0
/// writes the resolved config beside the run and prints the report.
pub fn train_here(
    cfg: &TrainConfig,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<TrainSummary> {
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("{}: cannot create the run directory", cfg.out.display()))?;
    let leader = cfg.rank == 0;
    let setup = lillm_trainer::Setup {
        stop: lillm_trainer::stop::Stop::new(shutdown),
        ..Default::default()
    };
    let mut trainer = Trainer::with(cfg.clone(), setup)?;
    if leader {
        let resolved = cfg.out.join("config.toml");
        std::fs::write(&resolved, toml::to_string_pretty(cfg)?)
            .with_context(|| format!("{}: cannot write", resolved.display()))?;
    }
    let summary = trainer.run(leader && crate::interactive())?;
    if leader {
        report(&summary, &cfg.out);
    }
    Ok(summary)
}

/// What a finished training or fine-tuning run prints.
pub fn report(summary: &TrainSummary, run: &std::path::Path) {
    println!(
        "trained {} steps of a model of {}",
        summary.steps, summary.model_size
    );
    println!(
        "trained parameters: {} (optimizer state {:.2} MiB)",
        summary.trained_params,
        summary.optimizer_bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(reason) = summary.stopped {
        println!("stopped early ({reason}); continue with --resume");
    }
    if let Some(v) = summary.final_val_loss {
        println!(
            "final val loss {v:.4} (best {:.4})",
            summary.best_val_loss.unwrap_or(v)
        );
    }
    if let Some(best) = lillm_trainer::checkpoint::best_checkpoint(run) {
        println!("best checkpoint: {}", best.display());
    }
    println!("checkpoint: {}", summary.last_checkpoint.display());
    if let Some(p) = &summary.plot {
        println!("loss plot: {}", p.display());
    }
}

#[derive(Args)]
pub struct PlotArgs {
    /// Run directory holding metrics.jsonl.
    run_dir: PathBuf,
}

pub fn plot(args: PlotArgs) -> Result<()> {
    let path = plot::plot_run(&args.run_dir)?;
    println!("{}", path.display());
    Ok(())
}

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Print a preset's shape and exact parameter counts (total, and active per token).
    Info {
        /// lillm-39m, lillm-300m, tiny, lillm-moe-8x39m or tiny-moe.
        #[arg(long, default_value = "lillm-39m")]
        preset: String,
    },
    /// List the presets.
    Presets,
    /// Write the logits (1, T, vocab) of token ids under a checkpoint to a safetensors file
    /// (tensor `logits`), for checking against other implementations.
    Logits {
        #[arg(long)]
        checkpoint: PathBuf,
        /// JSON array of token ids.
        #[arg(long)]
        ids: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn model(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Info { preset } => {
            let cfg = ModelConfig::preset(&preset)?;
            println!("{}", serde_json::to_string_pretty(&cfg)?);
            match &cfg.moe {
                None => println!("ffn hidden dim: {}", cfg.ffn_hidden_dim()),
                Some(_) => println!("expert hidden dim: {}", cfg.expert_hidden_dim()),
            }
            println!("parameters: {}", cfg.num_params());
            println!("active parameters per token: {}", cfg.active_params());
        }
        ModelCmd::Presets => PRESETS.iter().for_each(|p| println!("{p}")),
        ModelCmd::Logits {
            checkpoint,
            ids,
            out,
        } => {
            let loaded = lillm_checkpoint::LoadedModel::load(&checkpoint, tch::Device::Cpu)?;
            let ids: Vec<i64> =
                serde_json::from_str(&ids).context("--ids must be a JSON array of token ids")?;
            let vocab = loaded.model.config().vocab_size as i64;
            if ids.is_empty() || ids.iter().any(|&i| i < 0 || i >= vocab) {
                anyhow::bail!("--ids must be a non-empty array of ids in 0..{vocab}");
            }
            let x = tch::Tensor::from_slice(&ids).view([1, -1]);
            let logits = tch::no_grad(|| loaded.model.forward(&x, false));
            let map = std::collections::BTreeMap::from([("logits".to_string(), logits)]);
            lillm_model::weights::write_tensors(&out, &map)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
