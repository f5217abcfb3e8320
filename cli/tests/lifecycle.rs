//! How roles end: SIGTERM to each role stops it cleanly (exit 0, its step checkpointed and
//! committed) and the job resumes on the exact next batch; and heartbeats keep arriving
//! through steps and evaluations that take seconds.

mod common;

use common::job::*;
use common::*;
use std::time::{Duration, Instant};

fn sigterm(actor: &Actor) {
    signal(actor.child.id(), libc::SIGTERM);
}

/// Waits for `actor` to exit and returns its status code, failing after `within`.
fn exit_code(actor: &mut Actor, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = actor.child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "{} still running {within:?} after SIGTERM:\n{}",
            actor.log.display(),
            actor.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn long_run<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    long_run_of(data, out, "120")
}

fn checkpoint_steps(run: &std::path::Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_prefix("step-")?.parse().ok()
            })
            .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

#[test]
fn sigterm_checkpoints_the_current_step_and_resume_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let args = strings(&long_run(s(&tiny.data), s(&run)));
    let mut trainer = Actor::lillm(&args, dir.path().join("train.log"));
    wait_until(Duration::from_secs(120), "25 training steps", || {
        losses(&run).len() >= 25
    });
    sigterm(&trainer);
    let sent = Instant::now();
    assert_eq!(
        exit_code(&mut trainer, Duration::from_secs(20)),
        0,
        "{}",
        trainer.log_text()
    );
    let took = sent.elapsed();
    let stopped_at = losses(&run).last().unwrap().0;
    assert!(stopped_at < 120, "stopped mid-run, at step {stopped_at}");
    assert!(
        checkpoint_steps(&run).contains(&stopped_at),
        "the step it stopped at ({stopped_at}) is checkpointed: {:?}",
        checkpoint_steps(&run)
    );
    eprintln!("stopped at step {stopped_at}, {took:?} after SIGTERM");

    let mut resume = args.clone();
    resume.push("--resume".into());
    let refs: Vec<&str> = resume.iter().map(String::as_str).collect();
    lillm_ok(&refs);
    assert_same_losses(&losses(&straight), &losses(&run));
}

#[test]
fn sigterm_to_each_role_of_a_job_exits_zero_and_the_job_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 2, &[]);
    let loader_args = job.dataloader_args(&tiny.data, "local", "127.0.0.1:0");
    let train = long_run(s(&tiny.data), s(&run));
    let trainer_args = job.local_trainers(&train, 2);
    let mut first = job.start_all(&loader_args, &trainer_args, "1");
    wait_until(Duration::from_secs(120), "25 training steps", || {
        losses(&run).len() >= 25
    });
    // A trainer told to stop: it and its peer stop at the same step, rank 0 commits it,
    // the one told exits 0 and the other stays, waiting in its process for the next group.
    sigterm(&first[3]);
    assert_eq!(
        exit_code(&mut first[3], Duration::from_secs(20)),
        0,
        "{}",
        first[3].log_text()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(first[2].running(), "{}", first[2].log_text());
    let stopped_at = losses(&run).last().unwrap().0;
    assert!(stopped_at < 120, "stopped mid-run, at step {stopped_at}");
    let status = job.status();
    assert_eq!(
        status["last_checkpoint"]["step"].as_u64(),
        Some(stopped_at),
        "the step both stopped at is committed: {status}"
    );
    // Waiting for a group, it stops promptly on SIGTERM; so do the services.
    for i in [2, 1, 0] {
        let actor = &mut first[i];
        sigterm(actor);
        assert_eq!(
            exit_code(actor, Duration::from_secs(10)),
            0,
            "{}",
            actor.log_text()
        );
    }
    drop(first);

    let mut second = job.start_all(&loader_args, &trainer_args, "2");
    for trainer in &mut second[2..] {
        trainer.finish(Duration::from_secs(180));
    }
    assert_same_losses(&losses(&straight), &losses(&run));
}

/// Steps of seconds and a long evaluation on rank 0 (while rank 1 waits for it in the next
/// all-reduce) under a short heartbeat timeout: nobody is declared dead.
#[test]
fn heartbeats_arrive_through_steps_and_evaluations_of_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let run = dir.path().join("run");
    let job = Job::new(dir.path(), 1, 2, &["--heartbeat-timeout-ms=3000"]);
    let _coordinator = job.start_coordinator();
    let _loader = Actor::lillm(
        &job.dataloader_args(&tiny.data, "local", "127.0.0.1:0"),
        dir.path().join("loader.log"),
    );
    let mut train = tiny_train_args(s(&tiny.data), s(&run), "300", "4");
    seconds_per_step(&mut train);
    set_flag(&mut train, "--eval-interval", "3");
    set_flag(&mut train, "--eval-iters", "4");
    let mut trainers: Vec<Actor> = (0..2)
        .map(|k| {
            Actor::lillm(
                &job.trainer_args(&train, "local", k, "127.0.0.1"),
                dir.path().join(format!("trainer{k}.log")),
            )
        })
        .collect();
    for t in &mut trainers {
        t.finish(Duration::from_secs(300));
    }
    let step_ms = step_times_ms(&run);
    assert!(
        step_ms.iter().all(|&ms| ms >= 1000.0),
        "steps take seconds here (else this test proves nothing): {step_ms:?}"
    );
    let status = job.status();
    assert_eq!(
        status["generation"], 1,
        "no member was declared dead: {status}"
    );
    assert_eq!(status["restarts"], 0, "{status}");
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    assert!(!log.contains("missed heartbeats"), "{log}");
    eprintln!("step times (ms): {step_ms:?}");
}

