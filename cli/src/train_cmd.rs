//! `lillm train`, `lillm plot`, `lillm model`: configuration layering and the training run.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lillm_model::{ModelConfig, PRESETS};
use lillm_trainer::config::{field_names, ModelOverrides};
use lillm_trainer::{plot, JobConfig, ProcessConfig, TrainConfig, TrainSummary, Trainer};
use serde::Serialize;

/// `lillm train`: where the config comes from, its fields as flags, and where it runs.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any fields of the training config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    fields: ConfigFlags,
    /// Where the run executes: here, as `--nproc` local ranks, or as part of a job.
    #[command(flatten)]
    pub(crate) launch: crate::job_cmd::LaunchArgs,
}

/// Every field of [`TrainConfig`] as an optional flag, in the config's own shape: what is
/// set here serialises into the top layer of the config (defaults < --config TOML <
/// `LILLM_*` environment < flags), so a flag and a TOML key are one name.
#[derive(Args, Debug, Default, Serialize)]
struct ConfigFlags {
    #[command(flatten)]
    #[serde(flatten)]
    job: JobFlags,
    #[command(
        flatten,
        next_help_heading = "This process (may differ from rank to rank)"
    )]
    #[serde(flatten)]
    process: ProcessFlags,
}

/// [`JobConfig`]'s fields: what every rank of a job shares.
#[derive(Args, Debug, Default, Serialize)]
struct JobFlags {
    /// Model preset: lillm-39m, lillm-300m, tiny, or a Mixture of Experts: lillm-moe-8x39m,
    /// tiny-moe (`lillm model presets`).
    #[arg(long)]
    preset: Option<String>,
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
    /// auto, float32 or bfloat16.
    #[arg(long)]
    dtype: Option<String>,
    /// Device peak TFLOP/s for MFU.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Start from this checkpoint's weights.
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Compare parameters across ranks every N steps and stop if they differ (0 = never).
    #[arg(long)]
    check_params_every: Option<u64>,
    /// random (windows drawn with replacement, as the original lilLM) or epochs (every
    /// block_size + 1 sequence exactly once per epoch, in a seeded order).
    #[arg(long)]
    data_order: Option<String>,
    /// auto (chunked), full (the whole micro-batch's logits at once: the reference) or
    /// chunked (a chunk of positions at a time, never all the logits).
    #[arg(long)]
    head_loss: Option<String>,
    /// The model's shape (`[model]` in TOML), over the preset's.
    #[command(flatten)]
    model: ModelOverrides,
}

/// [`ProcessConfig`]'s fields.
#[derive(Args, Debug, Default, Serialize)]
struct ProcessFlags {
    /// Prepared dataset directory, or its bucket URL (`s3://bucket/prefix/`).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl, loss.png), or a bucket URL: checkpoints
    /// are then committed there, mirrored locally in --cache-dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    #[arg(long)]
    threads: Option<usize>,
    /// Continue from the run directory's latest valid checkpoint.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    resume: bool,
    /// This process's rank in a data-parallel job (set by --nproc or a launcher).
    #[arg(long)]
    rank: Option<usize>,
    /// Ranks in the job.
    #[arg(long)]
    world_size: Option<usize>,
    /// host:port of the rendezvous store that rank 0 serves.
    #[arg(long)]
    rendezvous: Option<String>,
    /// Where this node caches datasets and run directories from object storage
    /// [default: $XDG_CACHE_HOME/lillm or ~/.cache/lillm].
    #[arg(long, env = "LILLM_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The most the cache may hold of dataset shards (bytes, or 512M, 50G, 1T) [default: 100G].
    #[arg(long, env = "LILLM_CACHE_BYTES")]
    cache_bytes: Option<String>,
    /// Object-storage credentials file (`key = value` lines, AWS credentials-file form), for
    /// when the usual variables (AWS_ACCESS_KEY_ID, …) are not set.
    #[arg(long, env = "LILLM_CREDENTIALS_FILE")]
    credentials_file: Option<PathBuf>,
    /// Record steps FIRST..END-1 with libtorch's profiler (e.g. 20:25): each rank writes a
    /// Chrome trace and a table of the longest kernels (CUDA) and operators to the run
    /// directory (profile-rank<R>.json, .txt); the first rank prints its table.
    #[arg(long)]
    profile_steps: Option<String>,
    /// How a step's forward and backward run: auto (one CUDA graph replayed per
    /// micro-batch on CUDA, eager elsewhere), eager, static (the graph's work uncaptured:
    /// checks it without a GPU) or graphs.
    #[arg(long)]
    step_mode: Option<String>,
}

/// `LILLM_<FIELD>` variables naming a config field (`LILLM_MODEL__D_MODEL` for nested ones)
/// as a table of strings (typed when the config is read); other `LILLM_*` variables
/// (`LILLM_PYTHON`, `LILLM_API_KEY`) are not the config's.
fn env_layer() -> toml::Table {
    let fields = config_fields();
    let mut layer = toml::Table::new();
    for (k, v) in std::env::vars() {
        let Some(key) = k.strip_prefix("LILLM_").map(str::to_ascii_lowercase) else {
            continue;
        };
        let path: Vec<&str> = key.split("__").collect();
        if !fields.contains(&path[0]) {
            continue;
        }
        insert_at(&mut layer, &path, v);
    }
    layer
}

