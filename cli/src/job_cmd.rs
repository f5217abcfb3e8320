//! Distributed jobs from the command line: a trainer actor (`lillm train --coordinator`) and
//! a whole local job (`lillm train --nproc N`: coordinator + dataloader + N trainers).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use lillm_proto::client;
use lillm_proto::net::{ConnectSettings, RetryPolicy};
use lillm_trainer::config::Objective;
use lillm_trainer::data::TrainData;
use lillm_trainer::eval_actor::EvalPlan;
use lillm_trainer::member::{MemberOptions, Membership};
use lillm_trainer::remote_data::RemoteData;
use lillm_trainer::stop::{Stop, StopReason, EXIT_REGROUP};
use lillm_trainer::{checkpoint, Setup, Start, TrainConfig, Trainer};
use tokio_util::sync::CancellationToken;

/// How long an unreachable coordinator or dataloader is retried before a trainer gives up.
const PATIENCE: Duration = Duration::from_secs(300);
/// How long ranks wait for each other in a collective before failing. It bounds how long
/// rank 0's evaluation may take while the others wait at the next all-reduce.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

/// A trainer's generation ended: its process exits with `EXIT_REGROUP` so a supervisor
/// starts it again into the next group.
#[derive(Debug)]
pub struct Regroup(pub StopReason);

impl std::fmt::Display for Regroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: exiting with status {EXIT_REGROUP} so this trainer is restarted into the next group",
            self.0
        )
    }
}

impl std::error::Error for Regroup {}

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

/// One trainer actor: join the job, train in the assigned group, report to the coordinator.
/// Stops between steps on `shutdown` (checkpointing first, then leaving the job: exit 0) or
/// when its generation ends ([`Regroup`]).
pub fn run_trainer_actor(
    cfg: TrainConfig,
    coordinator: &str,
    args: &ActorArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    if cfg.objective != Objective::Pretrain {
        bail!(
            "trainer actors stream pretraining batches; run SFT with `lillm sft` (single process)"
        );
    }
    let stop = Stop::new(shutdown);
    let membership = match Membership::join(
        MemberOptions {
            coordinator: coordinator.to_string(),
            node: args.node.clone().unwrap_or_else(client::hostname),
            local_rank: args.local_rank,
            bind_host: args.bind_host.clone(),
            job_token: args.job_token.clone(),
            fingerprint: cfg.fingerprint(),
            heartbeat: Duration::from_secs(1),
            connect: ConnectSettings::with_tls_ca(args.tls_ca.clone()),
            policy: RetryPolicy {
                patience: PATIENCE,
                ..RetryPolicy::default()
            },
        },
        stop.clone(),
    ) {
        Err(_) if stop.reason() == Some(StopReason::Shutdown) => return Ok(()),
        other => other?,
    };
    let summary = match train_in_group(cfg, &membership, stop) {
        Ok(summary) => summary,
        Err(e) => {
            let _ = membership.finish(Some("failed"));
            return Err(e);
        }
    };
    match summary.stopped {
        Some(reason @ (StopReason::Regroup { .. } | StopReason::PeerShutdown)) => {
            membership.finish(None)?;
            Err(Regroup(reason).into())
        }
        // Commits what was checkpointed, then leaves: the others stop at once.
        Some(StopReason::Shutdown) => Ok(membership.finish(Some("shut down"))?),
        None => Ok(membership.finish(None)?),
    }
}