/// Checkpoints have their own frequency, by steps or by time, apart from evaluations; a run
/// resumed from one continues exactly.
#[test]
fn checkpoints_follow_their_own_interval_and_resume_from_them_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    let mut args = tiny_train_args(s(&tiny.data), s(&straight), "300", "24");
    set_flag(&mut args, "--eval-interval", "100");
    args.extend(["--checkpoint-interval", "5", "--keep-last", "100"]);
    lillm_ok(&args);
    // Steps 5, 10, 15, 20 by interval, 24 at the end; no evaluation in between.
    assert_eq!(checkpoint_steps(&straight), [5, 10, 15, 20, 24]);

    // A resume from step 15 (later ones removed) retrains 16..24 exactly.
    let resumed = dir.path().join("resumed");
    copy_dir(&straight, &resumed);
    for step in [20, 24] {
        std::fs::remove_dir_all(resumed.join(format!("checkpoints/step-{step:08}"))).unwrap();
    }
    set_flag(&mut args, "--out", s(&resumed));
    args.push("--resume");
    lillm_ok(&args);
    assert_same_losses(&losses(&straight), &losses(&resumed));

    // By time: a checkpoint whenever 30 ms have passed since the last one.
    let timed = dir.path().join("timed");
    let mut args = tiny_train_args(s(&tiny.data), s(&timed), "300", "30");
    set_flag(&mut args, "--eval-interval", "100");
    args.extend(["--checkpoint-minutes", "0.0005", "--keep-last", "100"]);
    lillm_ok(&args);
    assert!(
        checkpoint_steps(&timed).len() > 2,
        "time-based checkpoints between the evaluations: {:?}",
        checkpoint_steps(&timed)
    );
    let err = lillm_err(&[
        "train",
        "--data",
        s(&tiny.data),
        "--out",
        s(&dir.path().join("bad")),
        "--preset",
        "tiny",
        "--checkpoint-minutes=-1",
    ]);
    assert!(err.contains("checkpoint_minutes"), "{err}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Steps of seconds, a trainer killed with no supervisor to report it (as when its machine
/// dies) and a heartbeat timeout longer than a step: the survivor finds the group broken
/// in its all-reduce, ends its generation itself and waits in place; the dead trainer's
/// replacement joins it, takes the survivor's state, and the job ends with the losses of an
/// uninterrupted run.
#[test]
fn a_survivor_regroups_in_place_when_a_peer_dies_mid_step_of_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let mut train = tiny_train_args(s(&tiny.data), "-", "300", "10");
    seconds_per_step(&mut train);
    set_flag(&mut train, "--eval-interval", "4");
    set_flag(&mut train, "--lr-decay-iters", "10");
    let straight = dir.path().join("straight");
    set_flag(&mut train, "--out", s(&straight));
    lillm_ok(&train);

    let run = dir.path().join("run");
    set_flag(&mut train, "--out", s(&run));
    let job = Job::new(dir.path(), 1, 2, &["--heartbeat-timeout-ms=10000"]);
    let loader_args = job.dataloader_args(&tiny.data, "local", "127.0.0.1:0");
    let trainer_args = job.local_trainers(&train, 2);
    let mut actors = job.start_all(&loader_args, &trainer_args, "1");
    wait_until(Duration::from_secs(120), "3 steps", || {
        losses(&run).len() >= 3
    });
    actors[3].kill();
    let coordinator_log = || std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap();
    wait_until(Duration::from_secs(30), "the survivor to rejoin", || {
        coordinator_log()
            .matches("local/trainer0 registered")
            .count()
            >= 2
    });
    // It did not wait for the coordinator's 10 s heartbeat timeout to notice.
    let log = coordinator_log();
    let rejoined = log.rfind("local/trainer0 registered").unwrap();
    assert!(
        log.find("missed heartbeats")
            .is_none_or(|evicted| evicted > rejoined),
        "{log}"
    );
    assert!(actors[2].running(), "{}", actors[2].log_text());
    // The replacement.
    let mut replacement = Actor::lillm(&trainer_args[1], dir.path().join("trainer1-2.log"));
    actors[2].finish(Duration::from_secs(240));
    replacement.finish(Duration::from_secs(60));
    assert_same_losses(&losses(&straight), &losses(&run));
    let step_ms = step_times_ms(&run);
    assert!(
        step_ms.iter().all(|&ms| ms >= 1000.0),
        "steps take seconds here: {step_ms:?}"
    );
}
