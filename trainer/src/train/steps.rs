//! The training loop: evaluate, checkpoint, step and log until `max_iters` or a stop. Each
//! part is a method of its own; what the loop decides (when to evaluate, checkpoint, check
//! parameters, what a log record holds, whether the end needs a checkpoint) is a pure
//! function, in `cadence.rs` and below, tested on hand-built values.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use lillm_data::epochs::epochs_done;
use lillm_data::manifest::Split;
use lillm_data::shards::BatchKey;
use lillm_model::ModelConfig;
use tch::{Kind, Tensor};

use super::{dropout_seed, precision, TrainSummary, Trainer, GRADIENT_BUCKET_BYTES};
use crate::cadence::{final_checkpoint_due, reopen_log, timed_checkpoint_due, Cadence};
use crate::checkpoint;
use crate::checkpoint_actor::Publish;
use crate::data::Draw;
use crate::loss::record_routing;
use crate::metrics::{MetricsLog, Record};
use crate::schedule::LrSchedule as Schedule;
use crate::stop::StopReason;
use crate::{flops, plot, Error, Result};

/// What a run's steps share, fixed when the loop starts.
struct Plan {
    cadence: Cadence,
    schedule: Schedule,
    leader: bool,
    /// Micro-batches this rank computes per step.
    local_micros: usize,
    tokens_per_step: u64,
    flops_per_step: f64,
    /// The device's peak FLOP/s, when known (for MFU).
    peak: Option<f64>,
    /// With the exactly-once order: sequences per epoch, and per step.
    epoch_sequences: Option<u64>,
    sequences_per_step: u64,
    model_cfg: ModelConfig,
}

/// What the loop carries from one step to the next besides the trainer's own state.
struct Progress {
    last_val: Option<f64>,
    last_ckpt: Option<PathBuf>,
    last_save: Instant,
    /// In a group: rank 0's clock said a timed checkpoint is due (see `reduce_window`).
    time_due: bool,
    started_at: u64,
    stopped: Option<StopReason>,
}

/// A closed log window: the figures averaged over ranks, what the group agreed on, and the
/// last step's learning rate and gradient norm.
struct Window {
    figures: Vec<f64>,
    stop: Option<StopReason>,
    checkpoint_due: bool,
    lr: f64,
    grad_norm: Tensor,
}

/// Where a log window ends: its last step and the figures of the run there.
struct WindowEnd {
    step: u64,
    tokens_seen: u64,
    lr: f64,
    grad_norm: f64,
    secs_per_step: f64,
    /// The window's peak GPU memory in bytes (CUDA only).
    peak_memory: Option<u64>,
}

/// The progress bar, or stderr when there is none.
struct Console {
    bar: ProgressBar,
    interactive: bool,
}

