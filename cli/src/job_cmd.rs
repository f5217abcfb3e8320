//! Distributed jobs from the command line: a trainer actor (`lillm train --coordinator`) and
//! a whole local job (`lillm train --nproc N`: coordinator + dataloader + N trainers), and
//! how a command chooses between them ([`launch`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lillm_proto::client;
use lillm_proto::member::MemberClient;
use lillm_proto::net::{ConnectSettings, RetryPolicy};
use lillm_proto::v1 as pb;
use lillm_trainer::actor::ActorOptions;
use lillm_trainer::data::TrainData;
use lillm_trainer::{checkpoint, ProcessConfig, TrainConfig};
use tokio_util::sync::CancellationToken;

use crate::hang_watch;
use crate::supervisor::{Ended, Kind, OnTrainerDeath, Spec, Supervisor};

#[derive(Args, Debug, Default)]
pub struct ActorArgs {
    /// Coordinator address (host:port): run as a trainer actor of that job.
    #[arg(long, env = "LILLM_COORDINATOR")]
    pub coordinator: Option<String>,
    /// GPU (or CPU slot) index of this trainer on its node.
    #[arg(long, default_value_t = 0)]
    pub local_rank: u32,
    /// Node name (default: the host name).
    #[arg(long, env = "LILLM_NODE")]
    pub node: Option<String>,
    /// Address this trainer's collective connections bind to; rank 0 also serves the c10d
    /// store there, so other nodes must be able to reach it.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_host: String,
    /// The job's token, if its coordinator has one.
    #[arg(
        long,
        env = "LILLM_JOB_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub job_token: String,
    /// CA certificate (PEM) of the servers' TLS certificates: dial the coordinator and
    /// dataloaders over TLS.
    #[arg(long, env = "LILLM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

/// How a training or fine-tuning run executes, shared by `lillm train`, `sft` and `dpo`.
#[derive(Args, Debug, Default)]
pub struct LaunchArgs {
    /// Spawn this many local trainer processes plus a coordinator (and, for pretraining, a
    /// dataloader) that train together (c10d/Gloo), like `torchrun --standalone
    /// --nproc_per_node N`. With --coordinator: start this many trainers of that job on this
    /// node, one per GPU (the node launcher). Either way, children that die are restarted.
    #[arg(long)]
    pub nproc: Option<usize>,
    /// With --nproc (pretraining): dataloader processes to start. With two or more, the
    /// coordinator places each train shard on two of them and, with `--data-order epochs`,
    /// every micro-batch is read from the dataloaders holding its shards; each keeps its own
    /// cache (a `dataloader-K` folder of --cache-dir, --cache-bytes each).
    #[arg(long, default_value_t = 1)]
    pub dataloaders: usize,
    /// Failed child processes restarted before `--nproc` gives up (a trainer told to regroup
    /// is not a failure).
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds a trainer may stay evicted by the coordinator (silent past its heartbeat
    /// timeout) while its process still runs before the launcher kills and restarts it as
    /// hung (a stuck collective, a wedged driver call); 0: never.
    #[arg(long, default_value_t = 30)]
    pub replace_hung_after_s: u64,
    /// Join a distributed job as a trainer actor (see `lillm status`, deploy/).
    #[command(flatten)]
    pub actor: ActorArgs,
}

/// Runs `cfg` where `launch` says: as a node launcher, a trainer actor or a whole local
/// job. `None`: none of those, the caller trains in this process.
pub fn launch(
    cfg: &TrainConfig,
    launch: &LaunchArgs,
    threads: Option<usize>,
    shutdown: &CancellationToken,
) -> Option<Result<()>> {
    let local_job = launch.actor.coordinator.is_none() && launch.nproc.is_some_and(|n| n > 1);
    if launch.dataloaders != 1 && !local_job {
        return Some(Err(anyhow::anyhow!(
            "--dataloaders {} starts the dataloaders of a local job: use it with --nproc N (N >= 2) and no --coordinator (a cluster's dataloaders are `lillm dataloader` processes)",
            launch.dataloaders
        )));
    }
    match (&launch.actor.coordinator, launch.nproc) {
        (Some(coordinator), Some(n)) => Some(launch_node(
            &launch.actor,
            coordinator,
            n,
            threads,
            launch,
            shutdown,
        )),
        (Some(coordinator), None) => Some(run_trainer_actor(
            cfg.clone(),
            coordinator,
            &launch.actor,
            shutdown,
        )),
        (None, Some(n)) if n > 1 => Some(launch_local_job(cfg, n, threads, launch, shutdown)),
        (None, _) => None,
    }
}

/// `lillm train --coordinator`: one trainer actor of that job ([`lillm_trainer::actor`]).
fn run_trainer_actor(
    cfg: TrainConfig,
    coordinator: &str,
    args: &ActorArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    let actor = ActorOptions {
        coordinator: coordinator.to_string(),
        node: args.node.clone().unwrap_or_else(client::hostname),
        local_rank: args.local_rank,
        bind_host: args.bind_host.clone(),
        job_token: args.job_token.clone(),
        tls_ca: args.tls_ca.clone(),
        interactive: crate::interactive(),
    };
    let (out, bucket) = (cfg.process.out.clone(), cfg.process.out_url.clone());
    if let Some(summary) = lillm_trainer::actor::run(cfg, actor, shutdown)? {
        crate::train_cmd::report(&summary, &out, bucket.as_deref());
    }
    Ok(())
}

/// Dataloader `index`'s own cache folder in a job of several on this machine: each evicts
/// only what it fetched itself.
fn own_cache(process: &ProcessConfig, index: usize) -> PathBuf {
    let root = process
        .cache_dir
        .clone()
        .unwrap_or_else(lillm_store::default_cache_dir);
    root.join(format!("dataloader-{index}"))
}

/// The object-storage settings a trainer was given, as the dataloader's flags.
fn store_flags(process: &ProcessConfig) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(dir) = &process.cache_dir {
        flags.push(format!("--cache-dir={}", dir.display()));
    }
    if let Some(bytes) = &process.cache_bytes {
        flags.push(format!("--cache-bytes={bytes}"));
    }
    if let Some(file) = &process.credentials_file {
        flags.push(format!("--credentials-file={}", file.display()));
    }
    flags
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The user's `lillm train` arguments without the flags the launcher sets for each trainer.
fn trainer_args_from_command_line(launcher_sets: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = std::env::args().skip(1);
    while let Some(arg) = rest.next() {
        if launcher_sets.contains(&arg.as_str()) {
            rest.next();
        } else if !launcher_sets
            .iter()
            .any(|flag| arg.starts_with(&format!("{flag}=")))
        {
            out.push(arg);
        }
    }
    out
}

/// `--threads` for each of `nproc` trainers sharing this machine, unless the user set it:
/// N trainers each using every core would fight over them (torchrun sets one thread per
/// worker for the same reason).
fn share_cores(args: &mut Vec<String>, nproc: usize, threads: Option<usize>) {
    if threads.is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = (cores / nproc).max(1);
        eprintln!(
            "{nproc} trainers on {cores} cores: {share} thread(s) each (set --threads to change)"
        );
        args.push(format!("--threads={share}"));
    }
}

/// Pins trainer `local_rank` to its GPU: the `local_rank`-th of the devices this process may
/// use (`CUDA_VISIBLE_DEVICES`, or all), so that each trainer sees it as `cuda:0`.
fn gpu_pin(local_rank: usize) -> Vec<(String, String)> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let device = match visible.as_deref() {
        Some(list) if !list.trim().is_empty() => list.split(',').nth(local_rank).map(str::trim),
        _ => None,
    };
    let device = device.map_or_else(|| local_rank.to_string(), str::to_string);
    vec![("CUDA_VISIBLE_DEVICES".into(), device)]
}

