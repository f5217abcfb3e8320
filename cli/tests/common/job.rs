//! A distributed job as real processes: actors (killed when dropped) and a coordinator for
//! them, shared by the cluster and lifecycle tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::lillm_ok;

/// A child process killed (SIGKILL) when dropped; its stderr goes to `log`.
pub struct Actor {
    pub child: Child,
    pub log: PathBuf,
}

impl Actor {
    pub fn start(exe: &str, args: &[String], log: PathBuf) -> Self {
        Self::start_with_env(exe, args, log, &[])
    }

    pub fn start_with_env(exe: &str, args: &[String], log: PathBuf, env: &[(&str, &Path)]) -> Self {
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    pub fn lillm(args: &[String], log: PathBuf) -> Self {
        Self::start(env!("CARGO_BIN_EXE_lillm"), args, log)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a successful exit.
    pub fn finish(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                assert!(
                    status.success(),
                    "{} failed ({status}):\n{log}",
                    self.log.display()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {within:?}:\n{}",
                self.log.display(),
                self.log_text()
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

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// A coordinator for `trainers_per_node` trainers on each of `nodes` nodes.
pub struct Job {
    pub dir: PathBuf,
    pub address: String,
    pub metrics: String,
    pub coordinator_args: Vec<String>,
}

impl Job {
    pub fn new(dir: &Path, nodes: usize, trainers_per_node: usize, extra: &[&str]) -> Self {
        Self::on_host(dir, "127.0.0.1", nodes, trainers_per_node, extra)
    }

    /// A coordinator listening on `host` (an address other network namespaces can reach).
    pub fn on_host(
        dir: &Path,
        host: &str,
        nodes: usize,
        trainers_per_node: usize,
        extra: &[&str],
    ) -> Self {
        let address = format!("{host}:{}", free_port());
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

    /// Lets the job run on as few as `min` of its nodes (`--nodes MIN:MAX`).
    pub fn elastic(mut self, min: usize) -> Self {
        for arg in self.coordinator_args.iter_mut() {
            if let Some(max) = arg.strip_prefix("--nodes=") {
                *arg = format!("--nodes={min}:{max}");
            }
        }
        self
    }

    pub fn start_coordinator(&self) -> Actor {
        let mut actor = Actor::lillm(&self.coordinator_args, self.dir.join("coordinator.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&self.address).is_err() {
            assert!(
                Instant::now() < deadline && actor.running(),
                "the coordinator did not listen on {}:\n{}",
                self.address,
                actor.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        actor
    }

    /// Starts the coordinator, a dataloader and one trainer per argument list, with logs
    /// named after `round` (`loader-ROUND.log`, `trainerK-ROUND.log`).
    pub fn start_all(
        &self,
        loader_args: &[String],
        trainer_args: &[Vec<String>],
        round: &str,
    ) -> Vec<Actor> {
        let mut actors = vec![self.start_coordinator()];
        actors.push(Actor::lillm(
            loader_args,
            self.dir.join(format!("loader-{round}.log")),
        ));
        for (k, args) in trainer_args.iter().enumerate() {
            actors.push(Actor::lillm(
                args,
                self.dir.join(format!("trainer{k}-{round}.log")),
            ));
        }
        actors
    }

    pub fn dataloader_args(&self, data: &Path, node: &str, listen: &str) -> Vec<String> {
        vec![
            "dataloader".into(),
            format!("--coordinator={}", self.address),
            format!("--data={}", data.display()),
            format!("--node={node}"),
            format!("--listen={listen}"),
        ]
    }

    pub fn trainer_args(
        &self,
        train: &[&str],
        node: &str,
        local_rank: usize,
        bind: &str,
    ) -> Vec<String> {
        let mut args = strings(train);
        args.extend([
            format!("--coordinator={}", self.address),
            format!("--node={node}"),
            format!("--local-rank={local_rank}"),
            format!("--bind-host={bind}"),
        ]);
        args
    }

    /// The argument lists of `n` trainers on node `local` (local ranks 0..n).
    pub fn local_trainers(&self, train: &[&str], n: usize) -> Vec<Vec<String>> {
        (0..n)
            .map(|k| self.trainer_args(train, "local", k, "127.0.0.1"))
            .collect()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = lillm_ok(&["status", "--coordinator", &self.address, "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    /// Registered members, of any role.
    pub fn members(&self) -> usize {
        self.status()["members"].as_array().unwrap().len()
    }
}

pub fn assert_same_losses(expected: &[(u64, f64)], got: &[(u64, f64)]) {
    assert_eq!(expected.len(), got.len(), "{expected:?}\nvs\n{got:?}");
    for ((step, a), (step_b, b)) in expected.iter().zip(got) {
        assert_eq!(step, step_b);
        assert!((a - b).abs() <= 1e-5, "step {step}: {a} vs {b}");
    }
}