impl Console {
    fn new(interactive: bool, max_iters: u64, step: u64) -> Self {
        let bar = match interactive {
            true => ProgressBar::new(max_iters),
            false => ProgressBar::hidden(),
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(step);
        Self { bar, interactive }
    }

    fn say(&self, line: String) {
        match self.interactive {
            true => self.bar.println(line),
            false => eprintln!("{line}"),
        }
    }
}

/// The training-step record of a log window ending at `end`: `means` are the window's
/// figures averaged over its steps (loss first; DPO's reward accuracy and margin next).
fn window_record(plan: &Plan, end: &WindowEnd, means: &[f64], preference: bool) -> Record {
    let secs = end.secs_per_step;
    let mut record = Record {
        step: end.step,
        loss: Some(means[0]),
        lr: Some(end.lr),
        grad_norm: Some(end.grad_norm),
        tokens_per_s: Some(plan.tokens_per_step as f64 / secs),
        step_ms: Some(secs * 1e3),
        mfu: plan.peak.map(|p| plan.flops_per_step / secs / p),
        tokens_seen: Some(end.tokens_seen),
        peak_gpu_gib: end.peak_memory.map(|b| b as f64 / (1u64 << 30) as f64),
        epochs: plan
            .epoch_sequences
            .map(|n| epochs_done(n, end.step * plan.sequences_per_step)),
        reward_accuracy: preference.then(|| means[1]),
        reward_margin: preference.then(|| means[2]),
        ..Record::default()
    };
    record_routing(&plan.model_cfg, means, &mut record);
    record
}

impl Trainer {
    pub(super) fn run_steps(&mut self, interactive: bool) -> Result<TrainSummary> {
        self.check_runnable()?;
        let plan = self.plan();
        let mut log = self.open_log()?;
        let console = Console::new(interactive, plan.cadence.max_iters, self.step);
        if plan.leader {
            for line in self.describe(&plan) {
                console.say(line);
            }
        }
        if !self
            .window
            .continues(self.step, self.cfg.process.world_size)
        {
            self.window.restart(self.step, self.cfg.process.world_size);
        }
        let mut progress = Progress {
            last_val: None,
            last_ckpt: None,
            last_save: Instant::now(),
            time_due: false,
            started_at: self.step,
            stopped: None,
        };
        loop {
            if let Some(reason) = self.stop_alone() {
                progress.stopped = Some(reason);
                break;
            }
            if plan.cadence.evaluates(self.step, self.evaluated_at_step) {
                self.evaluate_now(&plan, &mut progress, log.as_mut(), &console)?;
            }
            self.interim_checkpoint(&plan, &mut progress)?;
            if self.step >= plan.cadence.max_iters {
                break;
            }
            if plan.cadence.checks_params(self.step) {
                if let Some(group) = &self.group {
                    self.collective(group.check_params_agree(self.opt.params(), self.step))?;
                }
            }
            let lr = plan.schedule.at(self.step);
            self.profile.before_step(self.step)?;
            let window = self.step_once(&plan, lr, &progress)?;
            if let Some(notice) = self.micro.take_notice().filter(|_| plan.leader) {
                console.say(notice);
            }
            let last = self.step >= plan.cadence.max_iters;
            if let Some(table) = self.profile.after_step(self.step, last)? {
                if plan.leader {
                    console.say(table);
                }
            }
            console.bar.set_position(self.step);
            if let Some(window) = window {
                self.close_window(&plan, window, &mut progress, log.as_mut(), &console)?;
                if progress.stopped.is_some() {
                    break;
                }
            }
        }
        console.bar.finish_and_clear();
        self.finish(&plan, progress, &console)
    }

    fn check_runnable(&self) -> Result<()> {
        let out = &self.cfg.process.out;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        if !self.data.has_val() {
            return Err(Error::Config(format!(
                "{} has no validation split; prepare it with a validation fraction > 0",
                self.cfg.process.data.display()
            )));
        }
        Ok(())
    }

    fn plan(&self) -> Plan {
        let job = &self.cfg.job;
        let tokens_per_step = (job.batch_size * self.seq * job.grad_accum) as u64;
        Plan {
            cadence: Cadence::of(job),
            schedule: job.schedule(),
            leader: self.cfg.process.rank == 0,
            // Each rank takes its share of the step's micro-batches: rank r does micro-batches
            // r·local .. (r+1)·local, so the union over ranks is the single-process step.
            local_micros: job.grad_accum / self.cfg.process.world_size,
            tokens_per_step,
            flops_per_step: self.model_cfg.train_flops_per_token(self.seq) * tokens_per_step as f64,
            peak: flops::peak_flops(job.peak_tflops, self.device),
            epoch_sequences: self.epoch_sequences(),
            // Every step reads `grad_accum × batch_size` sequences of the epoch order.
            sequences_per_step: (job.grad_accum * job.batch_size) as u64,
            model_cfg: self.model_cfg.clone(),
        }
    }

    /// Rank 0's metrics log, with the record of the step the group starts from if the rank 0
    /// that computed it died before logging it.
    fn open_log(&self) -> Result<Option<MetricsLog>> {
        if self.cfg.process.rank != 0 {
            return Ok(None);
        }
        let reopen = reopen_log(self.step, self.evaluated_at_step, self.generation);
        let mut log = MetricsLog::open(&self.cfg.process.out, reopen)?;
        if let Some(record) = self.last_window.as_ref().filter(|r| r.step == self.step) {
            // Skipped if the log has it.
            log.append(record)?;
        }
        Ok(Some(log))
    }

