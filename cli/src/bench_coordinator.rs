//! `lillm bench coordinator`: one real coordinator process and thousands of simulated
//! trainers and dataloaders in this one, speaking the real gRPC protocol over loopback —
//! the register storm, steady heartbeats, a kill of 1% of the trainers and the regroup,
//! and the checkpoint commits — with one table of figures per job size.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bench_cmd::memory_mb;
use anyhow::{bail, Context, Result};
use clap::Args;
use lillm_proto::member::{MemberClient, Registration};
use lillm_proto::net::{self, ConnectSettings, RetryPolicy};
use lillm_proto::v1 as pb;
use prost::Message;
use tokio::task::JoinSet;

#[derive(Args, Debug, Clone)]
pub struct CoordinatorBenchArgs {
    /// Job sizes to simulate, in trainers (one table each).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    trainers: Vec<usize>,
    /// Trainers per node; each node also runs one dataloader.
    #[arg(long, default_value_t = 8)]
    trainers_per_node: usize,
    /// Seconds of steady heartbeats measured.
    #[arg(long, default_value_t = 60)]
    steady_seconds: u64,
    /// The coordinator's heartbeat timeout.
    #[arg(long, default_value_t = 2_000)]
    heartbeat_timeout_ms: u64,
    /// Share of the trainers killed at once (percent).
    #[arg(long, default_value_t = 1.0)]
    kill_percent: f64,
    /// The coordinator binary to measure (default: `coordinator` beside this `lillm`, else
    /// `lillm coordinator`); another build's, to compare.
    #[arg(long)]
    coordinator_bin: Option<std::path::PathBuf>,
}

/// Simulates each job size in turn and prints its table.
pub fn run(args: &CoordinatorBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    for &trainers in &args.trainers {
        let figures = rt.block_on(simulate(args, trainers))?;
        println!("{}", figures.table());
    }
    Ok(())
}

/// What one simulated job measured.
#[derive(Debug, Default)]
struct Figures {
    trainers: usize,
    nodes: usize,
    heartbeat_interval_ms: u64,
    storm_s: f64,
    first_generation_s: f64,
    heartbeats: usize,
    heartbeat_p50_ms: f64,
    heartbeat_p99_ms: f64,
    heartbeat_max_ms: f64,
    cpu_cores: f64,
    rss_mb: f64,
    peak_rss_mb: f64,
    /// State saves (`None`: a coordinator that does not count them).
    steady_saves_per_s: Option<f64>,
    storm_saves: Option<u64>,
    killed: usize,
    detection_s: f64,
    regroup_s: f64,
    regroup_saves: Option<u64>,
    commit_ms: Vec<f64>,
    status_summary_bytes: usize,
    status_all_bytes: usize,
    status_all_ms: f64,
}

impl Figures {
    fn table(&self) -> String {
        let row = |what: &str, value: String| format!("| {what} | {value} |\n");
        let mut out = format!(
            "\n### {} trainers on {} nodes ({} dataloaders), heartbeat every {} ms\n\n| what | measured |\n|---|---|\n",
            self.trainers, self.nodes, self.nodes, self.heartbeat_interval_ms
        );
        out += &row(
            "register storm (every member registered)",
            format!(
                "{:.2} s ({} state saves)",
                self.storm_s,
                count(self.storm_saves)
            ),
        );
        out += &row(
            "last registration → every trainer holds its rank",
            format!("{:.3} s", self.first_generation_s),
        );
        out += &row(
            "heartbeat latency p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.1} ms ({} heartbeats)",
                self.heartbeat_p50_ms,
                self.heartbeat_p99_ms,
                self.heartbeat_max_ms,
                self.heartbeats
            ),
        );
        out += &row(
            "coordinator CPU, steady",
            format!("{:.2} cores", self.cpu_cores),
        );
        out += &row(
            "coordinator RSS, steady / peak",
            format!("{:.0} / {:.0} MB", self.rss_mb, self.peak_rss_mb),
        );
        out += &row(
            "state-store writes, steady",
            match self.steady_saves_per_s {
                Some(rate) => format!("{rate:.2} per s"),
                None => "not counted by this coordinator".into(),
            },
        );
        out += &row(
            &format!(
                "detection of {} silent trainers (kill → eviction)",
                self.killed
            ),
            format!("{:.2} s", self.detection_s),
        );
        out += &row(
            "regroup (eviction → every trainer holds its new rank)",
            format!(
                "{:.2} s ({} state saves)",
                self.regroup_s,
                count(self.regroup_saves)
            ),
        );
        let commits: Vec<String> = self.commit_ms.iter().map(|c| format!("{c:.1}")).collect();
        out += &row(
            "commit latency (each checkpoint writer)",
            format!("{} ms", commits.join(" / ")),
        );
        out += &row(
            "`lillm status` answer: summary (64 members) / all members",
            format!(
                "{:.1} kB / {:.1} kB ({:.1} ms)",
                self.status_summary_bytes as f64 / 1e3,
                self.status_all_bytes as f64 / 1e3,
                self.status_all_ms
            ),
        );
        out
    }
}

