//! A micro-batch's forward and backward, and how they run (`step_mode`): launched op by
//! op, or captured once as a CUDA graph and replayed.
//!
//! On a GPU a small model's step is bound by the host: lillm-39m at 32 rows took 59 ms a
//! step where 128 rows took 110, so most of the small step was the host launching a few
//! thousand kernels. A replay launches them all at once.
//!
//! Only the forward and backward are captured. The update (clip, fused AdamW, zeroing: a
//! handful of multi-tensor launches) and the gradient all-reduce stay eager, so that the
//! learning rate, the step count and the group may change from step to step without a new
//! capture. Gradients are accumulated in place into the parameters' `.grad` tensors, which
//! keep their memory from the first step on: the graph adds into the same memory at every
//! replay, whatever the update did in between.
//!
//! A capture is checked before it is trusted: replayed on the batch it was captured with,
//! it must give the warm-up runs' loss and gradients. If it does not, or libtorch refuses to
//! capture, the run says why and goes on with the same steps uncaptured.

use lillm_cuda::CudaGraph;
use lillm_model::{upload, LilLM};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::{batch_tensors, MicroBatch};
use crate::loss::Loss;
use crate::optim::AdamW;
use crate::{Error, Result};

/// Warm-up runs before a capture: libtorch creates its cuBLAS workspaces and picks its
/// kernels on the first calls, which a capture must not contain.
const WARMUPS: usize = 2;

/// How far a replay may stray from its warm-up (bf16 backward kernels accumulate with
/// atomics, so two runs of the same batch may differ in the last bits).
const REPLAY_TOLERANCE: f64 = 1e-3;

/// How the training step's forward and backward run (`step_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepMode {
    /// Graphs on CUDA when the model can be captured, eager elsewhere.
    #[default]
    Auto,
    /// Launched op by op on tensors made for each micro-batch.
    Eager,
    /// The graphs' work — the batch copied into fixed input tensors — launched op by op:
    /// how a machine without a GPU checks it.
    Static,
    /// Captured once as a CUDA graph, replayed at every micro-batch.
    Graphs,
}

impl StepMode {
    /// The mode in the run's banner.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Eager => "eager",
            Self::Static => "static (the CUDA graph's work, uncaptured)",
            Self::Graphs => "graphs (forward and backward replayed as one CUDA graph)",
        }
    }

    /// What runs on `device` for a model whose forward is (or is not) `capturable`
    /// ([`LilLM::is_capturable`]): never `Auto`.
    pub fn resolve(self, device: Device, capturable: bool) -> Result<Self> {
        match self {
            Self::Auto if device.is_cuda() && capturable => Ok(Self::Graphs),
            Self::Auto => Ok(Self::Eager),
            Self::Graphs if !device.is_cuda() => Err(Error::Config(format!(
                "step_mode graphs needs a CUDA device (--device cuda), not {device:?}; use auto, or static to run the graphs' steps uncaptured"
            ))),
            Self::Graphs if !capturable => Err(Error::Config(
                "step_mode graphs: this model's forward reads values back to the host (an MoE \
                 layer outside bf16, or whose sizes are not multiples of 16 bytes), which a CUDA \
                 graph cannot capture; use auto"
                    .into(),
            )),
            other => Ok(other),
        }
    }
}

/// Runs micro-batches as its mode says, holding what a capture needs.
pub(super) struct MicroStep {
    /// Resolved: eager, static or graphs.
    mode: StepMode,
    /// Figures of a micro-batch ([`crate::loss::train_figures`]).
    figures: i64,
    /// The number of micro-batches a step's loss is divided by, on the device (a replay
    /// reads it there, so a regroup that changes it needs no new capture).
    divisor: Tensor,
    divisor_value: usize,
    /// The fixed input tensors (static and graphs), shaped by the first micro-batch.
    inputs: Option<Inputs>,
    captured: Option<Captured>,
    /// Graphs: whether a capture was attempted (it is, once).
    attempted: bool,
    /// What the run should say about the step (a capture, or why it failed).
    notice: Option<String>,
}

/// A micro-batch's tokens, where the captured kernels read them.
struct Inputs {
    x: Tensor,
    y: Tensor,
}

/// A captured forward and backward, and the figures each replay rewrites.
struct Captured {
    graph: CudaGraph,
    figures: Tensor,
}

impl MicroStep {
    /// `mode` resolved ([`StepMode::resolve`]); micro-batches score `figures` figures.
    pub(super) fn new(mode: StepMode, figures: i64, device: Device) -> Self {
        Self {
            mode,
            figures,
            divisor: Tensor::ones([], (Kind::Float, device)),
            divisor_value: 1,
            inputs: None,
            captured: None,
            attempted: false,
            notice: None,
        }
    }

