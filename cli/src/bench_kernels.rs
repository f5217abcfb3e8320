//! `lillm bench kernels`: the fused implementation of the model's layers (RMSNorm, and RoPE
//! and the SwiGLU product on CUDA) against the reference ([`Kernels`]) on one batch with the same
//! weights — how far apart their logits and gradients are, and what a training forward and
//! backward costs with each: all layers fused, and each fused alone, so that what each
//! kernel gives is measured rather than guessed; and the output head's loss alone, chunked
//! ([`LilLM::chunked_cross_entropy`]) against the full logits. The GPU harness
//! (`bench/gpu.sh`) holds the fused form to bf16 tolerance on the device, where it is the
//! default; on a CPU the two differ by nothing or a rounding.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use lillm_model::{relative_diff, Kernels, LilLM, ModelConfig};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The model a benchmark builds (random weights: a step's cost does not depend on their
/// values), where, and in which kind.
#[derive(Args, Debug, Clone)]
pub struct BenchModel {
    /// Model preset.
    #[arg(long, default_value = "lillm-39m")]
    pub preset: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (bf16 on CUDA, float32 on a CPU), float32 or bfloat16.
    #[arg(long, default_value = "auto")]
    dtype: String,
}

impl BenchModel {
    /// The device and compute kind (`auto`: bf16 on CUDA, float32 on a CPU, as inference
    /// chooses).
    pub(crate) fn device_and_kind(&self) -> Result<(Device, Kind)> {
        let device = lillm_model::parse_device(&self.device)?;
        Ok((device, lillm_serve::inference_kind(&self.dtype, device)?))
    }
}