/// Trains in the group `membership` was assigned to; rank 0 also evaluates and reports.
fn train_in_group(
    cfg: TrainConfig,
    membership: &Membership,
    stop: Stop,
) -> Result<lillm_trainer::TrainSummary> {
    let a = membership.assignment.clone();
    let cfg = TrainConfig {
        rank: a.rank as usize,
        world_size: a.world_size as usize,
        rendezvous: None,
        resume: false,
        ..cfg
    };
    cfg.validate()?;
    let local = (cfg.grad_accum / cfg.world_size) as u32;
    let leader = cfg.rank == 0;
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("{}: cannot create the run directory", cfg.out.display()))?;
    let data = RemoteData::connect(
        membership.handle(),
        membership.dataloader(),
        (a.rank * local, local),
        leader.then(|| cfg.out.join("tokenizer")),
    )?;
    if leader {
        let eval_data =
            RemoteData::connect(membership.handle(), membership.dataloader(), (0, 1), None)?;
        membership.start_evaluator(EvalPlan {
            data: TrainData::Remote(Box::new(eval_data)),
            seed: cfg.seed,
            batches: cfg.eval_iters,
            rows: cfg.batch_size,
            seq: cfg.sequence_len(&cfg.model_config()?),
            sample_tokens: 24,
        });
    }
    let start = Start::Committed {
        checkpoint: (!a.resume_path.is_empty()).then(|| PathBuf::from(&a.resume_path)),
        step: a.resume_step,
    };
    let mut trainer = Trainer::with(
        cfg.clone(),
        Setup {
            data: Some(TrainData::Remote(Box::new(data))),
            // A group even for one rank: a job runs the same collectives at every size.
            rendezvous: Some(membership.rendezvous(COLLECTIVE_TIMEOUT)),
            start,
            reporter: membership.reporter(),
            generation: a.generation,
            stop,
        },
    )?;
    if leader {
        let resolved = cfg.out.join("config.toml");
        std::fs::write(&resolved, toml::to_string_pretty(&cfg)?)
            .with_context(|| format!("{}: cannot write", resolved.display()))?;
    }
    let summary = trainer.run(leader && crate::interactive())?;
    if leader && summary.stopped.is_none() {
        crate::train_cmd::report(&summary, &cfg.out);
    }
    Ok(summary)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `lillm ARGS`, to be killed if this process dies (so no actor outlives its job);
/// its stderr goes to `log` (appended) when given.
fn spawn_actor(what: &str, args: &[String], log: Option<&Path>) -> Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(args);
    if let Some(path) = log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        cmd.stderr(file);
    }
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start the {what}"))
}

/// The user's `lillm train` arguments without `--nproc`.
fn train_args_without_nproc() -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = std::env::args().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--nproc" {
            rest.next();
        } else if !arg.starts_with("--nproc=") {
            out.push(arg);
        }
    }
    out
}

