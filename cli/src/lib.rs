//! `lillm`: every stage of the pipeline — tokenizer, data, training, evaluation, generation
//! and interop — and every actor of a distributed job, from one binary. Each subcommand lives
//! in its own module; the `lillm` and `trainer` binaries are both [`main`].

mod bench_cmd;
mod bench_coordinator;
mod bench_decode;
mod bench_kernels;
mod chat_cmd;
mod data_cmd;
mod finetune_cmd;
mod hang_watch;
mod infer_cmd;
mod interop_cmd;
mod job_cmd;
mod local_job;
mod status_cmd;
mod supervisor;
mod tokenizer_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lillm",
    version,
    about = "Train a little Llama-style language model end to end"
)]
struct Cli {
    /// Log lines as text, or as one JSON object per line for log collectors (each listing
    /// its spans: the actor's role and node and, in a group, its rank and generation).
    /// RUST_LOG sets the level.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LILLM_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Train, inspect and use byte-level BPE tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::TokenizerCmd),
    /// Prepare token shards from a corpus.
    #[command(subcommand)]
    Data(data_cmd::DataCmd),
    /// Pretrain a model: in this process, as --nproc local ranks, or as a trainer actor of
    /// a distributed job (--coordinator).
    Train(Box<train_cmd::TrainArgs>),
    /// Run a job's coordinator (the same as the `coordinator` binary).
    Coordinator(lillm_coordinator::cli::Args),
    /// Run a dataloader actor (the same as the `dataloader` binary).
    Dataloader(lillm_dataloader::actor::Args),
    /// Show a distributed job: members, ranks, step, loss, throughput, checkpoints.
    Status(status_cmd::StatusArgs),
    /// Supervised fine-tuning on conversations (loss on assistant tokens only).
    Sft(Box<finetune_cmd::SftArgs>),
    /// Preference tuning (DPO) on (prompt, chosen, rejected) pairs.
    Dpo(Box<finetune_cmd::DpoArgs>),
    /// Mean next-token cross entropy of a text file under a checkpoint.
    Eval(infer_cmd::EvalArgs),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(infer_cmd::GenerateArgs),
    /// Chat with a fine-tuned model in the terminal.
    Chat(chat_cmd::ChatArgs),
    /// Serve a web chat page and an OpenAI-compatible API.
    Serve(lillm_serve::ServeArgs),
    /// Draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl.
    Plot(train_cmd::PlotArgs),
    /// Model presets and parameter counts.
    #[command(subcommand)]
    Model(train_cmd::ModelCmd),
    /// Export a checkpoint to another format.
    #[command(subcommand)]
    Export(interop_cmd::ExportCmd),
    /// Import weights from another format as a checkpoint.
    #[command(subcommand)]
    Import(interop_cmd::ImportCmd),
    /// Benchmarks of lillm's own parts: the coordinator at thousands of trainers, the
    /// exactly-once data order over 100,000 shards.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
}

/// Runs the command line and says how the process should exit; `trainer` is `lillm train`
/// under another name. The binaries' `main` returns this.
pub fn main() -> std::process::ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = Cli::parse_from(with_implied_command(argv));
    let traits = cli.command.process_traits();
    if !traits.keeps_sigpipe_ignored {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.log_format, traits.logs_decisions);
    // This is the only place that touches signals; short commands keep the default, so
    // Ctrl-C ends them.
    let shutdown = match traits.stops_on_signals {
        true => lillm_proto::process::shutdown_on_signals(),
        false => tokio_util::sync::CancellationToken::new(),
    };
    exit_status(dispatch(cli.command, shutdown))
}

/// The command line as `lillm` reads it: the `trainer` binary is `lillm train`.
fn with_implied_command(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let invoked_as = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    if invoked_as.as_deref() == Some("trainer") {
        argv.insert(1, "train".into());
    }
    argv
}

/// What the process sets up for a command before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessTraits {
    /// Commands that open connections keep SIGPIPE ignored. A peer that closes a socket
    /// while we write to it (a client hanging up on a server, a coordinator dropping a gRPC
    /// connection, an object store closing an idle one) must be an error the command
    /// handles or names: hyper writes with `writev`, which raises SIGPIPE, and the default
    /// disposition ends the process without a word. Commands that only print end quietly
    /// when stdout closes early (`lillm … | head`), like other Unix tools, instead of
    /// panicking on a failed print.
    keeps_sigpipe_ignored: bool,
    /// Services log what they decide (info); everything else only warnings, unless
    /// RUST_LOG says otherwise.
    logs_decisions: bool,
    /// Long-running roles stop cleanly on SIGTERM/Ctrl-C: systemd and Kubernetes send
    /// SIGTERM before SIGKILL.
    stops_on_signals: bool,
}

impl Command {
    fn process_traits(&self) -> ProcessTraits {
        use Command::*;
        ProcessTraits {
            keeps_sigpipe_ignored: match self {
                Train(_) | Coordinator(_) | Dataloader(_) | Serve(_) | Status(_) => true,
                // Their stores may be buckets.
                Sft(_) | Dpo(_) => true,
                Data(cmd) => cmd.opens_connections(),
                Bench(cmd) => cmd.opens_connections(),
                _ => false,
            },
            logs_decisions: matches!(self, Coordinator(_) | Dataloader(_)),
            stops_on_signals: matches!(
                self,
                Train(_) | Coordinator(_) | Dataloader(_) | Serve(_) | Sft(_) | Dpo(_)
            ),
        }
    }
}

