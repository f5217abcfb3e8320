//! `lillm train|sft|dpo --nproc N`: a whole job on this machine — a coordinator, the
//! dataloaders (for pretraining, whose batches they stream) and N trainer actors under one
//! [`Supervisor`]. What it starts is decided first, by pure functions tested on hand-built
//! configs (how many dataloaders, whether the run directory may be used, each service's
//! command line); [`launch_local_job`] then only starts and supervises.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lillm_proto::net::ConnectSettings;
use lillm_trainer::data::TrainData;
use lillm_trainer::{checkpoint, ProcessConfig, TrainConfig};
use tokio_util::sync::CancellationToken;

use crate::job_cmd::{
    free_port, share_cores, start_trainers, tell_coordinator_on_death,
    trainer_args_from_command_line, watch_hangs, LaunchArgs,
};
use crate::supervisor::{Kind, Spec, Supervisor};

/// The node name of every member of a `--nproc` job.
const LOCAL_NODE: &str = "local";

/// A `--nproc` job restarts any child that dies (up to `max_restarts` failures). The
/// coordinator keeps its state in RUN_DIR/coordinator, so the same command with `--resume`
/// continues a job that was stopped (even by SIGKILL). On `shutdown` the trainers stop first
/// (they checkpoint and commit), then the services.
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
    let dataloaders = dataloader_count(TrainData::streamed(cfg.job.objective), launch.dataloaders)?;
    let RunDir {
        state_dir,
        logs,
        resume_from,
    } = prepare_run_dir(cfg)?;
    let coordinator = format!("127.0.0.1:{}", free_port()?);
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
    let services = Services {
        coordinator: &coordinator,
        trainers: nproc,
        dataloaders,
        logs: &logs,
    };
    supervisor.start(coordinator_spec(
        &services,
        &state_dir,
        [free_port()?, free_port()?],
        resume_from,
    ))?;
    wait_for_port(&coordinator, &mut supervisor)?;
    for index in 0..dataloaders {
        supervisor.start(dataloader_spec(&cfg.process, &services, index))?;
    }
    eprintln!(
        "job coordinator on {coordinator}: watch it with `lillm status --coordinator {coordinator} --watch`; service logs in {}",
        logs.display()
    );
    let user = local_trainer_args(nproc, threads, &coordinator);
    start_trainers(&mut supervisor, &user, nproc)?;
    supervisor.run(shutdown)?;
    Ok(())
}

/// Where a local job keeps its files, made ready for it.
struct RunDir {
    /// The coordinator's state (RUN_DIR/coordinator).
    state_dir: PathBuf,
    /// The services' logs (RUN_DIR/logs).
    logs: PathBuf,
    /// The checkpoint committed in the run's bucket to resume from, if any.
    resume_from: Option<String>,
}

/// Checks that the run directory fits `--resume` (a new job needs an empty one), then
/// creates it and its log folder.
fn prepare_run_dir(cfg: &TrainConfig) -> Result<RunDir> {
    let out = &cfg.process.out;
    let state_dir = out.join("coordinator");
    check_run_dir(
        out,
        cfg.process.resume,
        state_dir.exists(),
        !checkpoint::list_checkpoints(out).is_empty(),
    )?;
    let resume_from = committed_in_bucket(cfg)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create the run directory", out.display()))?;
    // The services log to files; the terminal shows the trainers.
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
    Ok(RunDir {
        state_dir,
        logs,
        resume_from,
    })
}

/// The trainers' arguments: the user's command line without the launcher's own flags,
/// its cores shared among `nproc` trainers, pointed at the local coordinator.
fn local_trainer_args(nproc: usize, threads: Option<usize>, coordinator: &str) -> Vec<String> {
    let mut args = trainer_args_from_command_line(&[
        "--nproc",
        "--dataloaders",
        "--max-restarts",
        "--replace-hung-after-s",
        "--local-rank",
        "--node",
        "--coordinator",
    ]);
    share_cores(&mut args, nproc, threads);
    args.extend([
        format!("--coordinator={coordinator}"),
        format!("--node={LOCAL_NODE}"),
    ]);
    args
}