/// The coordinator process under test.
struct CoordinatorProcess {
    child: Child,
    address: String,
    metrics: String,
    /// Its state directory, which also holds its log.
    state: tempfile::TempDir,
}

/// The coordinator's stderr (warnings and any panic) in its state directory, read back
/// when it exits under the bench.
const LOG: &str = "coordinator.log";

impl CoordinatorProcess {
    fn start(args: &CoordinatorBenchArgs, trainers: usize) -> Result<Self> {
        let nodes = trainers.div_ceil(args.trainers_per_node);
        let state = tempfile::tempdir()?;
        let (port, metrics_port) = (crate::job_cmd::free_port()?, crate::job_cmd::free_port()?);
        let address = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{metrics_port}");
        // The `coordinator` binary beside this one, as a job runs it (`lillm coordinator`
        // is the same server, but its process also maps libtorch).
        let exe = std::env::current_exe()?;
        let standalone = args
            .coordinator_bin
            .clone()
            .unwrap_or_else(|| exe.with_file_name("coordinator"));
        let mut command = match standalone.exists() {
            true => Command::new(standalone),
            false => {
                let mut c = Command::new(exe);
                c.arg("coordinator");
                c
            }
        };
        let child = command
            .args(["--listen", &address, "--metrics-listen", &metrics])
            .arg("--state-dir")
            .arg(state.path())
            .args([
                "--nodes",
                &nodes.to_string(),
                "--trainers-per-node",
                &args.trainers_per_node.to_string(),
                "--dataloaders-per-node",
                "1",
                "--heartbeat-timeout-ms",
                &args.heartbeat_timeout_ms.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(state.path().join(LOG))?)
            .spawn()
            .context("starting the coordinator")?;
        Ok(Self {
            child,
            address,
            metrics,
            state,
        })
    }

    /// How the coordinator ended, once it has: nothing the bench waits for can happen then.
    fn exited(&mut self) -> Result<Option<String>> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        let log = std::fs::read_to_string(self.state.path().join(LOG)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let log = match lines.len() {
            0 => "its log is empty".to_string(),
            n => format!(
                "the end of its log:\n{}",
                lines[n.saturating_sub(20)..].join("\n")
            ),
        };
        Ok(Some(format!(
            "the coordinator under test exited ({status}); {log}"
        )))
    }

    /// Fails once the coordinator has exited.
    fn ensure_running(&mut self) -> Result<()> {
        match self.exited()? {
            Some(exited) => bail!("{exited}"),
            None => Ok(()),
        }
    }

    /// CPU seconds (user + system) the process has used.
    fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(") ").context("unreadable /proc stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks / hz)
    }

    /// (resident, peak resident) memory in MB.
    fn rss_mb(&self) -> Result<(f64, f64)> {
        memory_mb(&self.child.id().to_string())
    }

    /// State saves so far, from `/metrics` (`None`: not counted there).
    fn saves(&self) -> Option<u64> {
        let text = http_get(&self.metrics, "/metrics").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("lillm_coordinator_state_saves_total "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Saves between two readings, when the coordinator counts them.
fn since(now: Option<u64>, before: Option<u64>) -> Option<u64> {
    Some(now? - before?)
}

fn count(saves: Option<u64>) -> String {
    saves.map_or("uncounted".into(), |n| n.to_string())
}

fn http_get(address: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// One simulated member: the members' own client with its own connection, as a real
/// process would have.
#[derive(Clone)]
struct Sim {
    member: MemberClient,
    address: String,
}

impl Sim {
    fn new(
        coordinator: &str,
        node: &str,
        role: pb::Role,
        local: u32,
        address: String,
    ) -> Result<Self> {
        let member = MemberClient::new(
            coordinator,
            (node, role, local),
            "",
            ConnectSettings::default(),
            RetryPolicy::default(),
        )?;
        Ok(Self { member, address })
    }

    fn id(&self) -> &pb::MemberId {
        self.member.id()
    }
}

/// What the members share with the bench while it runs.
#[derive(Default)]
struct Board {
    /// Heartbeat latencies (microseconds) while `measuring`.
    latencies: Mutex<Vec<u32>>,
    measuring: AtomicBool,
    /// Trainers holding a rank in the generation the bench waits for.
    assigned: AtomicU64,
    stop: AtomicBool,
}

fn sims(address: &str, trainers: usize, per_node: usize) -> Result<(Vec<Sim>, Vec<Sim>)> {
    let nodes = trainers.div_ceil(per_node);
    let mut t = Vec::with_capacity(trainers);
    let mut d = Vec::with_capacity(nodes);
    for node in 0..nodes {
        let name = format!("node-{node:04}");
        for local in 0..per_node.min(trainers - node * per_node) {
            let at = format!("10.{}.{}.{}:{}", node / 256, node % 256, local, 29_500);
            t.push(Sim::new(
                address,
                &name,
                pb::Role::Trainer,
                local as u32,
                at,
            )?);
        }
        let at = format!("10.{}.{}.200:7080", node / 256, node % 256);
        d.push(Sim::new(address, &name, pb::Role::Dataloader, 0, at)?);
    }
    Ok((t, d))
}

/// Registers as members do (an unreachable coordinator, say a full accept queue in the
/// storm, is retried by the policy); returns how often to heartbeat.
async fn register(sim: &Sim, rejoining_from: u64) -> Result<Duration> {
    let registration = Registration {
        address: sim.address.clone(),
        config_fingerprint: "bench".into(),
        rejoining_from,
        ..Registration::default()
    };
    let registered = sim
        .member
        .register(&registration, DEFAULT_HEARTBEAT)
        .await
        .with_context(|| format!("{}: register", sim.id().node))?;
    Ok(registered.heartbeat)
}

/// Members' heartbeat interval when the coordinator names none (an older one).
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(250);

/// Waits for a rank as a trainer does: a coordinator that forgot this member (it evicted
/// it) is answered with a new registration (`rejoining_from`).
async fn await_assignment(sim: &Sim, rejoining_from: u64) -> Result<pb::Assignment> {
    loop {
        let request = pb::AwaitAssignmentRequest {
            id: Some(sim.id().clone()),
            job_token: String::new(),
            wait_ms: 1_000,
        };
        match sim.member.coordinator().await_assignment(request).await {
            Ok(a) if a.get_ref().waiting.is_empty() => return Ok(a.into_inner()),
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::NotFound => {
                register(sim, rejoining_from).await?;
            }
            Err(e) => bail!(
                "{}: waiting for a group: {}",
                sim.id().node,
                net::NetError::status("the coordinator", e)
            ),
        }
    }
}

/// A trainer's life: register (again after its generation ends), wait for its rank, and
/// heartbeat until stopped or `killed` (then it falls silent).
async fn trainer(
    sim: Sim,
    board: Arc<Board>,
    killed: Arc<AtomicBool>,
    generation: u64,
    interval: Duration,
) -> Result<()> {
    let mut generation = generation;
    let mut step = 0;
    let phase = Duration::from_micros(rand_below(interval.as_micros() as u64));
    tokio::time::sleep(phase).await;
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !board.stop.load(Ordering::Relaxed) {
        every.tick().await;
        if killed.load(Ordering::Relaxed) {
            return Ok(());
        }
        step += 1;
        let progress = pb::HeartbeatRequest {
            generation,
            step,
            loss: Some(3.0),
            tokens_per_s: Some(1e5),
            mfu: Some(0.4),
            ..Default::default()
        };
        let sent = Instant::now();
        let reply = sim.member.heartbeat(progress).await;
        let took = sent.elapsed();
        if board.measuring.load(Ordering::Relaxed) {
            board
                .latencies
                .lock()
                .expect("latencies lock")
                .push(took.as_micros() as u32);
        }
        match reply {
            Ok(r) if r.stale => {
                register(&sim, generation).await?;
                let a = await_assignment(&sim, generation).await?;
                generation = a.generation;
                board.assigned.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) if board.stop.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => bail!("{}: heartbeat failed: {e}", sim.id().node),
        }
    }
    Ok(())
}

async fn dataloader(sim: Sim, board: Arc<Board>, interval: Duration) -> Result<()> {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !board.stop.load(Ordering::Relaxed) {
        every.tick().await;
        let beat = sim.member.heartbeat(pb::HeartbeatRequest::default()).await;
        if let Err(e) = beat {
            if !board.stop.load(Ordering::Relaxed) {
                bail!("{}: dataloader heartbeat failed: {e}", sim.id().node);
            }
        }
    }
    Ok(())
}

/// A random draw in `0..n` (std's per-instance random hash keys): the heartbeats' phases.
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e3
}

type StatusClient = pb::status_client::StatusClient<tonic::transport::Channel>;

/// One connection for every status the bench reads, as `lillm status --watch` keeps one.
async fn status_client(address: &str) -> Result<StatusClient> {
    let channel = net::connect(address, &ConnectSettings::default()).await?;
    Ok(StatusClient::new(channel).max_decoding_message_size(64 << 20))
}

/// The job's status (listing at most `member_limit` members), its size and time in ms.
async fn status(client: &StatusClient, member_limit: u32) -> Result<(pb::JobStatus, usize, f64)> {
    let asked = Instant::now();
    let job = client
        .clone()
        .get_status(pb::StatusRequest {
            member_limit,
            node: String::new(),
        })
        .await
        .map_err(|s| net::NetError::status("the coordinator's status service", s))?
        .into_inner();
    let took = asked.elapsed().as_secs_f64() * 1e3;
    let size = job.encoded_len();
    Ok((job, size, took))
}

async fn wait_for_coordinator(address: &str) -> Result<StatusClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(client) = status_client(address).await {
            if status(&client, 1).await.is_ok() {
                return Ok(client);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the coordinator at {address} did not answer within 30 s")
}

/// One job size: the five phases in turn, each adding its figures.
async fn simulate(args: &CoordinatorBenchArgs, trainers: usize) -> Result<Figures> {
    let coordinator = CoordinatorProcess::start(args, trainers)?;
    let status_client = wait_for_coordinator(&coordinator.address).await?;
    let (trainer_sims, loader_sims) = sims(&coordinator.address, trainers, args.trainers_per_node)?;
    let mut figures = Figures {
        trainers,
        nodes: loader_sims.len(),
        ..Default::default()
    };
    eprintln!(
        "bench coordinator: {trainers} trainers, {} nodes: register storm",
        figures.nodes
    );
    let mut sim = Simulation {
        kills: (0..trainers).map(|_| Arc::default()).collect(),
        coordinator,
        status: status_client,
        trainer_sims,
        loader_sims,
        board: Arc::new(Board::default()),
        members: JoinSet::new(),
        interval: DEFAULT_HEARTBEAT,
    };
    let phases = async {
        let generation = sim.register_storm(&mut figures).await?;
        sim.steady_heartbeats(generation, args.steady_seconds, &mut figures)
            .await?;
        sim.kill_and_regroup(args.kill_percent, &mut figures)
            .await?;
        sim.commit_checkpoints(&mut figures).await?;
        sim.status_cost(&mut figures).await
    };
    let ran = phases.await;
    sim.stop().await;
    if let Err(e) = ran {
        // When the coordinator died under a phase, that is the news, not what the phase
        // then missed.
        return Err(match sim.coordinator.exited()? {
            Some(exited) => anyhow::anyhow!("{e:#}, as {exited}"),
            None => e,
        });
    }
    Ok(figures)
}

/// A simulated job while it runs: the coordinator under test, its members and what they
/// share with the bench.
struct Simulation {
    coordinator: CoordinatorProcess,
    status: StatusClient,
    trainer_sims: Vec<Sim>,
    loader_sims: Vec<Sim>,
    board: Arc<Board>,
    /// The members' heartbeat loops.
    members: JoinSet<Result<()>>,
    /// Set to silence trainer `i` (a hung process or a lost node).
    kills: Vec<Arc<AtomicBool>>,
    /// How often members heartbeat (the coordinator says, at registration).
    interval: Duration,
}

impl Simulation {
    /// Phase 1, the register storm: everyone at once; trainers then wait for their ranks.
    /// Returns the first generation.
    async fn register_storm(&mut self, figures: &mut Figures) -> Result<u64> {
        let saves_before = self.coordinator.saves();
        let started = Instant::now();
        let mut storm = JoinSet::new();
        for sim in self.loader_sims.iter().chain(&self.trainer_sims) {
            let sim = sim.clone();
            storm.spawn(async move {
                let heartbeat = register(&sim, 0).await?;
                let registered = Instant::now();
                let assignment = match sim.id().role == pb::Role::Trainer as i32 {
                    true => Some((await_assignment(&sim, 0).await?, Instant::now())),
                    false => None,
                };
                anyhow::Ok((heartbeat, registered, assignment))
            });
        }
        let (mut last_registered, mut last_assigned) = (started, started);
        let mut generation = 0;
        while let Some(done) = storm.join_next().await {
            let (heartbeat, registered, assignment) = done??;
            self.interval = heartbeat;
            last_registered = last_registered.max(registered);
            if let Some((a, at)) = assignment {
                generation = a.generation;
                last_assigned = last_assigned.max(at);
            }
        }
        figures.storm_s = (last_registered - started).as_secs_f64();
        figures.first_generation_s = (last_assigned - last_registered).as_secs_f64();
        figures.storm_saves = since(self.coordinator.saves(), saves_before);
        figures.heartbeat_interval_ms = self.interval.as_millis() as u64;
        Ok(generation)
    }

    /// Phase 2: every member heartbeats; the coordinator's CPU, memory, saves and the
    /// heartbeats' latency over `seconds`.
    async fn steady_heartbeats(
        &mut self,
        generation: u64,
        seconds: u64,
        figures: &mut Figures,
    ) -> Result<()> {
        eprintln!(
            "bench coordinator: {seconds} s of heartbeats every {} ms",
            figures.heartbeat_interval_ms
        );
        let (board, interval) = (&self.board, self.interval);
        for (sim, killed) in self.trainer_sims.iter().cloned().zip(&self.kills) {
            self.members.spawn(trainer(
                sim,
                board.clone(),
                killed.clone(),
                generation,
                interval,
            ));
        }
        for sim in self.loader_sims.iter().cloned() {
            self.members.spawn(dataloader(sim, board.clone(), interval));
        }
        // Let the phases spread out before measuring.
        tokio::time::sleep(interval * 2).await;
        board.measuring.store(true, Ordering::Relaxed);
        let coordinator = &self.coordinator;
        let (cpu0, saves0, t0) = (
            coordinator.cpu_seconds()?,
            coordinator.saves(),
            Instant::now(),
        );
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let seconds = t0.elapsed().as_secs_f64();
        figures.cpu_cores = (coordinator.cpu_seconds()? - cpu0) / seconds;
        figures.steady_saves_per_s = since(coordinator.saves(), saves0).map(|n| n as f64 / seconds);
        board.measuring.store(false, Ordering::Relaxed);
        (figures.rss_mb, _) = coordinator.rss_mb()?;
        let mut latencies = std::mem::take(&mut *board.latencies.lock().expect("latencies lock"));
        latencies.sort_unstable();
        figures.heartbeats = latencies.len();
        figures.heartbeat_p50_ms = percentile(&latencies, 0.50);
        figures.heartbeat_p99_ms = percentile(&latencies, 0.99);
        figures.heartbeat_max_ms = percentile(&latencies, 1.0);
        Ok(())
    }

    /// Phase 3: a share of the trainers falls silent at once; the coordinator evicts them
    /// and ends the generation; survivors regroup, and the killed slots come back as new
    /// processes (their node launcher restarts them).
    async fn kill_and_regroup(&mut self, kill_percent: f64, figures: &mut Figures) -> Result<()> {
        let trainers = self.trainer_sims.len();
        let step = (100.0 / kill_percent.max(0.01)).round().max(1.0) as usize;
        let victims: Vec<usize> = (0..trainers).step_by(step).collect();
        figures.killed = victims.len();
        eprintln!("bench coordinator: killing {} trainers", victims.len());
        let (restarts0, _, _) = status(&self.status, 1).await?;
        let saves_at_kill = self.coordinator.saves();
        self.board.assigned.store(0, Ordering::Relaxed);
        let killed_at = Instant::now();
        for &v in &victims {
            self.kills[v].store(true, Ordering::Relaxed);
        }
        let detected_at = loop {
            let (job, _, _) = status(&self.status, 1).await?;
            if job.restarts > restarts0.restarts {
                break Instant::now();
            }
            self.coordinator.ensure_running()?;
            if killed_at.elapsed() > Duration::from_secs(60) {
                bail!("no eviction within 60 s of the kill");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        figures.detection_s = (detected_at - killed_at).as_secs_f64();
        for &v in &victims {
            let (sim, board, killed) = (
                self.trainer_sims[v].clone(),
                self.board.clone(),
                Arc::default(),
            );
            let interval = self.interval;
            self.members.spawn(async move {
                register(&sim, 0).await?;
                let a = await_assignment(&sim, 0).await?;
                board.assigned.fetch_add(1, Ordering::Relaxed);
                trainer(sim, board, killed, a.generation, interval).await
            });
        }
        while self.board.assigned.load(Ordering::Relaxed) < trainers as u64 {
            self.coordinator.ensure_running()?;
            if killed_at.elapsed() > Duration::from_secs(120) {
                bail!(
                    "only {} of {trainers} trainers hold a rank 120 s after the kill",
                    self.board.assigned.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        figures.regroup_s = detected_at.elapsed().as_secs_f64();
        figures.regroup_saves = since(self.coordinator.saves(), saves_at_kill);
        Ok(())
    }

    /// Phase 4: the checkpoint writers (rank 0 and the second writer) commit a step.
    async fn commit_checkpoints(&self, figures: &mut Figures) -> Result<()> {
        let (job, _, _) = status(&self.status, 0).await?;
        let writer_ranks = [Some(0), second_writer(&job)];
        let writer_ids: Vec<&pb::MemberId> = job
            .members
            .iter()
            .filter(|m| m.rank.is_some() && writer_ranks.contains(&m.rank))
            .filter_map(|m| m.id.as_ref())
            .filter(|id| id.role == pb::Role::Trainer as i32)
            .collect();
        let writers = self
            .trainer_sims
            .iter()
            .filter(|sim| writer_ids.contains(&sim.id()));
        for sim in writers {
            let request = pb::CommitRequest {
                id: Some(sim.id().clone()),
                job_token: String::new(),
                generation: job.generation,
                step: 1_000,
                path: format!("/ckpt/{}/step-1000", sim.id().node),
                val_loss: Some(3.0),
            };
            let sent = Instant::now();
            let peer = format!("{}: the coordinator (commit)", sim.id().node);
            sim.member
                .coordinator()
                .commit(request)
                .await
                .map_err(|s| net::NetError::status(&peer, s))?;
            figures.commit_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        }
        Ok(())
    }

    /// Phase 5: what `lillm status` costs at this size, and the coordinator's peak memory.
    async fn status_cost(&self, figures: &mut Figures) -> Result<()> {
        let (_, summary_bytes, _) = status(&self.status, 64).await?;
        let (_, all_bytes, all_ms) = status(&self.status, 0).await?;
        figures.status_summary_bytes = summary_bytes;
        figures.status_all_bytes = all_bytes;
        figures.status_all_ms = all_ms;
        (_, figures.peak_rss_mb) = self.coordinator.rss_mb()?;
        Ok(())
    }

    /// Ends every member's loop, saying how many failed and the first one's error (one
    /// line, though thousands fail together when the coordinator dies).
    async fn stop(&mut self) {
        self.board.stop.store(true, Ordering::Relaxed);
        self.members.abort_all();
        let (mut failed, mut first) = (0, None);
        while let Some(done) = self.members.join_next().await {
            if let Ok(Err(e)) = done {
                failed += 1;
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            eprintln!("bench coordinator: {failed} simulated member(s) failed; the first: {e:#}");
        }
    }
}

/// The lowest rank on another node than rank 0's: the second checkpoint writer.
fn second_writer(job: &pb::JobStatus) -> Option<u32> {
    let node = |m: &pb::MemberStatus| m.id.as_ref().map(|id| id.node.clone());
    let trainers = job.members.iter().filter(|m| {
        m.id.as_ref()
            .is_some_and(|id| id.role == pb::Role::Trainer as i32)
    });
    let leader = trainers
        .clone()
        .find(|m| m.rank == Some(0))
        .and_then(node)?;
    trainers
        .filter(|m| node(m).as_ref() != Some(&leader))
        .filter_map(|m| m.rank)
        .min()
}
