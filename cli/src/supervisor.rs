//! The supervisor of one node's processes, as torchrun's elastic agent is: it starts each
//! child, restarts the ones that die, and stops them in order. `lillm train --nproc N` runs
//! it over a coordinator, a dataloader and N trainers; `lillm train --coordinator C --nproc G`
//! (the node launcher that systemd or a Kubernetes pod runs) over G trainers of a remote job.
//!
//! How a child's exit is read:
//! - a trainer exiting 0 has finished the job (or left it on SIGTERM): it is not restarted;
//! - a trainer exiting [`EXIT_REGROUP`] was told its group is over: it starts again at once
//!   and joins the next one (no restart is charged — it did nothing wrong);
//! - a child exiting [`EXIT_FATAL`] was refused (config, token, fingerprint) and one exiting
//!   2 was given a command line it cannot parse: restarting cannot help, so the supervisor stops everything and exits [`EXIT_FATAL`] itself;
//! - any other exit (a crash, SIGKILL, the OOM killer, exit 1) of any child is a failure:
//!   the coordinator is told at once (so the group ends now, not after a heartbeat timeout)
//!   and the child is started again, up to `max_restarts` failures for the whole node;
//! - a trainer that still runs but that the coordinator evicted for silence and no longer
//!   lists past a grace is hung: it is killed, which makes it a failure as above.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use lillm_trainer::stop::{EXIT_FATAL, EXIT_REGROUP};

use crate::hang_watch::{self, ListedTrainers, Listing};
use tokio_util::sync::CancellationToken;

/// How long a trainer may take to checkpoint and leave after SIGTERM before SIGKILL.
pub const TRAINER_GRACE: Duration = Duration::from_secs(60);
/// How long a coordinator or dataloader may take to stop after SIGTERM.
pub const SERVICE_GRACE: Duration = Duration::from_secs(5);
/// Exit status of a command line that did not parse (clap's): no restart can fix it.
const EXIT_USAGE: i32 = 2;
/// A failed child waits this long before it starts again, so a child that dies at start
/// does not spin (its restarts are bounded by `max_restarts` anyway).
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// What a child is, for restarts and for the order of shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The coordinator or a dataloader: stopped after the trainers.
    Service,
    /// A trainer; `local_rank` names it to the coordinator when it dies.
    Trainer { local_rank: u32 },
}

/// How to start one child: `lillm ARGS` with extra environment, stderr to `log` if given.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub kind: Kind,
    pub args: Vec<String>,
    /// Appended on the first start only (e.g. the coordinator's `--forget-members`: a
    /// restarted coordinator must remember the members it had).
    pub first_start_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: Option<PathBuf>,
}

/// How supervision ended when it did not give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every trainer exited 0: the job is done.
    Finished,
    /// The shutdown token was cancelled (SIGTERM): the trainers checkpointed and stopped.
    Stopped,
}

/// Exit status of a node launcher stopped by SIGTERM before its job finished (128 + 15, as
/// if SIGTERM had ended it): its pod is to be replaced, which is not a failure of the job.
pub const EXIT_STOPPED: u8 = 143;

/// Why the supervisor gave up.
#[derive(Debug, thiserror::Error)]
pub enum GaveUp {
    #[error("{name} was refused ({status}); restarting cannot help, so the other processes were stopped")]
    Fatal { name: String, status: String },
    #[error("{name} failed ({status}) after {max_restarts} restart(s) (--max-restarts); the other processes were stopped")]
    Exhausted {
        name: String,
        status: String,
        max_restarts: u32,
    },
    #[error("{name} died ({status}) after the other trainers had finished the job; check that its last checkpoint was committed (`lillm status`)")]
    AfterFinish { name: String, status: String },
    #[error("cannot start {name}: {source}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

impl GaveUp {
    /// The exit status of the supervisor's own process: a refusal is passed on as
    /// [`EXIT_FATAL`] so that its own supervisor (Kubernetes' pod failure policy) stops too.
    pub fn exit_code(&self) -> u8 {
        match self {
            GaveUp::Fatal { .. } => EXIT_FATAL,
            _ => 1,
        }
    }
}

/// Called with the trainer's local rank and what happened when a trainer dies, so the job
/// learns of it at once.
pub type OnTrainerDeath = Box<dyn FnMut(u32, &str)>;

struct Running {
    spec: Spec,
    child: Option<Child>,
    finished: bool,
    /// What the coordinator said of this process (trainers; reset when it starts again).
    listing: Listing,
}

/// The launcher's watch for hung trainers (see [`crate::hang_watch`]).
struct HangWatch {
    ask: ListedTrainers,
    grace: Duration,
    last: Instant,
}

pub struct Supervisor {
    children: Vec<Running>,
    max_restarts: u32,
    restarts: u32,
    on_trainer_death: OnTrainerDeath,
    hangs: Option<HangWatch>,
}

impl Supervisor {
    pub fn new(max_restarts: u32, on_trainer_death: OnTrainerDeath) -> Self {
        Self {
            children: Vec::new(),
            max_restarts,
            restarts: 0,
            on_trainer_death,
            hangs: None,
        }
    }