/// What the supervisor does when a trainer dies: tells the coordinator at once (a `Leave`
/// on the dead trainer's behalf), so its group ends now instead of after a heartbeat
/// timeout. If the coordinator cannot be told, the heartbeat timeout still catches it.
fn tell_coordinator_on_death(
    coordinator: String,
    node: String,
    job_token: String,
    connect: ConnectSettings,
) -> OnTrainerDeath {
    Box::new(move |local_rank, what| {
        let told = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    // The dead trainer's own membership, spoken for by its launcher.
                    let member = MemberClient::new(
                        &coordinator,
                        (&node, pb::Role::Trainer, local_rank),
                        &job_token,
                        connect.clone(),
                        RetryPolicy::default(),
                    )?;
                    member
                        .leave(&format!("its process died ({what})"), false)
                        .await
                })
                .map_err(|e| e.to_string())
            });
        if let Err(e) = told {
            tracing::warn!(cause = %e, "could not tell the coordinator that trainer {local_rank} died");
        }
    })
}

/// Lets `supervisor` replace this node's hung trainers (`--replace-hung-after-s`).
fn watch_hangs(
    supervisor: &mut Supervisor,
    launch: &LaunchArgs,
    coordinator: &str,
    node: &str,
    connect: ConnectSettings,
) {
    if launch.replace_hung_after_s > 0 {
        supervisor.replace_hung_trainers(
            hang_watch::ask_coordinator(coordinator.to_string(), node.to_string(), connect),
            Duration::from_secs(launch.replace_hung_after_s),
        );
    }
}