/// The dataloaders a job starts when `--dataloaders asked`: pretraining streams its batches
/// from one or more; SFT and DPO trainers read their data themselves, so none.
fn dataloader_count(streamed: bool, asked: usize) -> Result<usize> {
    match (streamed, asked) {
        (_, 0) => {
            bail!("--dataloaders 0: a --nproc job needs at least one; leave the flag out for one")
        }
        (true, n) => Ok(n),
        (false, 1) => Ok(0),
        (false, n) => bail!(
            "--dataloaders {n}: SFT and DPO trainers read their data themselves; leave the flag out"
        ),
    }
}

/// Whether a job may start in `out`: a new job never writes over a run, and `--resume`
/// continues only a run a `--nproc` job wrote (its coordinator state beside the checkpoints).
fn check_run_dir(out: &Path, resume: bool, has_state: bool, has_checkpoints: bool) -> Result<()> {
    match (resume, has_state, has_checkpoints) {
        (false, true, _) | (false, _, true) => bail!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            out.display()
        ),
        (true, false, true) => bail!(
            "{} holds checkpoints but no job state ({}); it was not written by --nproc — resume it without --nproc",
            out.display(),
            out.join("coordinator").display()
        ),
        _ => Ok(()),
    }
}

/// What every service of the job is told about the others.
struct Services<'a> {
    coordinator: &'a str,
    trainers: usize,
    dataloaders: usize,
    logs: &'a Path,
}

/// The coordinator: `ports` for its metrics and its c10d store; `resume_from`, a bucket's
/// newest committed checkpoint (see [`committed_in_bucket`]).
fn coordinator_spec(
    services: &Services,
    state_dir: &Path,
    [metrics_port, store_port]: [u16; 2],
    resume_from: Option<String>,
) -> Spec {
    Spec {
        name: "the coordinator".into(),
        kind: Kind::Service,
        args: vec![
            "coordinator".into(),
            "--nodes=1".into(),
            format!("--trainers-per-node={}", services.trainers),
            format!("--dataloaders-per-node={}", services.dataloaders),
            format!("--listen={}", services.coordinator),
            format!("--metrics-listen=127.0.0.1:{metrics_port}"),
            format!("--store-port={store_port}"),
            format!("--state-dir={}", state_dir.display()),
        ],
        // This command starts every member itself: a new group, whatever was saved. A
        // restarted coordinator, though, must remember the members it had.
        first_start_args: ["--forget-members".to_string()]
            .into_iter()
            .chain(resume_from.map(|url| format!("--resume-from={url}")))
            .collect(),
        env: Vec::new(),
        log: Some(services.logs.join("coordinator.log")),
    }
}

/// Dataloader `index` of the job. With several, each keeps its own cache folder (it evicts
/// only what it fetched itself) and log.
fn dataloader_spec(process: &ProcessConfig, services: &Services, index: usize) -> Spec {
    let (name, log, cache) = match services.dataloaders {
        1 => ("the dataloader".into(), "dataloader.log".into(), None),
        _ => (
            format!("dataloader {index}"),
            format!("dataloader-{index}.log"),
            Some(own_cache(process, index)),
        ),
    };
    let process = ProcessConfig {
        cache_dir: cache.or(process.cache_dir.clone()),
        ..process.clone()
    };
    Spec {
        name,
        kind: Kind::Service,
        args: [
            "dataloader".into(),
            format!("--coordinator={}", services.coordinator),
            format!("--data={}", process.data.display()),
            format!("--node={LOCAL_NODE}"),
            format!("--local-index={index}"),
        ]
        .into_iter()
        .chain(store_flags(&process))
        .collect(),
        first_start_args: Vec::new(),
        env: Vec::new(),
        log: Some(services.logs.join(log)),
    }
}