    /// Kills (so restarts) a running trainer that `ask` no longer lists for longer than
    /// `grace`: the coordinator evicted it for silence and it never came back (hung).
    pub fn replace_hung_trainers(&mut self, ask: ListedTrainers, grace: Duration) {
        self.hangs = Some(HangWatch {
            ask,
            grace,
            last: Instant::now(),
        });
    }

    /// Starts a child and supervises it from now on.
    pub fn start(&mut self, spec: Spec) -> Result<(), GaveUp> {
        let child = spawn(&spec, true)?;
        self.children.push(Running {
            spec,
            child: Some(child),
            finished: false,
            listing: Listing::default(),
        });
        Ok(())
    }

    /// How the named child ended, if it has (it is then no longer supervised).
    pub fn exited(&mut self, name: &str) -> Option<String> {
        let running = self.children.iter_mut().find(|r| r.spec.name == name)?;
        let status = running.child.as_mut()?.try_wait().ok()??;
        running.child = None;
        running.finished = true;
        Some(describe(status))
    }

    /// Supervises until every trainer has finished, `shutdown` is cancelled, or it gives up;
    /// then stops every child that still runs, trainers first (a stopping trainer
    /// checkpoints and commits to the coordinator, which must still be there).
    pub fn run(&mut self, shutdown: &CancellationToken) -> Result<Ended, GaveUp> {
        let outcome = self.watch(shutdown);
        self.stop_all();
        outcome
    }

