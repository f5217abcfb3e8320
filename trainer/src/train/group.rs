//! A run as one rank of a data-parallel group: joining the group, moving into a new one
//! in place after a failure (every rank then holds the most advanced state), and what the
//! ranks agree on while they train (a log window's figures, a stop, an evaluation's
//! losses). A failed collective ends the group, not the run.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::Trainer;
use crate::config::TrainConfig;
use crate::data::TrainData;
use crate::dist::{ProcessGroup, Rendezvous};
use crate::log_window::LogWindow;
use crate::metrics::Record;
use crate::report::Reporter;
use crate::stop::{Stop, StopReason};
use crate::{Error, Result};

/// The data-parallel group the run joins: the job's (`given`), else the one `cfg` names;
/// `None` for a run of its own.
pub(super) fn join_group(
    cfg: &TrainConfig,
    given: Option<Rendezvous>,
    device: Device,
    stop: &Stop,
) -> Result<Option<ProcessGroup>> {
    let rendezvous = match given {
        Some(r) => Some(r),
        None => cfg.rendezvous()?,
    };
    rendezvous.map(|r| join(&r, device, stop)).transpose()
}

/// Joins the group at `rendezvous` with `device`'s backend, giving up when `stop` asks for a
/// regroup.
fn join(rendezvous: &Rendezvous, device: Device, stop: &Stop) -> Result<ProcessGroup> {
    let backend = crate::dist::Backend::for_device(device);
    Ok(ProcessGroup::join_unless(rendezvous, backend, || {
        stop.regrouping()
    })?)
}

/// A new generation's wiring for a run that stays in its process ([`Trainer::regroup`]).
pub struct Rewire {
    pub rank: usize,
    pub world_size: usize,
    /// The new group's data (a stream of this rank's share); `None` keeps the data the run
    /// reads itself, which serves any rank.
    pub data: Option<TrainData>,
    pub rendezvous: Rendezvous,
    pub reporter: Arc<dyn Reporter>,
    pub generation: u64,
    pub stop: Stop,
    pub writes_checkpoints: bool,
}

impl Trainer {
    /// Moves this run into a new generation's group without leaving the process: the
    /// survivors of a failure keep their weights, optimizer state and step, and a new or
    /// restarted member receives them (see [`Self::sync_state`]), so the job goes on from
    /// the last step the survivors completed instead of the last checkpoint.
    pub fn regroup(&mut self, wiring: Rewire) -> Result<()> {
        // The old group first: its connections and threads go (unless a collective was given
        // up in flight, see `dist`).
        self.group = None;
        // Finished when the run stopped; the next checkpoint starts a writer that reports
        // to the new membership.
        self.writer = None;
        // A step cut short by the failure leaves partial gradients behind.
        self.opt.zero_grad()?;
        self.cfg.process.rank = wiring.rank;
        self.cfg.process.world_size = wiring.world_size;
        self.cfg.validate()?;
        if let Some(data) = wiring.data {
            if let Some(dir) = data.tokenizer_dir() {
                self.tokenizer_dir = Some(dir);
            }
            self.data = data;
        }
        self.reporter = wiring.reporter;
        self.generation = wiring.generation;
        self.stop = wiring.stop;
        self.writes_checkpoints = wiring.writes_checkpoints;
        let group = join(&wiring.rendezvous, self.device, &self.stop)?;
        self.stop.abort_on_regroup(group.abort_handle());
        self.sync_state(&group, true)?;
        self.group = Some(group);
        Ok(())
    }

