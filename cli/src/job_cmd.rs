//! Distributed jobs from the command line: a trainer actor (`lillm train --coordinator`), a
//! node launcher (`--coordinator C --nproc G`) and a whole local job (`lillm train --nproc N`,
//! [`crate::local_job`]), and how a command chooses between them ([`launch`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use lillm_proto::client;
use lillm_proto::member::MemberClient;
use lillm_proto::net::{ConnectSettings, RetryPolicy};
use lillm_proto::v1 as pb;
use lillm_trainer::actor::ActorOptions;
use lillm_trainer::TrainConfig;
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
        (None, Some(n)) if n > 1 => Some(crate::local_job::launch_local_job(
            cfg, n, threads, launch, shutdown,
        )),
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

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The user's `lillm train` arguments without the flags the launcher sets for each trainer.
pub(crate) fn trainer_args_from_command_line(launcher_sets: &[&str]) -> Vec<String> {
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
pub(crate) fn share_cores(args: &mut Vec<String>, nproc: usize, threads: Option<usize>) {
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
pub(crate) fn tell_coordinator_on_death(
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
pub(crate) fn watch_hangs(
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
pub(crate) fn start_trainers(supervisor: &mut Supervisor, args: &[String], n: usize) -> Result<()> {
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