/// Sets `path` (`["model", "d_model"]`) of `table` to the string `v`.
fn insert_at(table: &mut toml::Table, path: &[&str], v: String) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.to_string(), toml::Value::String(v));
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                insert_at(inner, rest, v);
            }
        }
    }
}

/// `v` without its nulls and empty tables: the flags that were not given.
fn given(v: serde_json::Value) -> Option<serde_json::Value> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::Object(map) => {
            let kept: serde_json::Map<_, _> = map
                .into_iter()
                .filter_map(|(k, v)| Some((k, given(v)?)))
                .collect();
            (!kept.is_empty()).then_some(serde_json::Value::Object(kept))
        }
        other => Some(other),
    }
}

pub(crate) fn resolve_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut builder = config::Config::builder().add_source(config::File::from_str(
        &toml::to_string(&TrainConfig::default())?,
        config::FileFormat::Toml,
    ));
    if let Some(path) = &args.config {
        if !path.is_file() {
            anyhow::bail!("{}: config file not found", path.display());
        }
        builder =
            builder.add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml));
    }
    let env = env_layer();
    let flags = given(serde_json::to_value(&args.fields)?);
    let layers = [
        Some(toml::to_string(&env)?),
        flags.map(|f| toml::to_string(&f)).transpose()?,
    ];
    for layer in layers.into_iter().flatten() {
        builder = builder.add_source(config::File::from_str(&layer, config::FileFormat::Toml));
    }
    let cfg = split_config(builder.build()?).with_context(|| match &args.config {
        Some(path) => format!(
            "invalid training config from {}, LILLM_* variables and flags",
            path.display()
        ),
        None => "invalid training config from LILLM_* variables and flags".into(),
    })?;
    cfg.validate()?;
    Ok(cfg)
}

/// Every key of the training config's flat table (aliases included), sorted.
fn config_fields() -> Vec<&'static str> {
    let mut fields = [field_names::<JobConfig>(), field_names::<ProcessConfig>()].concat();
    fields.sort();
    fields
}

/// The layered config's one flat table as the job's settings and this process's: each part
/// is read strictly, so a misspelt key is an error rather than ignored.
fn split_config(layered: config::Config) -> Result<TrainConfig, config::ConfigError> {
    let table: config::Map<String, config::Value> = layered.try_deserialize()?;
    let fields = config_fields();
    if let Some(unknown) = table.keys().find(|key| !fields.contains(&key.as_str())) {
        return Err(config::ConfigError::Message(format!(
            "unknown field `{unknown}`; the fields are {}",
            fields.join(", ")
        )));
    }
    let process_fields = field_names::<ProcessConfig>();
    let (process, job): (config::Map<_, _>, config::Map<_, _>) = table
        .into_iter()
        .partition(|(key, _)| process_fields.contains(&key.as_str()));
    Ok(TrainConfig {
        job: config::Value::new(None, job).try_deserialize()?,
        process: config::Value::new(None, process).try_deserialize()?,
    })
}

/// Trains until done or until `shutdown` (SIGTERM/Ctrl-C), which checkpoints the current
/// step first so `--resume` continues with the very next batch.
pub fn run(args: TrainArgs, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
    let mut cfg = resolve_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        return Ok(());
    }
    cfg.localize()?;
    if let Some(launched) =
        crate::job_cmd::launch(&cfg, &args.launch, args.fields.process.threads, &shutdown)
    {
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
    std::fs::create_dir_all(&cfg.process.out).with_context(|| {
        format!(
            "{}: cannot create the run directory",
            cfg.process.out.display()
        )
    })?;
    let leader = cfg.process.rank == 0;
    let setup = lillm_trainer::Setup {
        stop: lillm_trainer::stop::Stop::new(shutdown),
        ..Default::default()
    };
    let mut trainer = Trainer::with(cfg.clone(), setup)?;
    if leader {
        cfg.write_resolved()?;
    }
    let summary = trainer.run(leader && crate::interactive())?;
    if leader {
        report(&summary, &cfg.process.out, cfg.process.out_url.as_deref());
    }
    Ok(summary)
}

/// What a finished training or fine-tuning run prints; `bucket`: the run's URL when its
/// directory is in a bucket (`run` is then this node's mirror of it).
pub fn report(summary: &TrainSummary, run: &std::path::Path, bucket: Option<&str>) {
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
    if let Some(bytes) = summary.peak_gpu_bytes {
        println!(
            "peak GPU memory: {:.2} GiB allocated",
            bytes as f64 / (1u64 << 30) as f64
        );
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
    if let Some(url) = bucket {
        println!("the run is in {url} (the paths above are this node's copy)");
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