    /// Makes every rank of a new group hold one state: the most advanced any rank has. Each
    /// rank says which step its state is at (or that it has none); the lowest rank at the
    /// highest step sends its weights, optimizer state and counters to all. A new job (all
    /// at step 0) and a resume (only rank 0 read the checkpoint) are sent from rank 0; a
    /// group re-formed after a failure from a survivor.
    pub(super) fn sync_state(&mut self, group: &ProcessGroup, has_state: bool) -> Result<()> {
        let _guard = tch::no_grad_guard();
        // Each rank's step in its own slot, then every rank's vote on the log window in
        // progress (summed): one all-reduce says where the state is and whether the window
        // goes on.
        let world = group.world_size;
        let mut steps = Tensor::zeros([world as i64], (Kind::Double, self.device));
        let mine = if has_state { self.step as f64 } else { -1.0 };
        let _ = steps.get(group.rank as i64).fill_(mine);
        group.all_reduce_sum(&mut steps)?;
        let steps = Vec::<f64>::try_from(&steps.to_device(Device::Cpu))?;
        let source =
            (0..steps.len()).fold(0, |best, r| if steps[r] > steps[best] { r } else { best });
        if steps[source] < 0.0 {
            return Err(Error::Collective(
                "no rank of the new group holds a state to start from".into(),
            ));
        }
        // The log window in progress goes on when every rank holds the same one (all
        // regrouped in place, at the same size): its record is then the one a run without
        // the regroup logs. Every path into a group runs this collective.
        let start = steps[source] as u64;
        let vote = match has_state {
            true => self.window.vote(start, world),
            false => [0.0; 5],
        };
        let mut votes = Tensor::from_slice(&vote).to_device(self.device);
        group.all_reduce_sum(&mut votes)?;
        let window_shared =
            LogWindow::agreed(&Vec::<f64>::try_from(&votes.to_device(Device::Cpu))?, world);
        group.broadcast_params(self.opt.params(), source)?;
        let mut state = self.opt.state_tensors();
        for t in state.values_mut() {
            // Collectives run on the parameters' device (NCCL has no host tensors).
            let mut on_device = t.to_device(self.device);
            group.broadcast(&mut on_device, source)?;
            if t.device() != self.device {
                *t = on_device.to_device(t.device());
            }
        }
        self.opt.load_state_tensors(&state, &self.cfg.process.out)?;
        let mut counters = vec![
            self.step as f64,
            self.tokens_seen as f64,
            self.best_val.unwrap_or(f64::NAN),
            f64::from(u8::from(self.evaluated_at_step)),
        ];
        counters.extend(window_to_floats(self.last_window.as_ref()));
        let mut header = Tensor::from_slice(&counters).to_device(self.device);
        group.broadcast(&mut header, source)?;
        let header = Vec::<f64>::try_from(&header.to_device(Device::Cpu))?;
        self.step = header[0] as u64;
        self.tokens_seen = header[1] as u64;
        self.best_val = (!header[2].is_nan()).then_some(header[2]);
        self.evaluated_at_step = header[3] > 0.0;
        self.last_window = window_from_floats(&header[4..]);
        self.window.settle(self.step, world, window_shared);
        tracing::info!(
            step = self.step,
            from_rank = source,
            "the group starts from the state of step {} (rank {source} had it)",
            self.step
        );
        Ok(())
    }

    /// A stop this rank can act on alone, before the next step: any stop of a run without
    /// a group, and a regroup (the group is broken, no collective can agree on anything). A
    /// shutdown in a group waits for the ranks to agree on the step ([`Self::reduce_window`]).
    pub(super) fn stop_alone(&self) -> Option<StopReason> {
        match (self.stop.reason(), &self.group) {
            (reason, None) => reason,
            (reason @ Some(StopReason::Regroup { .. }), Some(_)) => reason,
            (_, Some(_)) => None,
        }
    }

    /// The figures of a log window ([`crate::loss::Scored::add_to`], summed over its steps) averaged over all
    /// ranks, whether the group stops after this step and whether a timed checkpoint is due
    /// (`checkpoint_wish`: rank 0's clock says so), in one all-reduce read back in the log
    /// interval's only host sync: a shutdown asked of any rank stops every rank at the same
    /// step, the others with [`StopReason::PeerShutdown`]. So a job stops within
    /// `log_interval` steps.
    pub(super) fn reduce_window(
        &self,
        figures: &Tensor,
        checkpoint_wish: bool,
    ) -> Result<(Vec<f64>, Option<StopReason>, bool)> {
        let Some(group) = &self.group else {
            return Ok((
                Vec::<f64>::try_from(&figures.to_device(Device::Cpu))?,
                None,
                false,
            ));
        };
        let local = self.stop.reason();
        let flag = |on: bool| Tensor::from(f32::from(u8::from(on))).to_device(self.device);
        let mut sums = Tensor::cat(
            &[
                figures.to_kind(Kind::Float),
                flag(local.is_some()).view([1]),
                flag(checkpoint_wish).view([1]),
            ],
            0,
        );
        self.collective(group.all_reduce_sum(&mut sums))?;
        // One copy to the host for all values (the means in f32, as the tensor would be).
        let sums = Vec::<f32>::try_from(&sums.to_device(Device::Cpu))?;
        let n = figures.size()[0] as usize;
        let means = sums[..n]
            .iter()
            .map(|&v| f64::from(v / self.cfg.process.world_size as f32))
            .collect();
        let stop = (sums[n] > 0.0).then_some(local.unwrap_or(StopReason::PeerShutdown));
        Ok((means, stop, sums[n + 1] > 0.0))
    }