    pub(super) fn mode(&self) -> StepMode {
        self.mode
    }

    /// What the run should say, once: that the step was captured, or why not.
    pub(super) fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// Scores `batch` and accumulates the gradients of its loss divided by `micros` into
    /// the parameters' gradients; returns its figures (undivided, on the device; a replay
    /// rewrites them, so add them up before the next call). Dropout draws from libtorch's
    /// generator seeded with `seed`. `first_of_step`: the gradients are all zero, so that
    /// a capture may check its replay against them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &mut self,
        model: &LilLM,
        loss: &Loss,
        batch: &MicroBatch,
        micros: usize,
        seed: i64,
        first_of_step: bool,
        opt: &mut AdamW,
    ) -> Result<Tensor> {
        if self.divisor_value != micros {
            let _ = self.divisor.fill_(micros as f64);
            self.divisor_value = micros;
        }
        tch::manual_seed(seed);
        let device = self.divisor.device();
        let inputs = match self.mode {
            StepMode::Eager => None,
            _ => Some(
                self.inputs
                    .get_or_insert_with(|| Inputs::shaped_as(batch, device)),
            ),
        };
        // Eager, or a shape other than the fixed inputs' (a shorter last batch of fine-tuning
        // data: not what was captured): tensors made for this micro-batch.
        let Some(inputs) = inputs.filter(|inputs| inputs.fits(batch)) else {
            let (x, y) = batch_tensors(batch, device);
            return Ok(forward_backward(
                model,
                loss,
                &x,
                &y,
                &self.divisor,
                self.figures,
            ));
        };
        inputs.fill(batch);
        if let Some(captured) = &self.captured {
            captured.graph.replay()?;
            return Ok(captured.figures.shallow_clone());
        }
        if self.mode == StepMode::Graphs && first_of_step && !self.attempted {
            self.attempted = true;
            match self.capture(model, loss, seed, opt) {
                Ok(figures) => return Ok(figures),
                Err(reason) => {
                    self.notice = Some(format!(
                        "step: not captured as a CUDA graph ({reason}); running it op by op"
                    ));
                    opt.zero_grad()?;
                    tch::manual_seed(seed);
                }
            }
        }
        let Inputs { x, y } = self.inputs.as_ref().expect("made above");
        Ok(forward_backward(
            model,
            loss,
            x,
            y,
            &self.divisor,
            self.figures,
        ))
    }

    /// Captures the forward and backward of the batch now in the inputs, replays it once
    /// (this micro-batch's real run) and checks the replay against the warm-ups; returns
    /// the replay's figures, or why the graph is not to be used.
    fn capture(
        &mut self,
        model: &LilLM,
        loss: &Loss,
        seed: i64,
        opt: &mut AdamW,
    ) -> std::result::Result<Tensor, String> {
        let Inputs { x, y } = self.inputs.as_ref().expect("filled before a capture");
        let (divisor, figures) = (&self.divisor, self.figures);
        let before = lillm_cuda::cuda_reserved(x.device()).unwrap_or(0);
        let mut warm_loss = None;
        let mut calls = 0;
        let (graph, out) = CudaGraph::capture(x.device(), None, WARMUPS, || {
            // Re-seeded before each warm-up so that both draw this micro-batch's dropout
            // masks; never during the capture (libtorch refuses it), whose replays read
            // the generator's seed when they run.
            if calls < WARMUPS {
                tch::manual_seed(seed);
            }
            let out = forward_backward(model, loss, x, y, divisor, figures);
            if calls == 0 {
                warm_loss = Some(out.get(0).copy());
            }
            calls += 1;
            out
        })
        .map_err(|e| e.to_string())?;
        let read = |t: &Tensor| t.double_value(&[]);
        let grad_norm = |opt: &mut AdamW| opt.clip_grad_norm(0.0).map(|n| read(&n));
        // Both warm-ups added this micro-batch's gradients to zero ones: twice them.
        let warm_norm = grad_norm(opt).map_err(|e| e.to_string())?;
        opt.zero_grad().map_err(|e| e.to_string())?;
        tch::manual_seed(seed);
        graph.replay().map_err(|e| e.to_string())?;
        let replay_norm = grad_norm(opt).map_err(|e| e.to_string())?;
        let warm_loss = read(&warm_loss.expect("a warm-up ran"));
        replay_agrees(warm_loss, read(&out.get(0)), warm_norm, replay_norm)?;
        let bytes = lillm_cuda::cuda_reserved(x.device()).unwrap_or(0);
        self.notice = Some(format!(
            "step: forward and backward captured as a CUDA graph ({:.0} MiB); its replay matched the eager run (loss {warm_loss:.4})",
            bytes.saturating_sub(before) as f64 / (1024.0 * 1024.0)
        ));
        self.captured = Some(Captured {
            graph,
            figures: out.shallow_clone(),
        });
        Ok(out)
    }
}