/// `lillm train|sft|dpo --nproc N`: a coordinator, a dataloader (for pretraining, whose
/// batches it streams) and N trainer actors on this machine, under one [`Supervisor`] that
/// restarts any of them that dies (up to `max_restarts` failures). The coordinator keeps its
/// state in RUN_DIR/coordinator, so the same command with `--resume` continues a job that
/// was stopped (even by SIGKILL). On `shutdown` the trainers stop first (they checkpoint and
/// commit), then the services.
pub fn launch_local_job(
    cfg: &TrainConfig,
    nproc: usize,
    threads: Option<usize>,
    launch: &LaunchArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    TrainConfig {
        job: cfg.job.clone(),
        process: ProcessConfig {
            world_size: nproc,
            ..cfg.process.clone()
        },
    }
    .validate()?;
    let dataloaders = match (TrainData::streamed(cfg.job.objective), launch.dataloaders) {
        (_, 0) => {
            bail!("--dataloaders 0: a --nproc job needs at least one; leave the flag out for one")
        }
        (true, n) => n,
        (false, 1) => 0,
        (false, n) => bail!(
            "--dataloaders {n}: SFT and DPO trainers read their data themselves; leave the flag out"
        ),
    };
    let state_dir = cfg.process.out.join("coordinator");
    let has_checkpoints = !checkpoint::list_checkpoints(&cfg.process.out).is_empty();
    match (cfg.process.resume, state_dir.exists() || has_checkpoints) {
        (false, true) => bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            cfg.process.out.display()
        ),
        (true, _) if has_checkpoints && !state_dir.exists() => bail!(
            "{} holds checkpoints but no job state ({}); it was not written by --nproc — resume it without --nproc",
            cfg.process.out.display(),
            state_dir.display()
        ),
        _ => {}
    }
    let resume_from = committed_in_bucket(cfg)?;
    std::fs::create_dir_all(&cfg.process.out).with_context(|| {
        format!(
            "{}: cannot create the run directory",
            cfg.process.out.display()
        )
    })?;
    let coordinator = format!("127.0.0.1:{}", free_port()?);
    // The services log to files; the terminal shows the trainers.
    let logs = cfg.process.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
    let mut supervisor = Supervisor::new(
        launch.max_restarts,
        tell_coordinator_on_death(
            coordinator.clone(),
            LOCAL_NODE.into(),
            String::new(),
            ConnectSettings::default(),
        ),
    );
    watch_hangs(
        &mut supervisor,
        launch,
        &coordinator,
        LOCAL_NODE,
        ConnectSettings::default(),
    );
    supervisor.start(Spec {
        name: "the coordinator".into(),
        kind: Kind::Service,
        args: vec![
            "coordinator".into(),
            "--nodes=1".into(),
            format!("--trainers-per-node={nproc}"),
            format!("--dataloaders-per-node={dataloaders}"),
            format!("--listen={coordinator}"),
            format!("--metrics-listen=127.0.0.1:{}", free_port()?),
            format!("--store-port={}", free_port()?),
            format!("--state-dir={}", state_dir.display()),
        ],
        // This command starts every member itself: a new group, whatever was saved. A
        // restarted coordinator, though, must remember the members it had.
        first_start_args: ["--forget-members".to_string()]
            .into_iter()
            .chain(resume_from.map(|url| format!("--resume-from={url}")))
            .collect(),
        env: Vec::new(),
        log: Some(logs.join("coordinator.log")),
    })?;
    wait_for_port(&coordinator, &mut supervisor)?;
    for index in 0..dataloaders {
        let (name, log, cache) = match dataloaders {
            1 => ("the dataloader".into(), "dataloader.log".into(), None),
            _ => (
                format!("dataloader {index}"),
                format!("dataloader-{index}.log"),
                Some(own_cache(&cfg.process, index)),
            ),
        };
        let process = ProcessConfig {
            cache_dir: cache.or(cfg.process.cache_dir.clone()),
            ..cfg.process.clone()
        };
        supervisor.start(Spec {
            name,
            kind: Kind::Service,
            args: [
                "dataloader".into(),
                format!("--coordinator={coordinator}"),
                format!("--data={}", cfg.process.data.display()),
                format!("--node={LOCAL_NODE}"),
                format!("--local-index={index}"),
            ]
            .into_iter()
            .chain(store_flags(&process))
            .collect(),
            first_start_args: Vec::new(),
            env: Vec::new(),
            log: Some(logs.join(log)),
        })?;
    }
    eprintln!(
        "job coordinator on {coordinator}: watch it with `lillm status --coordinator {coordinator} --watch`; service logs in {}",
        logs.display()
    );
    let mut user = trainer_args_from_command_line(&[
        "--nproc",
        "--dataloaders",
        "--max-restarts",
        "--replace-hung-after-s",
        "--local-rank",
        "--node",
        "--coordinator",
    ]);
    share_cores(&mut user, nproc, threads);
    user.extend([
        format!("--coordinator={coordinator}"),
        format!("--node={LOCAL_NODE}"),
    ]);
    start_trainers(&mut supervisor, &user, nproc)?;
    supervisor.run(shutdown)?;
    Ok(())
}

