//! The supervisor behind `lillm train --nproc N` and the node launcher: a child that dies is
//! restarted and the job finishes by itself with the same model; a child that was refused
//! is not restarted.

mod common;

use common::job::*;
use common::*;
use std::time::Duration;

/// Process ids of `parent`'s children whose command line contains `needle`.
fn children_with(parent: u32, needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
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
    let mut args = tiny_train_args(data, out, "300", "120");
    set_flag(&mut args, "--eval-interval", "20");
    set_flag(&mut args, "--lr-decay-iters", "120");
    args
}

#[test]
fn a_trainer_killed_under_nproc_is_restarted_and_the_job_finishes_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let straight = dir.path().join("straight");
    lillm_ok(&long_run(s(&tiny.data), s(&straight)));

    let run = dir.path().join("run");
    let mut args = strings(&long_run(s(&tiny.data), s(&run)));
    args.extend(strings(&["--nproc", "2", "--max-restarts", "2"]));
    let mut job = Actor::lillm(&args, dir.path().join("job.log"));
    wait_until(Duration::from_secs(120), "30 training steps", || {
        losses(&run).len() >= 30
    });
    let pid = job.child.id();
    let victims = children_with(pid, "--local-rank=1");
    assert_eq!(victims.len(), 1, "one trainer 1 under {pid}: {victims:?}");
    let survivor = children_with(pid, "--local-rank=0");
    // SAFETY: kill(2) on a process id just read from /proc, a child of our child.
    unsafe {
        libc::kill(victims[0], libc::SIGKILL);
    }
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
    assert_eq!(survivor.len(), 1);
    let max_diff = python(
        "import sys\nfrom safetensors.torch import load_file\na=load_file(sys.argv[1]);b=load_file(sys.argv[2])\nprint(max((a[k]-b[k]).abs().max().item() for k in a))",
        &[
            s(&straight.join("checkpoints/step-00000120/model.safetensors")),
            s(&run.join("checkpoints/step-00000120/model.safetensors")),
        ],
    );
    assert!(
        max_diff.trim().parse::<f64>().unwrap() <= 1e-5,
        "final weights differ by {max_diff}"
    );
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
fn json_logs_say_which_actor_rank_generation_and_step_each_line_comes_from() {
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
    for line in &trainer {
        assert_eq!(line["span"]["role"], "trainer", "{line}");
        assert_eq!(line["span"]["node"], "local", "{line}");
    }
    // Once training, a line carries rank, generation and step.
    assert!(
        trainer.iter().any(|l| {
            let span = &l["span"];
            span["rank"] == 0 && span["generation"] == 1 && span["step"].as_u64().is_some()
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
            .all(|l| l["span"]["role"] == "coordinator"),
        "{services}"
    );
}
