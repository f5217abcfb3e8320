//! The supervisor behind `lillm train --nproc N` and the node launcher: a child that dies is
//! restarted and the job finishes by itself with the same model; a child that was refused
//! is not restarted.

mod common;

use common::job::*;
use common::*;
use std::time::Duration;

/// Process ids of `parent`'s children whose command line contains `needle`.
fn children_with(parent: u32, needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid …; comm may hold spaces, so read after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(parent) && String::from_utf8_lossy(&cmdline).contains(needle)
        })
        .collect()
}

fn long_run<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    long_run_of(data, out, "120")
}

/// The 120-step run's final weights equal the uninterrupted run's.
fn assert_same_final_weights(straight: &std::path::Path, run: &std::path::Path) {
    let max_diff = max_weight_diff(
        &straight.join("checkpoints/step-00000120/model.safetensors"),
        &run.join("checkpoints/step-00000120/model.safetensors"),
    );
    assert!(max_diff <= 1e-5, "final weights differ by {max_diff}");
}

/// `lillm ARGS` (a `--nproc` launcher) logging at info level to DIR/job.log.
fn launcher(dir: &std::path::Path, args: &[String]) -> Actor {
    let log = dir.join("job.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Actor { child, log }
}

#[test]
fn a_killed_trainer_is_restarted_the_survivor_regroups_in_place_and_the_model_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let mut args = strings(&long_run(s(&tiny.data), s(&run)));
    args.extend(strings(&["--nproc", "2", "--max-restarts", "2"]));
    let mut job = launcher(dir.path(), &args);
    wait_until(Duration::from_secs(120), "30 training steps", || {
        losses(&run).len() >= 30
    });
    let pid = job.child.id();
    let victims = children_with(pid, "--local-rank=1");
    assert_eq!(victims.len(), 1, "one trainer 1 under {pid}: {victims:?}");
    let survivor = children_with(pid, "--local-rank=0");
    assert_eq!(survivor.len(), 1, "one trainer 0 under {pid}: {survivor:?}");
    signal(victims[0], libc::SIGKILL);
    // The survivor does not exit: it joins the next group in the same process and the
    // group starts from the step it had reached, not from the last checkpoint.
    wait_until(Duration::from_secs(60), "the survivor to regroup", || {
        job.log_text().contains("joining the next one in place")
    });
    assert!(
        std::path::Path::new(&format!("/proc/{}", survivor[0])).exists(),
        "the survivor's process is still the same"
    );
    job.finish(Duration::from_secs(240));
    let log = job.log_text();
    assert!(
        log.contains("trainer 1 died (killed by SIGKILL); restarting it (failure 1 of at most 2)"),
        "{log}"
    );
    assert_same_losses(&losses(&straight), &losses(&run));
    let coordinator = std::fs::read_to_string(run.join("logs/coordinator.log")).unwrap();
    assert!(
        coordinator.contains("local/trainer1 left (its process died (killed by SIGKILL))"),
        "the supervisor told the coordinator at once, not after a heartbeat timeout:\n{coordinator}"
    );
    assert!(
        !log.contains("trainer 0 died"),
        "the survivor was never restarted:\n{log}"
    );
    let resumed_at = log
        .lines()
        .filter_map(|l| l.split("the group starts from the state of step ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .max()
        .unwrap();
    assert!(
        resumed_at >= 30,
        "the new group started where the survivor was (step {resumed_at}), not at a checkpoint"
    );
    assert_same_final_weights(&straight, &run);
}

/// A trainer that hangs (SIGSTOP: it neither dies nor answers) is evicted by the
/// coordinator; its launcher, seeing the process alive but no longer a member past
/// `--replace-hung-after-s`, kills and restarts it, and the job finishes with the weights of
/// an uninterrupted run instead of waiting for it forever.
#[test]
fn a_hung_trainer_is_killed_and_replaced_and_the_model_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let mut args = strings(&long_run(s(&tiny.data), s(&run)));
    args.extend(strings(&["--nproc", "2", "--replace-hung-after-s", "2"]));
    let mut job = launcher(dir.path(), &args);
    wait_until(Duration::from_secs(120), "30 training steps", || {
        losses(&run).len() >= 30
    });
    let victims = children_with(job.child.id(), "--local-rank=1");
    assert_eq!(victims.len(), 1, "one trainer 1: {victims:?}");
    signal(victims[0], libc::SIGSTOP);
    job.finish(Duration::from_secs(240));
    let log = job.log_text();
    assert!(
        log.contains("trainer 1: the coordinator evicted it for silence over 2s ago and it never came back; killing it as hung"),
        "{log}"
    );
    assert!(
        log.contains("trainer 1 died (killed by SIGKILL); restarting it"),
        "{log}"
    );
    assert_same_losses(&losses(&straight), &losses(&run));
    assert_same_final_weights(&straight, &run);
}

/// A trainer frozen past the heartbeat timeout and woken again: both trainers regroup in
/// their processes in the middle of a log window, and every record — the window spanning
/// the regroup included — equals the uninterrupted run's.
#[test]
fn a_log_window_spanning_a_regroup_reports_what_a_run_without_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    // Windows of 150 steps: the freeze lands inside the second one, after a commit past step
    // 150 (one every 20 steps) and well before step 300 even on a machine many times faster
    // than this one (the log is polled every 100 ms). Freezing as soon as the record of step
    // 150 appears could regroup from step 150 itself, before the window began.
    let mut straight_args = long_run_of(s(&tiny.data), s(&straight), "300");
    set_flag(&mut straight_args, "--log-interval", "150");
    lillm_ok(&straight_args);

    let run = dir.path().join("run");
    let mut train = long_run_of(s(&tiny.data), s(&run), "300");
    set_flag(&mut train, "--log-interval", "150");
    let mut args = strings(&train);
    args.extend(strings(&["--nproc", "2"]));
    let mut job = launcher(dir.path(), &args);
    wait_until(Duration::from_secs(120), "a commit past step 150", || {
        job.log_text()
            .lines()
            .filter_map(|l| l.split("committed the checkpoint step=").nth(1))
            .filter_map(|rest| rest.trim().parse::<u64>().ok())
            .any(|step| step > 150 && step < 300)
    });
    let frozen = children_with(job.child.id(), "--local-rank=1");
    assert_eq!(frozen.len(), 1, "one trainer 1: {frozen:?}");
    signal(frozen[0], libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(3_500));
    signal(frozen[0], libc::SIGCONT);
    job.finish(Duration::from_secs(240));
    let log = job.log_text();
    assert!(!log.contains("died"), "nobody was restarted:\n{log}");
    let regrouped_at: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("the group starts from the state of step ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    assert!(
        regrouped_at.iter().any(|&step| step > 150 && step < 300),
        "a regroup inside the window of steps 151-300: {regrouped_at:?}\n{log}"
    );
    assert_same_losses(&losses(&straight), &losses(&run));
}

