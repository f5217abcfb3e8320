//! The coordinator's command line, shared by the `coordinator` binary and `lillm coordinator`.
//! Flags override `--config` (TOML) values.

use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

use crate::{serve, Commit, JobConfig, ServerConfig};
use clap::Parser;
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The lillm job coordinator: membership, ranks, liveness, commits, status"
)]
pub struct Args {
    /// TOML file with any of the settings below (snake_case keys); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Machines the job spans: N, or MIN:MAX for an elastic job that goes on with as few
    /// as MIN nodes once the others have been away for --elastic-grace-ms.
    #[arg(long, value_parser = parse_nodes)]
    nodes: Option<(usize, usize)>,
    /// Elastic jobs: how long missing members may stay away before a smaller group forms,
    /// counted from the first trainer ready for the next group.
    #[arg(long)]
    elastic_grace_ms: Option<u64>,
    /// Trainer processes (GPUs) per node.
    #[arg(long)]
    trainers_per_node: Option<usize>,
    /// Dataloader processes per node (0: the trainers read their data themselves, as SFT
    /// and DPO jobs do).
    #[arg(long)]
    dataloaders_per_node: Option<usize>,
    /// gRPC address (loopback unless you mean otherwise).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address of Prometheus /metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Also answer grpc.health.v1 in plaintext here, for probes that cannot speak TLS.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Where the coordinator keeps its durable state.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Token every member must present.
    #[arg(long, env = "LILLM_JOB_TOKEN", hide_env_values = true)]
    job_token: Option<String>,
    /// Milliseconds of silence after which a member counts as dead (default 2000). Members
    /// heartbeat as often as the coordinator tells them when they register: eight times
    /// per timeout, less often in a job of thousands (see `lillm bench coordinator`).
    #[arg(long)]
    heartbeat_timeout_ms: Option<u64>,
    /// Port of the c10d store that rank 0 serves, for trainers that register a host without
    /// a port (lillm trainers send the port of the store their process serves).
    #[arg(long)]
    store_port: Option<u16>,
    /// Restart a stopped job as a new group: forget its saved members and pinned training
    /// config (it still resumes from its last committed checkpoint).
    #[arg(long)]
    forget_members: bool,
    /// A checkpoint in the run's bucket (`s3://…/checkpoints/step-N`) to resume the job from
    /// when --state-dir holds no state (a fresh node); ignored when it does.
    #[arg(long)]
    resume_from: Option<String>,
    /// Serve gRPC over TLS with this certificate (PEM); members then need LILLM_TLS_CA.
    #[arg(long, env = "LILLM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "LILLM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// The settings, as a `--config` file spells them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    nodes: Option<usize>,
    min_nodes: Option<usize>,
    elastic_grace_ms: u64,
    trainers_per_node: usize,
    dataloaders_per_node: usize,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    health_listen: Option<SocketAddr>,
    state_dir: PathBuf,
    job_token: String,
    heartbeat_timeout_ms: u64,
    store_port: u16,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            nodes: None,
            min_nodes: None,
            elastic_grace_ms: 30_000,
            trainers_per_node: 1,
            dataloaders_per_node: 1,
            listen: "127.0.0.1:7070".parse().expect("valid address"),
            metrics_listen: "127.0.0.1:7071".parse().expect("valid address"),
            health_listen: None,
            state_dir: "coordinator-state".into(),
            job_token: String::new(),
            heartbeat_timeout_ms: 2_000,
            store_port: 29500,
            tls_cert: None,
            tls_key: None,
        }
    }
}

fn settings(args: Args) -> anyhow::Result<Settings> {
    let mut s = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Settings::default(),
    };
    if let Some((min, max)) = args.nodes {
        s.nodes = Some(max);
        s.min_nodes = (min < max).then_some(min);
    }
    s.elastic_grace_ms = args.elastic_grace_ms.unwrap_or(s.elastic_grace_ms);
    s.trainers_per_node = args.trainers_per_node.unwrap_or(s.trainers_per_node);
    s.dataloaders_per_node = args.dataloaders_per_node.unwrap_or(s.dataloaders_per_node);
    s.listen = args.listen.unwrap_or(s.listen);
    s.metrics_listen = args.metrics_listen.unwrap_or(s.metrics_listen);
    s.health_listen = args.health_listen.or(s.health_listen);
    s.state_dir = args.state_dir.unwrap_or(s.state_dir);
    s.job_token = args.job_token.unwrap_or(s.job_token);
    s.heartbeat_timeout_ms = args.heartbeat_timeout_ms.unwrap_or(s.heartbeat_timeout_ms);
    s.store_port = args.store_port.unwrap_or(s.store_port);
    s.tls_cert = args.tls_cert.or(s.tls_cert);
    s.tls_key = args.tls_key.or(s.tls_key);
    Ok(s)
}

/// Serves the job until `shutdown` is cancelled (by `main`, on SIGTERM or Ctrl-C).
pub fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let forget_members = args.forget_members;
    let resume_commit = args
        .resume_from
        .as_deref()
        .map(Commit::in_bucket)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--resume-from {e}"))?;
    let s = settings(args)?;
    let nodes = s
        .nodes
        .ok_or_else(|| anyhow::anyhow!("--nodes is required: how many machines the job spans"))?;
    for (name, v) in [
        ("--nodes", nodes),
        ("--trainers-per-node", s.trainers_per_node),
    ] {
        anyhow::ensure!(v >= 1, "{name} must be at least 1, got {v}");
    }
    let cfg = ServerConfig {
        job: JobConfig {
            nodes,
            trainers: nodes * s.trainers_per_node,
            dataloaders: nodes * s.dataloaders_per_node,
            job_token: s.job_token,
            heartbeat_timeout_ms: s.heartbeat_timeout_ms,
            store_port: s.store_port,
            min_nodes: s.min_nodes,
            elastic_grace_ms: s.elastic_grace_ms,
        },
        listen: s.listen,
        metrics_listen: Some(s.metrics_listen),
        health_listen: s.health_listen,
        state_dir: s.state_dir,
        tls: match (s.tls_cert, s.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!("TLS needs both tls_cert and tls_key"),
        },
        forget_members,
        resume_commit,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let span = tracing::info_span!("coordinator", role = "coordinator");
    rt.block_on(tracing::Instrument::instrument(serve(cfg, shutdown), span))
}

/// `N` or `MIN:MAX` (1 <= MIN <= MAX).
fn parse_nodes(text: &str) -> Result<(usize, usize), String> {
    let number = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{text}` is not N or MIN:MAX (whole numbers of nodes)"))
    };
    let (min, max) = match text.split_once(':') {
        Some((min, max)) => (number(min)?, number(max)?),
        None => (number(text)?, number(text)?),
    };
    if min == 0 || min > max {
        return Err(format!("`{text}`: need 1 <= MIN <= MAX"));
    }
    Ok((min, max))
}