    fn watch(&mut self, shutdown: &CancellationToken) -> Result<Ended, GaveUp> {
        loop {
            if shutdown.is_cancelled() {
                eprintln!("stopping: each trainer checkpoints its step first");
                return Ok(Ended::Stopped);
            }
            for i in 0..self.children.len() {
                self.check(i)?;
            }
            self.kill_hung_trainers();
            let trainers_left = self
                .children
                .iter()
                .any(|r| matches!(r.spec.kind, Kind::Trainer { .. }) && !r.finished);
            if !trainers_left {
                return Ok(Ended::Finished);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Looks at child `i`: restarts it or gives up if it exited.
    fn check(&mut self, i: usize) -> Result<(), GaveUp> {
        let running = &mut self.children[i];
        let Some(child) = running.child.as_mut() else {
            return Ok(());
        };
        let Ok(Some(status)) = child.try_wait() else {
            return Ok(());
        };
        running.child = None;
        let name = running.spec.name.clone();
        let said = describe(status);
        match (running.spec.kind, status.code()) {
            (Kind::Trainer { .. }, Some(0)) => {
                running.finished = true;
                return Ok(());
            }
            (Kind::Trainer { .. }, Some(code)) if code == i32::from(EXIT_REGROUP) => {
                // Told to regroup: straight back in, nothing charged.
            }
            (_, Some(code)) if code == i32::from(EXIT_FATAL) || code == EXIT_USAGE => {
                return Err(GaveUp::Fatal { name, status: said });
            }
            (Kind::Trainer { .. }, _) if self.trainer_finished() => {
                // The others completed the job: a new process would wait for a group forever.
                return Err(GaveUp::AfterFinish { name, status: said });
            }
            (kind, _) => {
                if self.restarts >= self.max_restarts {
                    return Err(GaveUp::Exhausted {
                        name,
                        status: said,
                        max_restarts: self.max_restarts,
                    });
                }
                self.restarts += 1;
                // A timestamped line: when a failure was noticed is part of the record.
                tracing::warn!(
                    "{name} died ({said}); restarting it (failure {} of at most {})",
                    self.restarts,
                    self.max_restarts
                );
                if let Kind::Trainer { local_rank } = kind {
                    (self.on_trainer_death)(local_rank, &said);
                }
                std::thread::sleep(RESTART_DELAY);
            }
        }
        let running = &mut self.children[i];
        running.child = Some(spawn(&running.spec, false)?);
        running.listing = Listing::default();
        Ok(())
    }

    /// Every [`hang_watch::POLL`]: asks the coordinator which trainers it lists and kills
    /// those unlisted past the grace; [`Supervisor::check`] then restarts them as failures.
    fn kill_hung_trainers(&mut self) {
        let Some(watch) = self.hangs.as_mut() else {
            return;
        };
        if watch.last.elapsed() < hang_watch::POLL {
            return;
        }
        watch.last = Instant::now();
        let Some(listed) = (watch.ask)() else {
            return;
        };
        let now = Instant::now();
        for running in &mut self.children {
            let (Kind::Trainer { local_rank }, Some(child)) =
                (running.spec.kind, running.child.as_mut())
            else {
                continue;
            };
            if running
                .listing
                .hung(listed.contains(&local_rank), now, watch.grace)
            {
                tracing::warn!(
                    "{}: the coordinator evicted it for silence over {:?} ago and it never came back; killing it as hung",
                    running.spec.name,
                    watch.grace
                );
                signal(child, libc::SIGKILL);
            }
        }
    }

    fn trainer_finished(&self) -> bool {
        self.children
            .iter()
            .any(|r| r.finished && matches!(r.spec.kind, Kind::Trainer { .. }))
    }

    /// SIGTERM to every trainer, then waits for them (SIGKILL after [`TRAINER_GRACE`]);
    /// then the same for the services.
    fn stop_all(&mut self) {
        for kind_is_trainer in [true, false] {
            let group: Vec<&mut Child> = self
                .children
                .iter_mut()
                .filter(|r| matches!(r.spec.kind, Kind::Trainer { .. }) == kind_is_trainer)
                .filter_map(|r| r.child.as_mut())
                .collect();
            let grace = match kind_is_trainer {
                true => TRAINER_GRACE,
                false => SERVICE_GRACE,
            };
            terminate_all(group, grace);
        }
    }
}

/// Starts `lillm ARGS` (this same executable), killed if the supervisor dies so that no
/// child outlives its node.
fn spawn(spec: &Spec, first: bool) -> Result<Child, GaveUp> {
    let exe = std::env::current_exe().map_err(|source| GaveUp::Spawn {
        name: spec.name.clone(),
        source,
    })?;
    let mut cmd = Command::new(exe);
    cmd.args(&spec.args);
    if first {
        cmd.args(&spec.first_start_args);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    if let Some(path) = &spec.log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| GaveUp::Spawn {
                name: format!("{} (log {})", spec.name, path.display()),
                source,
            })?;
        cmd.stderr(file);
    }
    // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| GaveUp::Spawn {
        name: spec.name.clone(),
        source,
    })
}

/// "exit status 1" or "killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by {}", signal_name(signal)),
        _ => status.to_string(),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGINT => "SIGINT".into(),
        other => format!("signal {other}"),
    }
}

/// Sends `signal` to a child that has not been reaped.
pub fn signal(child: &mut Child, signal: i32) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped (try_wait
        // just saw it running), so the pid cannot name another process.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }
}

/// SIGTERM to all, then SIGKILL to those still running after `grace`.
fn terminate_all(mut children: Vec<&mut Child>, grace: Duration) {
    for child in children.iter_mut() {
        signal(child, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|c| c.try_wait().ok().flatten().is_none())
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    for child in children {
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_described_by_code_or_signal() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit status 1");
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by SIGKILL"
        );
    }

    #[test]
    fn only_a_refusal_is_passed_on_as_do_not_retry() {
        let fatal = GaveUp::Fatal {
            name: "trainer 0".into(),
            status: "exit status 78".into(),
        };
        let exhausted = GaveUp::Exhausted {
            name: "trainer 0".into(),
            status: "killed by SIGKILL".into(),
            max_restarts: 3,
        };
        assert_eq!(fatal.exit_code(), EXIT_FATAL);
        assert_eq!(exhausted.exit_code(), 1);
        assert!(exhausted.to_string().contains("--max-restarts"));
    }
}