#[test]
fn a_refused_node_launcher_is_not_restarted_and_says_do_not_retry() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let job = Job::new(dir.path(), 1, 1, &["--job-token=right"]);
    let _coordinator = job.start_coordinator();
    let run = dir.path().join("run");
    let mut args = job.trainer_args(&long_run(s(&tiny.data), s(&run)), "n0", 0, "127.0.0.1");
    args.extend(strings(&["--nproc", "1", "--job-token", "wrong"]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("refused by the coordinator at") && err.contains("wrong or missing job token"),
        "{err}"
    );
    assert!(err.contains("trainer 0 was refused"), "{err}");
    assert!(!err.contains("restarting it"), "{err}");
}

#[test]
fn json_logs_say_which_actor_rank_and_generation_each_line_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let run = dir.path().join("run");
    let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", "12");
    args.extend(["--nproc", "2", "--log-format", "json"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(&args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let trainer = lines(&err);
    assert!(!trainer.is_empty(), "{err}");
    // The fields of all of a line's spans, merged.
    let fields = |line: &serde_json::Value| -> serde_json::Map<String, serde_json::Value> {
        let mut all = serde_json::Map::new();
        for span in line["spans"].as_array().into_iter().flatten() {
            all.extend(span.as_object().unwrap().clone());
        }
        all
    };
    for line in &trainer {
        let f = fields(line);
        assert_eq!(f["role"], "trainer", "{line}");
        assert_eq!(f["node"], "local", "{line}");
    }
    // In a group, lines carry rank and generation; a line about a step carries the step.
    assert!(
        trainer.iter().any(|l| {
            let f = fields(l);
            f.get("rank") == Some(&0.into())
                && f.get("generation") == Some(&1.into())
                && l["fields"]["step"].as_u64().is_some()
        }),
        "{err}"
    );
    let services = std::fs::read_to_string(run.join("logs/coordinator.log")).unwrap();
    let coordinator = lines(&services);
    assert!(
        !coordinator.is_empty(),
        "the services log JSON too: {services}"
    );
    // Every line but the signal handler's own (it belongs to the process, not the role).
    assert!(
        coordinator
            .iter()
            .filter(|l| l["target"] != "lillm_proto::process")
            .all(|l| l["spans"][0]["role"] == "coordinator"),
        "{services}"
    );
}
