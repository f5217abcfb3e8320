//! Silent failures: a trainer that stops answering without its sockets closing (SIGSTOP, a
//! network partition). The others must not wait out the collective timeout: the coordinator
//! ends the generation after its heartbeat timeout, the survivors abort the collective they
//! are blocked in and go on without it; when it wakes up it is fenced — its generation is
//! over, so it can neither heartbeat, commit nor add gradients to the new group — and it
//! joins the job again from its own process. Steps take seconds here, as in real jobs.

mod common;

use common::job::*;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// 14 steps of seconds each, trained once in one process (`straight`) for the job under
/// test (`run`) to match.
struct Runs {
    dir: tempfile::TempDir,
    tiny: TinyData,
    straight: PathBuf,
    run: PathBuf,
}

impl Runs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tiny = tiny_data(dir.path(), 300);
        let (straight, run) = (dir.path().join("straight"), dir.path().join("run"));
        let runs = Self {
            dir,
            tiny,
            straight,
            run,
        };
        let mut alone = runs.train();
        set_flag(&mut alone, "--out", s(&runs.straight));
        lillm_ok(&alone);
        runs
    }

    /// The trainers' arguments, writing to `run`.
    fn train(&self) -> Vec<&str> {
        let mut train = tiny_train_args(s(&self.tiny.data), s(&self.run), "300", "14");
        seconds_per_step(&mut train);
        set_flag(&mut train, "--eval-interval", "7");
        set_flag(&mut train, "--lr-decay-iters", "14");
        train
    }

    /// The job's per-step losses and final weights are the single process's.
    fn assert_same_model(&self) {
        assert_same_losses(&losses(&self.straight), &losses(&self.run));
        let last = "checkpoints/step-00000014/model.safetensors";
        let max_diff = max_weight_diff(&self.straight.join(last), &self.run.join(last));
        assert!(max_diff <= 1e-5, "final weights differ by {max_diff}");
    }
}

/// A failed run prints what its processes logged and the job's metrics: the reason a
/// timing-dependent failure happened is in them, and the temporary directory goes away.
impl Drop for Runs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        files.sort();
        files.push(self.run.join("metrics.jsonl"));
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "==== {} (last {} lines)\n{}",
                file.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Waits until both nodes' trainers hold a rank in one group (an elastic job may start with
/// whichever registered first, alone) and that group has logged two steps: the failure
/// under test must hit a group of two.
fn wait_for_two_rank_group(job: &Job, run: &std::path::Path) {
    wait_until(
        Duration::from_secs(120),
        "both trainers in one group",
        || {
            let status = job.status();
            let ranked = status["members"].as_array().unwrap().iter();
            ranked
                .filter(|m| m["role"] == "trainer" && !m["rank"].is_null())
                .count()
                == 2
        },
    );
    let joined_at = losses(run).len();
    wait_until(Duration::from_secs(120), "2 steps of the group", || {
        losses(run).len() >= joined_at + 2
    });
}

/// Asserts the coordinator never evicted `member` for missed heartbeats: a trainer that
/// finishes a step of seconds after its generation ended is alive, not dead.
fn assert_never_evicted(dir: &std::path::Path, member: &str) {
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    let evictions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("missed heartbeats") && l.contains(member))
        .collect();
    assert!(evictions.is_empty(), "{member} was evicted: {evictions:?}");
}

/// How many times the coordinator's log says `member` registered.
fn registrations(dir: &std::path::Path, member: &str) -> usize {
    std::fs::read_to_string(dir.join("coordinator.log"))
        .unwrap_or_default()
        .matches(&format!("{member} registered"))
        .count()
}