    /// What rank 0 says about the run when it starts.
    fn describe(&self, plan: &Plan) -> [String; 2] {
        let trained = match &self.lora_base {
            None => "all weights".to_string(),
            Some(l) => format!(
                "LoRA rank {} (alpha {}) on {} over the frozen base {}",
                l.config.rank,
                l.config.alpha,
                l.config.targets.join(", "),
                l.base.display()
            ),
        };
        [
            format!(
                "training {} parameters ({trained}); optimizer state {:.2} MiB",
                self.opt.trained_numel(),
                self.opt.state_bytes() as f64 / (1024.0 * 1024.0)
            ),
            format!(
                "model: {} ({} layers, d_model {}); {} tokens per step; device {:?}; {}; step {}; data: {}",
                self.model_cfg.size_summary(),
                self.model_cfg.n_layers,
                self.model_cfg.d_model,
                plan.tokens_per_step,
                self.device,
                precision(&self.cfg.job.dtype, self.model.compute_kind(), self.device),
                self.micro.mode().describe(),
                self.data.describe()
            ),
        ]
    }

    /// Rank 0 evaluates; every rank learns the losses, so that both checkpoint writers save
    /// the same state; the writers checkpoint it.
    fn evaluate_now(
        &mut self,
        plan: &Plan,
        progress: &mut Progress,
        log: Option<&mut MetricsLog>,
        console: &Console,
    ) -> Result<()> {
        let mine = match log {
            Some(log) => Some(self.evaluate(log)?),
            None => None,
        };
        let (train, val) = self.share_evaluation(mine)?;
        progress.last_val = Some(val);
        self.best_val = Some(self.best_val.map_or(val, |b: f64| b.min(val)));
        self.evaluated_at_step = true;
        if plan.leader {
            console.say(format!(
                "step {:>6}: train loss {train:.4}, val loss {val:.4}",
                self.step
            ));
        }
        if self.step > 0 && self.writes_checkpoints {
            progress.last_ckpt = Some(self.save_checkpoint(Some(val))?);
            progress.last_save = Instant::now();
        }
        self.window.restart_clock();
        Ok(())
    }

    fn saved_at_this_step(&self, progress: &Progress) -> bool {
        let here = checkpoint::checkpoint_dir(&self.cfg.process.out, self.step);
        progress.last_ckpt.as_ref() == Some(&here)
    }

    /// Checkpoints apart from evaluations, by steps or by time (by rank 0's clock, shared
    /// at log intervals, so both writers save the same steps): a snapshot to host memory,
    /// written by the checkpoint actor.
    fn interim_checkpoint(&mut self, plan: &Plan, progress: &mut Progress) -> Result<()> {
        let by_time = match self.group {
            Some(_) => std::mem::take(&mut progress.time_due),
            None => self.timed_checkpoint_wish(progress),
        };
        let due = plan.cadence.interim_checkpoint(
            self.step,
            progress.started_at,
            self.saved_at_this_step(progress),
            by_time,
        );
        if self.writes_checkpoints && due {
            progress.last_ckpt = Some(self.save_checkpoint(None)?);
            progress.last_save = Instant::now();
        }
        Ok(())
    }

    fn timed_checkpoint_wish(&self, progress: &Progress) -> bool {
        timed_checkpoint_due(
            self.cfg.job.checkpoint_minutes,
            progress.last_save.elapsed().as_secs_f64(),
        )
    }