#[derive(Args, Debug, Clone)]
pub struct KernelsBenchArgs {
    #[command(flatten)]
    model: BenchModel,
    /// Rows of the batch.
    #[arg(long, default_value_t = 8)]
    rows: usize,
    /// Positions per row (at most the preset's context).
    #[arg(long, default_value_t = 512)]
    block: usize,
    /// Timed forward and backward passes of each implementation (after two untimed ones).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

/// One implementation's results on the batch.
struct Pass {
    logits: Tensor,
    grads: BTreeMap<String, Tensor>,
    ms: f64,
}

pub fn run(args: &KernelsBenchArgs) -> Result<()> {
    let (device, kind) = args.model.device_and_kind()?;
    let cfg = ModelConfig::preset(&args.model.preset)?;
    anyhow::ensure!(
        args.block <= cfg.max_seq_len && args.rows > 0,
        "--block {} must be at most {}'s context ({}) and --rows at least 1",
        args.block,
        args.model.preset,
        cfg.max_seq_len
    );
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let mut model = LilLM::new(&vs.root(), &cfg).context("building the model")?;
    model.set_compute_kind(kind);
    let shape = [args.rows as i64, args.block as i64 + 1];
    let tokens =
        Tensor::randint(cfg.vocab_size as i64, shape, (Kind::Int64, Device::Cpu)).to_device(device);
    let (x, y) = (
        tokens.narrow(1, 0, args.block as i64).contiguous(),
        tokens.narrow(1, 1, args.block as i64).contiguous(),
    );
    let mut pass = |kernels| {
        model.set_kernels(kernels);
        measure(&model, &vs, &x, &y, args.iters)
    };
    let reference = pass(Kernels::REFERENCE);
    let fused = pass(Kernels::FUSED);
    let (logits, worst, grads) = fused.differences(&reference);
    let each_alone: Vec<_> = Kernels::EACH_ALONE
        .iter()
        .map(|&(layer, kernels)| {
            let alone = pass(kernels);
            let (logits, _, grads) = alone.differences(&reference);
            (layer, alone.ms, logits, grads)
        })
        .collect();
    let head = HeadLossFigures::measure(&model, &x, &y, args.iters);
    let layers: Vec<_> = each_alone
        .iter()
        .map(|(layer, ms, logits, grads)| {
            serde_json::json!({
                "layer": layer, "ms": ms, "logits_rel_diff": logits, "grads_rel_diff": grads,
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "preset": args.model.preset, "device": format!("{device:?}"), "kind": format!("{kind:?}"),
            "rows": args.rows, "block": args.block,
            "logits_rel_diff": logits, "grads_rel_diff": grads, "worst_grad": worst,
            "reference_ms": reference.ms, "fused_ms": fused.ms,
            "fused_swiglu": lillm_model::fused_swiglu_in_use(device),
            "fused_rope": lillm_model::fused_rope_in_use(device),
            "each_alone": layers,
            "head_loss": {
                "chunked_ms": head.chunked_ms, "full_ms": head.full_ms,
                "loss_diff": head.loss_diff, "grads_rel_diff": head.grads_rel_diff,
            },
        })
    );
    eprintln!(
        "{} {} x {} {kind:?} on {device:?}: fused vs reference logits differ by {logits:.2e}, gradients by {grads:.2e} ({worst}), relative to their largest; forward+backward {:.2} ms fused, {:.2} ms reference ({:.2}x)",
        args.model.preset,
        args.rows,
        args.block,
        fused.ms,
        reference.ms,
        reference.ms / fused.ms
    );
    for (layer, ms, logits, grads) in &each_alone {
        eprintln!(
            "  {layer} fused alone: forward+backward {ms:.2} ms ({:.2}x), logits differ by {logits:.2e}, gradients by {grads:.2e}",
            reference.ms / ms
        );
    }
    eprintln!(
        "  head loss chunked vs full logits: forward+backward {:.2} ms vs {:.2} ms ({:.2}x), losses differ by {:.2e}, gradients by {:.2e}",
        head.chunked_ms,
        head.full_ms,
        head.full_ms / head.chunked_ms,
        head.loss_diff,
        head.grads_rel_diff
    );
    Ok(())
}

/// The output head and its loss alone, on the model's final hidden states: chunked against
/// the full logits.
struct HeadLossFigures {
    chunked_ms: f64,
    full_ms: f64,
    /// |chunked − full| of the loss.
    loss_diff: f64,
    /// The larger relative difference of the two gradients (hidden states, head weight).
    grads_rel_diff: f64,
}

impl HeadLossFigures {
    fn measure(model: &LilLM, x: &Tensor, y: &Tensor, iters: usize) -> Self {
        let hidden = tch::no_grad(|| model.hidden_routed(x, false).0);
        let weight = model.head_weight();
        // One forward and backward: the loss and the hidden states holding their gradient
        // (the head weight's accumulates until zeroed).
        let pass = |chunked: bool| {
            let h = hidden.detach().set_requires_grad(true);
            let loss = match chunked {
                true => model.chunked_cross_entropy(&h, y),
                false => model.full_cross_entropy(&h, y),
            };
            loss.backward();
            (loss, h)
        };
        let step = |chunked: bool| {
            let _ = pass(chunked);
            let _ = weight.grad().zero_();
        };
        let time = |chunked: bool| ms_per_call(x.device(), iters, || step(chunked));
        let (chunked_ms, full_ms) = (time(true), time(false));
        let result = |chunked: bool| {
            let (loss, h) = pass(chunked);
            let grads = [h.grad(), weight.grad()].map(|g| g.to_kind(Kind::Float).copy());
            let _ = weight.grad().zero_();
            (loss.double_value(&[]), grads)
        };
        let ((chunked_loss, chunked), (full_loss, full)) = (result(true), result(false));
        let grads_rel_diff = chunked
            .iter()
            .zip(&full)
            .map(|(c, f)| relative_diff(c, f))
            .fold(0.0, f64::max);
        Self {
            chunked_ms,
            full_ms,
            loss_diff: (chunked_loss - full_loss).abs(),
            grads_rel_diff,
        }
    }
}

impl Pass {
    /// How far this pass is from `reference`: its logits' relative difference, and the
    /// parameter whose gradient differs most with that difference.
    fn differences(&self, reference: &Pass) -> (f64, String, f64) {
        let logits = relative_diff(&self.logits, &reference.logits);
        let (worst, grads) = self
            .grads
            .iter()
            .map(|(name, g)| (name.clone(), relative_diff(g, &reference.grads[name])))
            .fold((String::new(), 0.0f64), |best, (name, d)| {
                if d > best.1 {
                    (name, d)
                } else {
                    best
                }
            });
        (logits, worst, grads)
    }
}

/// The logits and gradients of one forward and backward on `x → y`, and the mean time of
/// `iters` more (after two warm-ups).
fn measure(model: &LilLM, vs: &VarStore, x: &Tensor, y: &Tensor, iters: usize) -> Pass {
    let step = || {
        // Without dropout, so that both implementations see the same activations.
        let loss = LilLM::mean_cross_entropy(&model.forward(x, false), y);
        loss.backward();
    };
    let zero = || {
        for (_, mut p) in vs.variables() {
            p.zero_grad();
        }
    };
    let ms = ms_per_call(x.device(), iters, || {
        step();
        zero();
    });
    step();
    let grads = vs
        .variables()
        .into_iter()
        .map(|(name, p)| (name, p.grad().to_kind(Kind::Float).copy()))
        .collect();
    zero();
    let logits = tch::no_grad(|| model.forward(x, false).to_kind(Kind::Float));
    Pass { logits, grads, ms }
}

/// Milliseconds per call of `step` on `device`, over `iters` calls after two untimed ones
/// (libtorch picks its kernels and makes its workspaces on the first calls).
pub(crate) fn ms_per_call(device: Device, iters: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..2 {
        step();
    }
    sync(device);
    let started = Instant::now();
    for _ in 0..iters {
        step();
    }
    sync(device);
    started.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64
}

pub(crate) fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}