/// Logs to stderr as text (colored on a terminal) or JSON lines.
fn init_logging(format: LogFormat, logs_decisions: bool) {
    if format == LogFormat::Json && std::env::var_os("LILLM_LOG_FORMAT").is_none() {
        // Launchers' children (`--nproc`, the node launcher) log the same way. Set before
        // any thread starts, so nothing reads the environment concurrently.
        std::env::set_var("LILLM_LOG_FORMAT", "json");
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| if logs_decisions { "info" } else { "warn" }.into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(interactive()).init(),
        // Each line lists its spans: role and node, and for a trainer in a group its rank
        // and generation.
        LogFormat::Json => logs
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

fn dispatch(command: Command, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Tokenizer(cmd) => tokenizer_cmd::run(cmd),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Train(args) => train_cmd::run(*args, shutdown),
        Command::Coordinator(args) => lillm_coordinator::cli::run(args, shutdown),
        Command::Dataloader(args) => lillm_dataloader::actor::run(args, shutdown),
        Command::Status(args) => status_cmd::status(args),
        Command::Sft(args) => finetune_cmd::sft(*args, shutdown),
        Command::Dpo(args) => finetune_cmd::dpo(*args, shutdown),
        Command::Eval(args) => infer_cmd::eval(args),
        Command::Generate(args) => infer_cmd::generate(args),
        Command::Chat(args) => chat_cmd::chat(args),
        Command::Serve(args) => lillm_serve::serve(args, shutdown),
        Command::Plot(args) => train_cmd::plot(args),
        Command::Model(cmd) => train_cmd::model(cmd),
        Command::Export(cmd) => interop_cmd::export(cmd),
        Command::Import(cmd) => interop_cmd::import(cmd),
        Command::Bench(cmd) => bench_cmd::run(cmd),
    }
}

/// Prints a failure and says how the process exits.
fn exit_status(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A trainer whose generation ended exits with its own status, for its supervisor.
        Err(err)
            if matches!(
                err.downcast_ref::<lillm_trainer::Error>(),
                Some(lillm_trainer::Error::Regroup(_))
            ) =>
        {
            eprintln!("{err}");
            std::process::ExitCode::from(lillm_trainer::stop::EXIT_REGROUP)
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::from(exit_code(&err))
        }
    }
}

/// The exit status of a failed command: [`lillm_trainer::stop::EXIT_FATAL`] when running it
/// again cannot help (a supervisor must not restart it), else 1.
fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(gave_up) = err.downcast_ref::<supervisor::GaveUp>() {
        return gave_up.exit_code();
    }
    if err.downcast_ref::<job_cmd::NodeStopped>().is_some() {
        return supervisor::EXIT_STOPPED;
    }
    match err.downcast_ref::<lillm_trainer::Error>() {
        Some(e) if e.is_fatal() => lillm_trainer::stop::EXIT_FATAL,
        _ => 1,
    }
}

/// Progress bars only on a terminal, so logs and pipes stay clean.
pub(crate) fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// A `--checkpoint` that may name a bucket (`s3://…/run` or `…/checkpoints/step-N`), as a
/// local directory: fetched into the cache (`LILLM_CACHE_DIR`), credentials from the
/// environment or `LILLM_CREDENTIALS_FILE`.
pub(crate) fn local_checkpoint(location: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(lillm_store::local_checkpoint(
        location,
        &lillm_store::StoreOptions::default(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> Command {
        let argv = with_implied_command(args.iter().map(Into::into).collect());
        Cli::try_parse_from(argv).expect("parses").command
    }

    #[test]
    fn the_trainer_binary_is_lillm_train() {
        let train = command(&["/usr/bin/trainer", "--config", "run.toml"]);
        assert!(matches!(train, Command::Train(_)));
        assert!(matches!(
            command(&["lillm", "model", "presets"]),
            Command::Model(_)
        ));
    }

    #[test]
    fn servers_outlive_closed_pipes_and_long_roles_stop_on_sigterm() {
        let serve = command(&["lillm", "serve", "--checkpoint", "runs/x"]).process_traits();
        assert_eq!(
            serve,
            ProcessTraits {
                keeps_sigpipe_ignored: true,
                logs_decisions: false,
                stops_on_signals: true,
            }
        );
        let coordinator = command(&["lillm", "coordinator"]).process_traits();
        assert!(coordinator.logs_decisions && coordinator.stops_on_signals);
        // A printing command ends on a closed pipe and on Ctrl-C like any Unix tool.
        let list = command(&["lillm", "model", "presets"]).process_traits();
        assert!(!list.keeps_sigpipe_ignored && !list.stops_on_signals && !list.logs_decisions);
        // Ctrl-C ends a status watch at once.
        let status = command(&["lillm", "status", "--coordinator", "h:1"]).process_traits();
        assert!(status.keeps_sigpipe_ignored && !status.stops_on_signals);
    }

    #[test]
    fn commands_that_open_connections_outlive_a_peer_closing_one() {
        let ignores = |argv: &[&str]| command(argv).process_traits().keeps_sigpipe_ignored;
        assert!(ignores(&["lillm", "bench", "coordinator"]));
        assert!(ignores(&[
            "lillm",
            "data",
            "prepare",
            "--tokenizer",
            "t",
            "--input",
            "c.txt",
            "--out",
            "s3://b/p/"
        ]));
        assert!(ignores(&[
            "lillm",
            "data",
            "stream-bench",
            "--dataloader",
            "h:1"
        ]));
        // Local commands that print stay ordinary Unix tools.
        assert!(!ignores(&["lillm", "bench", "epochs"]));
        assert!(!ignores(&["lillm", "data", "verify", "data/x"]));
        assert!(!ignores(&[
            "lillm",
            "data",
            "sft-render",
            "--tokenizer",
            "t",
            "--input",
            "c.jsonl"
        ]));
    }
}