#[test]
fn a_stopped_trainer_is_fenced_and_the_job_goes_on_with_the_same_math() {
    let runs = Runs::new();
    let (dir, tiny, run, train) = (&runs.dir, &runs.tiny, &runs.run, runs.train());
    // Two nodes of one trainer each; the job may shrink to one.
    let job = Job::new(
        dir.path(),
        2,
        1,
        &["--heartbeat-timeout-ms=3000", "--elastic-grace-ms=1000"],
    )
    .elastic(1);
    let _coordinator = job.start_coordinator();
    let mut actors = Vec::new();
    for node in ["node-a", "node-b"] {
        actors.push(Actor::lillm(
            &job.dataloader_args(&tiny.data, node, "127.0.0.1:0"),
            dir.path().join(format!("loader-{node}.log")),
        ));
        actors.push(Actor::lillm(
            &job.trainer_args(&train, node, 0, "127.0.0.1"),
            dir.path().join(format!("trainer-{node}.log")),
        ));
    }
    wait_for_two_rank_group(&job, run);
    // Rank 0 (node a: it also serves the group's store) freezes mid-step.
    let stopped_pid = actors[1].child.id();
    signal(stopped_pid, libc::SIGSTOP);
    let stopped_at = Instant::now();
    // The survivor leaves the frozen group (it was blocked in an all-reduce) and forms the
    // next one alone: after the 3 s heartbeat timeout, far before the 600 s collective one.
    wait_until(Duration::from_secs(20), "the survivor to regroup", || {
        registrations(dir.path(), "node-b/trainer0") >= 2
    });
    let detected = stopped_at.elapsed();
    let frozen_at = losses(run).len();
    wait_until(
        Duration::from_secs(60),
        "the survivor to train alone",
        || losses(run).len() >= frozen_at + 2,
    );
    signal(stopped_pid, libc::SIGCONT);
    for k in [1, 3] {
        actors[k].finish(Duration::from_secs(300));
    }
    let woken = actors[1].log_text();
    // Its first heartbeat is refused (its generation is over, or it was evicted from it).
    assert!(
        woken.contains(
            "leaving the group to join the next one reason=the coordinator dropped this trainer"
        ) || woken.contains("leaving the group to join the next one reason=generation 1 is over"),
        "the woken trainer is fenced\n{woken}"
    );
    // It joined again from the same process (no supervisor here could have restarted it,
    // and it exited 0 above).
    assert!(registrations(dir.path(), "node-a/trainer0") >= 2);
    let survivor = actors[3].log_text();
    assert!(
        survivor.contains("aborted"),
        "the survivor gave up its blocked collective\n{survivor}"
    );
    // The survivor's generation ended again when the woken trainer came back, mid-step:
    // it stayed alive through that step of seconds (3 s timeout).
    assert_never_evicted(dir.path(), "node-b/trainer0");
    // The frozen trainer's step never reached the new group: the same math as a run
    // without it.
    runs.assert_same_model();
    assert!(
        step_times_ms(&runs.straight).iter().all(|&ms| ms >= 1000.0),
        "steps take seconds here"
    );
    eprintln!("stopped trainer detected and survivor regrouped in {detected:?}");
}

/// Node b lives in its own network namespace; its link goes down mid-step (no socket
/// closes, packets just stop). The coordinator misses its heartbeats, the job shrinks to
/// node a and goes on; when the link comes back node b's trainer finds itself fenced (its
/// generation is over), joins again from its own process and the job grows back — with
/// the math of an uninterrupted run.
#[test]
fn a_partitioned_node_is_left_behind_fenced_and_taken_back_with_the_same_math() {
    let ns = match common::netns::Netns::create("part") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("skipping: cannot create a network namespace here ({e}); run as root");
            return;
        }
    };
    let runs = Runs::new();
    let (dir, tiny, run, train) = (&runs.dir, &runs.tiny, &runs.run, runs.train());
    let job = Job::on_host(
        dir.path(),
        &ns.outside,
        2,
        1,
        &["--heartbeat-timeout-ms=3000", "--elastic-grace-ms=1000"],
    )
    .elastic(1);
    let _coordinator = job.start_coordinator();
    let lillm = env!("CARGO_BIN_EXE_lillm");
    let mut actors = Vec::new();
    for (node, host) in [("node-a", &ns.outside), ("node-b", &ns.inside)] {
        let loader = job.dataloader_args(&tiny.data, node, &format!("{host}:0"));
        let trainer = job.trainer_args(&train, node, 0, host);
        for (role, args) in [("loader", loader), ("trainer", trainer)] {
            let log = dir.path().join(format!("{role}-{node}.log"));
            actors.push(match node {
                "node-a" => Actor::lillm(&args, log),
                _ => {
                    let (program, args) = ns.wrap(lillm, &args);
                    Actor::start(&program, &args, log)
                }
            });
        }
    }
    wait_for_two_rank_group(&job, run);
    ns.partition();
    let cut_at = Instant::now();
    wait_until(Duration::from_secs(20), "node a to go on alone", || {
        registrations(dir.path(), "node-a/trainer0") >= 2
    });
    let detected = cut_at.elapsed();
    let cut_steps = losses(run).len();
    wait_until(Duration::from_secs(60), "node a to train alone", || {
        losses(run).len() >= cut_steps + 2
    });
    ns.heal();
    for k in [1, 3] {
        actors[k].finish(Duration::from_secs(300));
    }
    let node_b = actors[3].log_text();
    assert!(
        node_b.contains(
            "leaving the group to join the next one reason=the coordinator dropped this trainer"
        ) || node_b.contains("leaving the group to join the next one reason=generation 1 is over"),
        "node b is fenced when its link comes back\n{node_b}"
    );
    assert!(registrations(dir.path(), "node-b/trainer0") >= 2);
    assert_never_evicted(dir.path(), "node-a/trainer0");
    runs.assert_same_model();
    eprintln!("partition detected and node a regrouped in {detected:?}");
}