/// `lillm train --nproc N`: a coordinator, a dataloader and N trainer actors on this machine.
/// The coordinator keeps its state in RUN_DIR/coordinator, so the same command with
/// `--resume` continues a job that was stopped (even by SIGKILL).
/// Each trainer gets its share of the cores unless `--threads` says otherwise (as torchrun
/// sets one thread per worker): N trainers each using every core would fight over them.
/// On `shutdown` the trainers stop first (they checkpoint and commit), then the services.
pub fn launch_local_job(
    cfg: &TrainConfig,
    nproc: usize,
    threads: Option<usize>,
    shutdown: &CancellationToken,
) -> Result<()> {
    TrainConfig {
        world_size: nproc,
        ..cfg.clone()
    }
    .validate()?;
    if cfg.objective != Objective::Pretrain {
        bail!("--nproc runs pretraining jobs; fine-tune with `lillm sft` in one process");
    }
    let state_dir = cfg.out.join("coordinator");
    let has_checkpoints = !checkpoint::list_checkpoints(&cfg.out).is_empty();
    match (cfg.resume, state_dir.exists() || has_checkpoints) {
        (false, true) => bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            cfg.out.display()
        ),
        (true, _) if has_checkpoints && !state_dir.exists() => bail!(
            "{} holds checkpoints but no job state ({}); it was not written by --nproc — resume it without --nproc",
            cfg.out.display(),
            state_dir.display()
        ),
        _ => {}
    }
    std::fs::create_dir_all(&cfg.out)
        .with_context(|| format!("{}: cannot create the run directory", cfg.out.display()))?;
    let coordinator = format!("127.0.0.1:{}", free_port()?);
    let s = |v: &dyn ToString| v.to_string();
    // The services log to files; the terminal shows the trainers.
    let logs = cfg.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
    let mut services = vec![spawn_actor(
        "coordinator",
        &[
            s(&"coordinator"),
            s(&"--nodes=1"),
            format!("--trainers-per-node={nproc}"),
            format!("--listen={coordinator}"),
            format!("--metrics-listen=127.0.0.1:{}", free_port()?),
            format!("--store-port={}", free_port()?),
            format!("--state-dir={}", state_dir.display()),
            // This command starts every member itself: a new group, whatever was saved.
            s(&"--forget-members"),
        ],
        Some(&logs.join("coordinator.log")),
    )?];
    wait_for_port(&coordinator, &mut services[0])?;
    services.push(spawn_actor(
        "dataloader",
        &[
            s(&"dataloader"),
            format!("--coordinator={coordinator}"),
            format!("--data={}", cfg.data.display()),
            s(&"--node=local"),
        ],
        Some(&logs.join("dataloader.log")),
    )?);
    eprintln!(
        "job coordinator on {coordinator}: watch it with `lillm status --coordinator {coordinator} --watch`; service logs in {}",
        logs.display()
    );
    let mut user = train_args_without_nproc();
    if threads.is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = (cores / nproc).max(1);
        eprintln!(
            "{nproc} trainers on {cores} cores: {share} thread(s) each (set --threads to change)"
        );
        user.push(format!("--threads={share}"));
    }
    let mut trainers = Vec::new();
    for rank in 0..nproc {
        let mut args = user.clone();
        args.extend([
            format!("--coordinator={coordinator}"),
            format!("--local-rank={rank}"),
            s(&"--node=local"),
        ]);
        trainers.push((rank, spawn_actor(&format!("trainer {rank}"), &args, None)?));
    }
    let outcome = supervise(&mut trainers, &mut services, shutdown);
    // Trainers first: a stopping trainer checkpoints and commits to the coordinator.
    for (_, child) in trainers.iter_mut() {
        signal(child, libc::SIGTERM);
    }
    for (_, child) in trainers.iter_mut() {
        terminate(child, TRAINER_GRACE);
    }
    for child in services.iter_mut() {
        terminate(child, SERVICE_GRACE);
    }
    outcome
}

/// How long a trainer may take to checkpoint and leave after SIGTERM before SIGKILL.
const TRAINER_GRACE: Duration = Duration::from_secs(60);
/// How long a coordinator or dataloader may take to stop after SIGTERM.
const SERVICE_GRACE: Duration = Duration::from_secs(5);

/// Waits until `address` accepts connections (the coordinator is up) or `child` exited.
fn wait_for_port(address: &str, child: &mut Child) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(address).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator exited before listening on {address} ({status})");
        }
        if std::time::Instant::now() > deadline {
            bail!("the coordinator did not listen on {address} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits until every trainer has finished, something failed, or `shutdown`.
fn supervise(
    trainers: &mut Vec<(usize, Child)>,
    services: &mut [Child],
    shutdown: &CancellationToken,
) -> Result<()> {
    loop {
        if shutdown.is_cancelled() {
            eprintln!("stopping the job: each trainer checkpoints its step first");
            return Ok(());
        }
        for (i, service) in services.iter_mut().enumerate() {
            if let Some(status) = service.try_wait()? {
                let name = ["coordinator", "dataloader"][i];
                bail!("the {name} exited ({status}; see its log); the trainers were stopped");
            }
        }
        let mut i = 0;
        while i < trainers.len() {
            match trainers[i].1.try_wait()? {
                Some(status) if status.success() => {
                    trainers.remove(i);
                }
                Some(status) => {
                    let rank = trainers[i].0;
                    bail!("trainer {rank} failed ({status}); the other processes were stopped");
                }
                None => i += 1,
            }
        }
        if trainers.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &mut Child, signal: i32) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (try_wait
        // just saw it running), so the pid cannot name another process.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }
}

/// SIGTERM, then SIGKILL if the process has not gone within `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    signal(child, libc::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