/// Dataloader `index`'s own cache folder in a job of several on this machine.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretraining_streams_from_the_dataloaders_asked_for_and_fine_tuning_from_none() {
        assert_eq!(dataloader_count(true, 1).unwrap(), 1);
        assert_eq!(dataloader_count(true, 3).unwrap(), 3);
        assert_eq!(dataloader_count(false, 1).unwrap(), 0);
        let zero = dataloader_count(true, 0).unwrap_err().to_string();
        assert!(zero.contains("--dataloaders 0"), "{zero}");
        let fine_tuning = dataloader_count(false, 2).unwrap_err().to_string();
        assert!(
            fine_tuning.contains("--dataloaders 2") && fine_tuning.contains("SFT and DPO"),
            "{fine_tuning}"
        );
    }

    #[test]
    fn a_new_job_never_writes_over_a_run_and_resume_needs_the_jobs_state() {
        let out = Path::new("/runs/a");
        // A fresh directory, or a job's own state (with or without checkpoints) resumed.
        assert!(check_run_dir(out, false, false, false).is_ok());
        assert!(check_run_dir(out, true, true, true).is_ok());
        assert!(check_run_dir(out, true, true, false).is_ok());
        // `--resume` on an empty directory starts the job (the coordinator saves state).
        assert!(check_run_dir(out, true, false, false).is_ok());
        for (state, checkpoints) in [(true, false), (false, true), (true, true)] {
            let refused = check_run_dir(out, false, state, checkpoints)
                .unwrap_err()
                .to_string();
            assert!(
                refused.contains("/runs/a already holds a run") && refused.contains("--resume"),
                "{refused}"
            );
        }
        let single = check_run_dir(out, true, false, true)
            .unwrap_err()
            .to_string();
        assert!(
            single.contains("/runs/a/coordinator") && single.contains("without --nproc"),
            "{single}"
        );
    }

    /// Fails the test unless `spec`'s command line holds each of `args`.
    fn assert_has_args(spec: &Spec, args: &[&str]) {
        for arg in args {
            assert!(
                spec.args.iter().any(|a| a == arg),
                "{arg} in {:?}",
                spec.args
            );
        }
    }

    fn services<'a>(dataloaders: usize, logs: &'a Path) -> Services<'a> {
        Services {
            coordinator: "127.0.0.1:7000",
            trainers: 4,
            dataloaders,
            logs,
        }
    }

    #[test]
    fn the_coordinator_forgets_members_and_takes_the_buckets_checkpoint_on_its_first_start_only() {
        let logs = Path::new("/runs/a/logs");
        let spec = coordinator_spec(
            &services(2, logs),
            Path::new("/runs/a/coordinator"),
            [7001, 7002],
            Some("s3://b/run/checkpoints/step-000040".into()),
        );
        assert_has_args(
            &spec,
            &[
                "--trainers-per-node=4",
                "--dataloaders-per-node=2",
                "--listen=127.0.0.1:7000",
                "--metrics-listen=127.0.0.1:7001",
                "--store-port=7002",
                "--state-dir=/runs/a/coordinator",
            ],
        );
        assert_eq!(
            spec.first_start_args,
            [
                "--forget-members",
                "--resume-from=s3://b/run/checkpoints/step-000040"
            ]
        );
        assert_eq!(
            spec.log.as_deref(),
            Some(logs.join("coordinator.log").as_path())
        );
        let local = coordinator_spec(&services(1, logs), Path::new("/s"), [1, 2], None);
        assert_eq!(local.first_start_args, ["--forget-members"]);
    }

    #[test]
    fn several_dataloaders_each_keep_their_own_cache_and_log() {
        let logs = Path::new("/runs/a/logs");
        let process = ProcessConfig {
            data: "s3://b/data".into(),
            cache_dir: Some("/cache".into()),
            cache_bytes: Some("2GiB".into()),
            ..ProcessConfig::default()
        };
        let alone = dataloader_spec(&process, &services(1, logs), 0);
        assert_eq!(alone.name, "the dataloader");
        assert_eq!(
            alone.log.as_deref(),
            Some(logs.join("dataloader.log").as_path())
        );
        assert_has_args(&alone, &["--cache-dir=/cache"]);
        let second = dataloader_spec(&process, &services(3, logs), 1);
        assert_eq!(second.name, "dataloader 1");
        assert_eq!(
            second.log.as_deref(),
            Some(logs.join("dataloader-1.log").as_path())
        );
        assert_has_args(
            &second,
            &[
                "--coordinator=127.0.0.1:7000",
                "--data=s3://b/data",
                "--node=local",
                "--local-index=1",
                "--cache-dir=/cache/dataloader-1",
                "--cache-bytes=2GiB",
            ],
        );
    }
}