    /// One optimizer step: this rank's micro-batches, the gradient all-reduce and, at the
    /// end of a log window, the window's reduction — every collective before the update, so
    /// a failure in any leaves every survivor at the last completed (and logged) step.
    /// Returns the window this step closed, if any.
    fn step_once(&mut self, plan: &Plan, lr: f64, progress: &Progress) -> Result<Option<Window>> {
        let job = &self.cfg.job;
        let local = plan.local_micros;
        // This step's figures join the window once its collectives succeeded: a step a
        // failure cuts short is done again and must not count twice (they are held, for a
        // new group that starts from a peer that did complete it).
        let next = self.step + 1;
        let mut step_figures = self.window.begin_step(next);
        for m in 0..local {
            let key = BatchKey {
                seed: job.seed,
                split: Split::Train,
                step: self.step,
                micro: (self.cfg.process.rank * local + m) as u64,
            };
            let draw = Draw::Train {
                micros_per_step: job.grad_accum as u64,
                order: job.data_order,
            };
            let batch = self.data.batch(key, draw, job.batch_size, self.seq)?;
            // Dropout draws from libtorch's generator: seeded per micro-batch, so a resume
            // replays it and any number of ranks draws the single process's masks.
            let seed = dropout_seed(job.seed, key.step, key.micro);
            let figures = self.micro.run(
                &self.model,
                &self.loss,
                &batch,
                local,
                seed,
                m == 0,
                &mut self.opt,
            )?;
            let _ = step_figures.g_add_(&(figures * (1.0 / local as f64)));
        }
        if let Some(group) = &self.group {
            self.collective(group.average_gradients(self.opt.params(), GRADIENT_BUCKET_BYTES))?;
        }
        let closed = match plan.cadence.logs_at(next) {
            // The only host sync of the step, once per log interval.
            true => {
                let wish = plan.leader && self.timed_checkpoint_wish(progress);
                Some(self.reduce_window(&self.window.sums_with_held(), wish)?)
            }
            false => None,
        };
        let grad_norm = self.opt.clip_grad_norm(job.grad_clip)?;
        self.opt.step(lr)?;
        self.opt.zero_grad()?;
        self.step = next;
        self.tokens_seen += plan.tokens_per_step;
        self.evaluated_at_step = false;
        self.window.add_held();
        Ok(closed.map(|(figures, stop, checkpoint_due)| Window {
            figures,
            stop,
            checkpoint_due,
            lr,
            grad_norm,
        }))
    }