impl Inputs {
    fn shaped_as(batch: &MicroBatch, device: Device) -> Self {
        let shape = [batch.rows as i64, batch.seq as i64];
        Self {
            x: Tensor::zeros(shape, (Kind::Int64, device)),
            y: Tensor::zeros(shape, (Kind::Int64, device)),
        }
    }

    fn fits(&self, batch: &MicroBatch) -> bool {
        self.x.size() == [batch.rows as i64, batch.seq as i64]
    }

    /// Copies `batch` in, where the captured kernels read it, without waiting for the
    /// step before to finish on the device.
    fn fill(&mut self, batch: &MicroBatch) {
        let shape = [batch.rows as i64, batch.seq as i64];
        let device = self.x.device();
        self.x.copy_(&upload(&batch.inputs, device).view(shape));
        self.y.copy_(&upload(&batch.targets, device).view(shape));
    }
}

/// The work of a micro-batch, the same captured or not: its score, the backward of its
/// objective divided by `divisor`, and its figures (undivided) in a new tensor.
fn forward_backward(
    model: &LilLM,
    loss: &Loss,
    x: &Tensor,
    y: &Tensor,
    divisor: &Tensor,
    figures: i64,
) -> Tensor {
    let scored = loss.score(model, x, y, true);
    (&scored.objective / divisor).backward();
    let out = Tensor::zeros([figures], (Kind::Float, x.device()));
    scored.add_to(&out, 1.0);
    out
}

/// Whether a first replay did what its warm-ups did on the same batch: the same loss, and
/// half the gradient norm (each warm-up added the batch's gradients, the replay once).
fn replay_agrees(
    warm_loss: f64,
    replay_loss: f64,
    warm_norm: f64,
    replay_norm: f64,
) -> std::result::Result<(), String> {
    let close = |a: f64, b: f64| (a - b).abs() <= REPLAY_TOLERANCE * a.abs().max(b.abs());
    if !(warm_loss.is_finite() && replay_loss.is_finite() && close(warm_loss, replay_loss)) {
        return Err(format!(
            "its replay's loss {replay_loss} differs from the eager run's {warm_loss}"
        ));
    }
    if !(warm_norm.is_finite() && replay_norm > 0.0 && close(warm_norm, 2.0 * replay_norm)) {
        return Err(format!(
            "its replay's gradient norm {replay_norm} is not the eager run's {}",
            warm_norm / 2.0
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_captures_on_cuda_only_what_can_be_captured() {
        let cuda = Device::Cuda(0);
        assert_eq!(
            StepMode::Auto.resolve(cuda, true).unwrap(),
            StepMode::Graphs
        );
        assert_eq!(
            StepMode::Auto.resolve(cuda, false).unwrap(),
            StepMode::Eager
        );
        assert_eq!(
            StepMode::Auto.resolve(Device::Cpu, true).unwrap(),
            StepMode::Eager
        );
        assert_eq!(
            StepMode::Static.resolve(Device::Cpu, false).unwrap(),
            StepMode::Static
        );
        let err = StepMode::Graphs
            .resolve(Device::Cpu, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CUDA device") && err.contains("static"),
            "{err}"
        );
        let err = StepMode::Graphs
            .resolve(cuda, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("MoE"), "{err}");
    }

    #[test]
    fn a_replay_is_trusted_only_when_it_repeats_the_warm_up() {
        // The same loss, half the accumulated norm, within the tolerance.
        assert!(replay_agrees(2.5, 2.5 * (1.0 + 1e-5), 4.0, 2.0).is_ok());
        // Another loss: the graph read stale inputs or weights.
        let err = replay_agrees(2.5, 2.6, 4.0, 2.0).unwrap_err();
        assert!(err.contains("loss 2.6") && err.contains("2.5"), "{err}");
        // No gradients from the replay, or the warm-up's at full size: backward was not captured
        // into the parameters' gradients.
        assert!(replay_agrees(2.5, 2.5, 4.0, 0.0).is_err());
        assert!(replay_agrees(2.5, 2.5, 4.0, 4.0).is_err());
        // Not a number is never agreement.
        assert!(replay_agrees(f64::NAN, f64::NAN, 4.0, 2.0).is_err());
        assert!(replay_agrees(2.5, 2.5, f64::NAN, f64::NAN).is_err());
    }
}