/// For a run directory in a bucket, what this node's run directory cannot say: a run that
/// is not resumed must not write over the bucket's checkpoints, and a resumed one starts
/// from the bucket's newest committed checkpoint, whose URL is returned for the coordinator
/// (which takes it unless its saved state recorded that step already).
fn committed_in_bucket(cfg: &TrainConfig) -> Result<Option<String>> {
    let Some(bucket) = cfg.process.run_bucket()? else {
        return Ok(None);
    };
    let newest = bucket.committed_steps()?.into_iter().max();
    match (cfg.process.resume, newest) {
        (false, Some(step)) => bail!(
            "{} already holds checkpoints (the newest committed at step {step}); pass --resume to continue that run or choose another --out",
            bucket.url()
        ),
        (true, Some(step)) => Ok(Some(bucket.checkpoint_url(step))),
        _ => Ok(None),
    }
}

/// The node name of every member of a `--nproc` job.
const LOCAL_NODE: &str = "local";

/// `lillm train --coordinator C --nproc G`: the node launcher that systemd or a Kubernetes
/// pod runs. It starts G trainer actors of that job (`--local-rank 0..G-1`, each pinned to
/// its GPU) and supervises them as `--nproc` does; SIGTERM is passed on to every trainer
/// (each checkpoints and leaves), and the exit status says whether to retry (see
/// [`crate::supervisor::GaveUp::exit_code`]; [`crate::supervisor::EXIT_STOPPED`] after SIGTERM).
pub fn launch_node(
    args: &ActorArgs,
    coordinator: &str,
    trainers: usize,
    threads: Option<usize>,
    launch: &LaunchArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    let node = args.node.clone().unwrap_or_else(client::hostname);
    let connect = ConnectSettings::with_tls_ca(args.tls_ca.clone());
    let mut supervisor = Supervisor::new(
        launch.max_restarts,
        tell_coordinator_on_death(
            coordinator.to_string(),
            node.clone(),
            args.job_token.clone(),
            connect.clone(),
        ),
    );
    watch_hangs(&mut supervisor, launch, coordinator, &node, connect);
    let mut user = trainer_args_from_command_line(&[
        "--nproc",
        "--max-restarts",
        "--replace-hung-after-s",
        "--local-rank",
    ]);
    share_cores(&mut user, trainers, threads);
    if args.node.is_none() {
        // Every trainer of this node under the one name the supervisor reports deaths with.
        user.push(format!("--node={node}"));
    }
    eprintln!("node {node}: {trainers} trainer(s) of the job at {coordinator}");
    start_trainers(&mut supervisor, &user, trainers)?;
    match supervisor.run(shutdown)? {
        Ended::Finished => Ok(()),
        Ended::Stopped => Err(NodeStopped.into()),
    }
}

/// The node launcher stopped on SIGTERM before the job finished; it exits with
/// [`crate::supervisor::EXIT_STOPPED`] so that Kubernetes replaces the pod without counting a failure.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped before the job finished (its step is checkpointed); start this node again to rejoin"
)]
pub struct NodeStopped;

/// Starts trainers `0..n` with `args` plus their local rank, each pinned to its GPU.
fn start_trainers(supervisor: &mut Supervisor, args: &[String], n: usize) -> Result<()> {
    for local_rank in 0..n {
        let mut args = args.to_vec();
        args.push(format!("--local-rank={local_rank}"));
        supervisor.start(Spec {
            name: format!("trainer {local_rank}"),
            kind: Kind::Trainer {
                local_rank: local_rank as u32,
            },
            args,
            first_start_args: Vec::new(),
            env: gpu_pin(local_rank),
            log: None,
        })?;
    }
    Ok(())
}

/// Waits until `address` accepts connections (the coordinator is up) or it exited.
fn wait_for_port(address: &str, supervisor: &mut Supervisor) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(address).is_err() {
        if let Some(status) = supervisor.exited("the coordinator") {
            bail!("the coordinator exited before listening on {address} ({status})");
        }
        if std::time::Instant::now() > deadline {
            bail!("the coordinator did not listen on {address} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