    /// Rank 0's (train, val) losses of an evaluation, on every rank (`mine`: this rank's,
    /// `Some` on rank 0).
    pub(super) fn share_evaluation(&self, mine: Option<(f64, f64)>) -> Result<(f64, f64)> {
        let Some(group) = &self.group else {
            return mine.ok_or_else(|| Error::Config("only rank 0 evaluates".into()));
        };
        let (train, val) = mine.unwrap_or_default();
        let mut both = Tensor::from_slice(&[train, val]).to_device(self.device);
        self.collective(group.broadcast(&mut both, 0))?;
        let both = Vec::<f64>::try_from(&both.to_device(Device::Cpu))?;
        Ok((both[0], both[1]))
    }

    /// A failed collective means the group is broken (a peer died or hung up): the loop
    /// regroups instead of failing. The coordinator usually says so within a heartbeat;
    /// if it has not yet noticed (a peer on another machine, found dead only after the
    /// heartbeat timeout), this trainer ends its generation itself — re-registering from
    /// its process ends the generation at the coordinator at once.
    pub(super) fn collective<T>(&self, result: lillm_c10d::Result<T>) -> Result<T> {
        result.map_err(|e| {
            let e = Error::from(e);
            if !matches!(e, Error::Collective(_)) {
                return e;
            }
            match self.stop.wait_for_reason(std::time::Duration::from_secs(2)) {
                Some(StopReason::Shutdown) => e,
                Some(reason) => {
                    tracing::warn!(cause = %e, "a collective failed: the group is gone");
                    Error::Stopped(reason)
                }
                // Ranks wired by hand (no job, generation 0) have no group to re-form.
                None if self.generation == 0 => e,
                None => {
                    tracing::warn!(cause = %e, "a collective failed: leaving the group to re-form it");
                    let reason = StopReason::Regroup {
                        generation: self.generation,
                    };
                    self.stop.request(reason);
                    Error::Stopped(reason)
                }
            }
        })
    }
}

/// A training-step record as floats for a broadcast (NaN for absent values; the first one
/// says whether there is a record at all).
fn window_to_floats(record: Option<&Record>) -> [f64; 11] {
    let or_nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    match record {
        None => [0.0; 11],
        Some(r) => [
            1.0,
            r.step as f64,
            or_nan(r.loss),
            or_nan(r.lr),
            or_nan(r.grad_norm),
            or_nan(r.tokens_per_s),
            or_nan(r.step_ms),
            or_nan(r.mfu),
            r.tokens_seen.map_or(f64::NAN, |t| t as f64),
            or_nan(r.reward_accuracy),
            or_nan(r.reward_margin),
        ],
    }
}

fn window_from_floats(f: &[f64]) -> Option<Record> {
    let some = |v: f64| (!v.is_nan()).then_some(v);
    (f[0] > 0.0).then(|| Record {
        step: f[1] as u64,
        loss: some(f[2]),
        lr: some(f[3]),
        grad_norm: some(f[4]),
        tokens_per_s: some(f[5]),
        step_ms: some(f[6]),
        mfu: some(f[7]),
        tokens_seen: some(f[8]).map(|t| t as u64),
        reward_accuracy: some(f[9]),
        reward_margin: some(f[10]),
        ..Record::default()
    })
}
