//! The distributed job as real processes on this machine: a coordinator, dataloader actors
//! and trainer actors talking gRPC and c10d/Gloo, killed and restarted like a real cluster.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (SIGKILL) when dropped; its stderr goes to `log`.
struct Actor {
    child: Child,
    log: PathBuf,
}

impl Actor {
    fn start(exe: &str, args: &[String], log: PathBuf) -> Self {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(exe)
            .args(args)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn lillm(args: &[String], log: PathBuf) -> Self {
        Self::start(env!("CARGO_BIN_EXE_lillm"), args, log)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for a successful exit.
    fn finish(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                assert!(status.success(), "{} failed ({status}):\n{log}", self.log.display());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A coordinator for `trainers_per_node` trainers on each of `nodes` nodes.
struct Job {
    dir: PathBuf,
    address: String,
    metrics: String,
    coordinator_args: Vec<String>,
}

impl Job {
    fn new(dir: &Path, nodes: usize, trainers_per_node: usize, extra: &[&str]) -> Self {
        let address = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut coordinator_args = strings(&["coordinator"]);
        coordinator_args.extend([
            format!("--nodes={nodes}"),
            format!("--trainers-per-node={trainers_per_node}"),
            format!("--listen={address}"),
            format!("--metrics-listen={metrics}"),
            format!("--store-port={}", free_port()),
            format!("--state-dir={}", dir.join("coordinator").display()),
        ]);
        coordinator_args.extend(strings(extra));
        Self {
            dir: dir.to_path_buf(),
            address,
            metrics,
            coordinator_args,
        }
    }

    fn start_coordinator(&self) -> Actor {
        let actor = Actor::lillm(&self.coordinator_args, self.dir.join("coordinator.log"));
        wait_until(Duration::from_secs(30), "the coordinator to listen", || {
            std::net::TcpStream::connect(&self.address).is_ok()
        });
        actor
    }

    fn dataloader_args(&self, data: &Path, node: &str, listen: &str) -> Vec<String> {
        vec![
            "dataloader".into(),
            format!("--coordinator={}", self.address),
            format!("--data={}", data.display()),
            format!("--node={node}"),
            format!("--listen={listen}"),
        ]
    }

    fn trainer_args(&self, train: &[&str], node: &str, local_rank: usize, bind: &str) -> Vec<String> {
        let mut args = strings(train);
        args.extend([
            format!("--coordinator={}", self.address),
            format!("--node={node}"),
            format!("--local-rank={local_rank}"),
            format!("--bind-host={bind}"),
        ]);
        args
    }

    fn status(&self) -> serde_json::Value {
        let out = lillm_ok(&["status", "--coordinator", &self.address, "--json"]);
        serde_json::from_str(&out).unwrap()
    }
}

fn assert_same_losses(expected: &[(u64, f64)], got: &[(u64, f64)]) {
    assert_eq!(expected.len(), got.len(), "{expected:?}\nvs\n{got:?}");
    for ((step, a), (step_b, b)) in expected.iter().zip(got) {
        assert_eq!(step, step_b);
        assert!((a - b).abs() <= 1e-5, "step {step}: {a} vs {b}");
    }
}

/// Runs `grpc_probe.py`-style checks against the coordinator with grpcio, as grpcurl would.
const GRPC_PROBE: &str = r#"
import sys, json, urllib.request
import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf.descriptor_pool import DescriptorPool
addr, metrics = sys.argv[1], sys.argv[2]
ch = grpc.insecure_channel(addr)
db = ProtoReflectionDescriptorDatabase(ch)
services = sorted(db.get_services())
pool = DescriptorPool(db)
coord = pool.FindServiceByName("lillm.v1.Coordinator")
status = pool.FindServiceByName("lillm.v1.Status")
health = ch.unary_unary("/grpc.health.v1.Health/Check")(b"")
text = urllib.request.urlopen(f"http://{metrics}/metrics").read().decode()
print(json.dumps({
    "services": services,
    "coordinator_methods": [m.name for m in coord.methods],
    "status_methods": [m.name for m in status.methods],
    "health": health.hex(),
    "metrics": text,
}))
"#;

#[test]
fn two_nodes_train_together_and_the_job_is_visible_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let job = Job::new(dir.path(), 2, 1, &["--heartbeat-timeout-ms=60000"]);
    let _coordinator = job.start_coordinator();
    // Two "nodes": distinct loopback addresses, each with a dataloader and a trainer.
    let _loaders: Vec<Actor> = [("node-a", "127.0.0.1"), ("node-b", "127.0.0.2")]
        .iter()
        .map(|(node, host)| {
            Actor::lillm(
                &job.dataloader_args(&tiny.data, node, &format!("{host}:0")),
                dir.path().join(format!("dataloader-{node}.log")),
            )
        })
        .collect();
    let run_a = dir.path().join("run-a");
    let run_b = dir.path().join("run-b");
    let mut trainers: Vec<Actor> = [("node-a", "127.0.0.1", &run_a), ("node-b", "127.0.0.2", &run_b)]
        .iter()
        .map(|(node, host, run)| {
            let train = tiny_train_args(s(&tiny.data), s(run), "300", "12");
            // The `trainer` binary is `lillm train`.
            Actor::start(
                env!("CARGO_BIN_EXE_trainer"),
                &job.trainer_args(&train[1..], node, 0, host),
                dir.path().join(format!("trainer-{node}.log")),
            )
        })
        .collect();
    for t in &mut trainers {
        t.finish(Duration::from_secs(180));
    }
    // Rank 0 (node-a sorts first) wrote the run; rank 1 only trained.
    assert_eq!(losses(&run_a).len(), 12);
    assert!(run_a.join("checkpoints/step-00000012/manifest.json").is_file());
    assert!(!run_b.join("checkpoints").exists());

    let status = job.status();
    assert_eq!(status["phase"], "running");
    assert_eq!(status["last_checkpoint"]["step"], 12);
    let mut ranks: Vec<(String, String, u64, String)> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "trainer")
        .map(|m| {
            (
                m["node"].as_str().unwrap().to_string(),
                m["address"].as_str().unwrap().to_string(),
                m["rank"].as_u64().unwrap(),
                m["step"].to_string(),
            )
        })
        .collect();
    ranks.sort();
    assert_eq!(
        ranks,
        vec![
            ("node-a".into(), "127.0.0.1".into(), 0, "12".into()),
            ("node-b".into(), "127.0.0.2".into(), 1, "12".into())
        ]
    );
    let text = lillm_ok(&["status", "--coordinator", &job.address]);
    assert!(
        text.contains("2/2 trainers, 2/2 dataloaders") && text.contains("node-b/trainer0"),
        "{text}"
    );

    let probe: serde_json::Value =
        serde_json::from_str(&python(GRPC_PROBE, &[&job.address, &job.metrics])).unwrap();
    for service in [
        "grpc.health.v1.Health",
        "lillm.v1.Coordinator",
        "lillm.v1.Status",
    ] {
        assert!(
            probe["services"].as_array().unwrap().iter().any(|s| s == service),
            "{service} not listed: {probe}"
        );
    }
    assert_eq!(
        probe["coordinator_methods"],
        serde_json::json!(["Register", "AwaitAssignment", "Heartbeat", "Commit", "ReportEval"])
    );
    assert_eq!(probe["health"], "0801", "health says SERVING");
    let metrics = probe["metrics"].as_str().unwrap();
    assert!(metrics.contains("lillm_checkpoint_step 12"), "{metrics}");
    assert!(
        metrics.contains(r#"lillm_member_step{node="node-b",role="trainer",index="0"} 12"#),
        "{metrics}"
    );
}