    /// Logs a closed window's record and takes what the group agreed on (a stop, a timed
    /// checkpoint).
    fn close_window(
        &mut self,
        plan: &Plan,
        window: Window,
        progress: &mut Progress,
        log: Option<&mut MetricsLog>,
        console: &Console,
    ) -> Result<()> {
        progress.stopped = window.stop;
        progress.time_due = window.checkpoint_due;
        let steps = self.window.steps() as f64;
        let means: Vec<f64> = window.figures.iter().map(|f| f / steps).collect();
        let end = WindowEnd {
            step: self.step,
            tokens_seen: self.tokens_seen,
            lr: window.lr,
            grad_norm: window.grad_norm.double_value(&[]),
            secs_per_step: self.window.seconds_per_step(),
            peak_memory: crate::dist::cuda_peak_allocated(self.device),
        };
        self.peak_gpu_bytes = self.peak_gpu_bytes.max(end.peak_memory);
        let record = window_record(plan, &end, &means, self.loss.is_preference());
        if let Some(log) = log {
            log.append(&record)?;
        }
        self.reporter.progress(&record);
        console.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s{}{}",
            means[0],
            window.lr,
            record.tokens_per_s.unwrap_or_default(),
            record
                .mfu
                .map_or(String::new(), |m| format!(" mfu {:.1}%", m * 100.0)),
            record
                .peak_gpu_gib
                .map_or(String::new(), |g| format!(" peak {g:.1} GiB"))
        ));
        self.last_window = Some(record);
        self.window.restart(self.step, self.cfg.process.world_size);
        Ok(())
    }

    /// After the loop: the last step is checkpointed unless it just was (also when stopping
    /// early, so a resume continues with the very next batch); in a group nobody leaves
    /// before that checkpoint is committed.
    fn finish(
        &mut self,
        plan: &Plan,
        progress: Progress,
        console: &Console,
    ) -> Result<TrainSummary> {
        let stopped = progress.stopped;
        if let Some(reason @ StopReason::Regroup { .. }) = stopped {
            // The group is gone; what rank 0 has written is flushed, nothing new is saved
            // (the coordinator would refuse to commit it).
            if let Some(writer) = self.writer.as_mut() {
                writer.finish()?;
            }
            return Err(Error::Stopped(reason));
        }
        if stopped.is_some() && plan.leader {
            console.say(format!(
                "stopping at step {} as asked: checkpointing it first",
                self.step
            ));
        }
        let saved_here = self.saved_at_this_step(&progress);
        let last_checkpoint = if final_checkpoint_due(
            saved_here,
            self.writes_checkpoints,
            self.step,
            stopped.is_some(),
        ) {
            let val = progress.last_val.filter(|_| self.evaluated_at_step);
            self.save_checkpoint(val)?
        } else {
            progress
                .last_ckpt
                .unwrap_or_else(|| checkpoint::checkpoint_dir(&self.cfg.process.out, self.step))
        };
        if let Some(writer) = self.writer.as_mut() {
            writer.finish()?;
        }
        if let (Some(_), Some(group)) = (stopped, &self.group) {
            // A member leaving ends the generation, after which the commit would be refused.
            self.reporter.flush()?;
            let mut barrier = Tensor::zeros([], (Kind::Float, self.device));
            self.collective(group.all_reduce_sum(&mut barrier))?;
        }
        let mut summary = self.summary(progress.last_val, Some(last_checkpoint), stopped);
        let out = &self.cfg.process.out;
        summary.plot = plan.leader.then(|| plot::plot_run(out).ok()).flatten();
        if let (true, Some(bucket)) = (plan.leader, self.cfg.process.run_bucket()?) {
            // The log's records after the last checkpoint, and the plot.
            Publish { bucket }.upload_run_files()?;
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(epoch_sequences: Option<u64>, peak: Option<f64>) -> Plan {
        Plan {
            cadence: Cadence {
                max_iters: 100,
                eval_interval: 10,
                log_interval: 5,
                checkpoint_interval: 0,
                check_params_every: 0,
            },
            schedule: crate::config::JobConfig::default().schedule(),
            leader: true,
            local_micros: 2,
            tokens_per_step: 4096,
            flops_per_step: 1e12,
            peak,
            epoch_sequences,
            sequences_per_step: 64,
            model_cfg: ModelConfig::preset("tiny").unwrap(),
        }
    }

    #[test]
    fn a_window_record_holds_the_rates_and_the_epoch_fraction() {
        // 0.5 s per step: 8192 tokens/s; 1e12 FLOP per step on a 4e12 FLOP/s device: 50%.
        let end = WindowEnd {
            step: 15,
            tokens_seen: 61_440,
            lr: 3e-4,
            grad_norm: 1.5,
            secs_per_step: 0.5,
            peak_memory: Some(3 << 29),
        };
        let r = window_record(&plan(Some(640), Some(4e12)), &end, &[2.25], false);
        assert_eq!(
            (r.step, r.loss, r.lr, r.grad_norm),
            (15, Some(2.25), Some(3e-4), Some(1.5))
        );
        assert_eq!(r.tokens_per_s, Some(8192.0));
        assert_eq!(r.step_ms, Some(500.0));
        assert_eq!(r.mfu, Some(0.5));
        assert_eq!(r.tokens_seen, Some(61_440));
        // 15 steps × 64 sequences of a 640-sequence epoch: 1.5 epochs.
        assert_eq!(r.epochs, Some(1.5));
        assert_eq!(r.peak_gpu_gib, Some(1.5));
        assert_eq!((r.reward_accuracy, r.reward_margin), (None, None));
    }

    #[test]
    fn a_preference_record_carries_the_reward_figures_and_unknowns_stay_out() {
        let end = WindowEnd {
            step: 5,
            tokens_seen: 0,
            lr: 1e-4,
            grad_norm: 0.1,
            secs_per_step: 1.0,
            peak_memory: None,
        };
        let r = window_record(&plan(None, None), &end, &[0.69, 0.75, 0.3], true);
        assert_eq!(
            (r.reward_accuracy, r.reward_margin),
            (Some(0.75), Some(0.3))
        );
        assert_eq!((r.mfu, r.epochs), (None, None), "no peak, random windows");
    }
}
