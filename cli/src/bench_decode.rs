//! `lillm bench decode`: one decode step of continuous batching alone — no sampling, no
//! HTTP — at a few batch sizes, on the model as inference holds it (weights in the compute
//! kind, projections joined): the step on its fixed shapes launched op by op, and on CUDA
//! replayed as the CUDA graph the server captures, with what one step launches (libtorch's
//! profiler: operator calls, matrix multiplies and, on CUDA, kernels and their time). At
//! one row, 1000 / the replay's milliseconds is the most tokens per second one stream can
//! get; the serving benchmark measures the whole path.

use anyhow::{Context, Result};
use clap::Args;
use lillm_cuda::profiler::Profiler;
use lillm_cuda::CudaGraph;
use lillm_model::{LilLM, ModelConfig, SlotCache};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::bench_kernels::{ms_per_call, sync, BenchModel};

#[derive(Args, Debug, Clone)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    model: BenchModel,
    /// Batch sizes (rows of a step), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    rows: Vec<usize>,
    /// Timed steps per batch size and way (after two untimed ones).
    #[arg(long, default_value_t = 50)]
    steps: usize,
}

pub fn run(args: &DecodeBenchArgs) -> Result<()> {
    let (device, kind) = args.model.device_and_kind()?;
    let preset = &args.model.preset;
    let cfg = ModelConfig::preset(preset)?;
    anyhow::ensure!(
        !args.rows.is_empty() && args.rows.iter().all(|&r| r > 0) && args.steps > 0,
        "--rows must list batch sizes of at least 1, and --steps be at least 1"
    );
    tch::manual_seed(0);
    let mut vs = VarStore::new(device);
    let mut model = LilLM::new(&vs.root(), &cfg).context("building the model")?;
    model.hold_for_inference(&mut vs, kind);
    let _guard = tch::no_grad_guard();
    let mut levels = Vec::new();
    for &rows in &args.rows {
        let level = Level::measure(&model, rows, args.steps)?;
        eprintln!("{}", level.describe(preset, kind, device));
        levels.push(level.json());
    }
    println!(
        "{}",
        serde_json::json!({
            "preset": preset, "device": format!("{device:?}"), "kind": format!("{kind:?}"),
            "levels": levels,
        })
    );
    Ok(())
}

/// One batch size's figures.
struct Level {
    rows: usize,
    /// The fixed-shape step launched op by op.
    uncaptured_ms: f64,
    /// The same step replayed as a CUDA graph, or why it could not be captured (`None`: not
    /// on CUDA).
    graph_ms: Option<std::result::Result<f64, String>>,
    /// What one uncaptured step launched.
    launched: Launched,
}

/// What one step launched.
struct Launched {
    operators: u64,
    matmuls: u64,
    /// CUDA kernels, and their summed time in milliseconds.
    kernels: Option<(u64, f64)>,
}

impl Level {
    fn measure(model: &LilLM, rows: usize, steps: usize) -> Result<Self> {
        let cfg = model.config();
        let device = model.device();
        let mut slots = SlotCache::new(cfg, rows, model.compute_kind(), device);
        // Rows half-way into their context, as in a running batch (the step attends over
        // the whole context, masked, whatever the positions).
        let ids = Tensor::zeros([rows as i64, 1], (Kind::Int64, device));
        let half = (cfg.max_seq_len / 2) as i64;
        let positions = Tensor::full([rows as i64], half, (Kind::Int64, device));
        let mut step = || model.decode_static(&ids, &positions, &mut slots);
        let uncaptured_ms = ms_per_call(device, steps, || {
            let _ = step();
        });
        let launched = profile(device, || {
            let _ = step();
        })?;
        let graph_ms = device.is_cuda().then(|| {
            let (graph, _) =
                CudaGraph::capture(device, None, 2, &mut step).map_err(|e| e.to_string())?;
            let replay = || graph.replay().map_err(|e| e.to_string());
            replay()?;
            Ok(ms_per_call(device, steps, || {
                replay().expect("it replayed once")
            }))
        });
        Ok(Self {
            rows,
            uncaptured_ms,
            graph_ms,
            launched,
        })
    }

    fn json(&self) -> serde_json::Value {
        let (graph_ms, graph_error) = match &self.graph_ms {
            Some(Ok(ms)) => (Some(*ms), None),
            Some(Err(e)) => (None, Some(e.clone())),
            None => (None, None),
        };
        let Launched {
            operators,
            matmuls,
            kernels,
        } = self.launched;
        serde_json::json!({
            "rows": self.rows, "uncaptured_ms": self.uncaptured_ms, "graph_ms": graph_ms,
            "graph_error": graph_error, "operators": operators, "matmuls": matmuls,
            "kernels": kernels.map(|k| k.0), "kernel_ms": kernels.map(|k| k.1),
        })
    }

    fn describe(&self, preset: &str, kind: Kind, device: Device) -> String {
        let graph = match &self.graph_ms {
            Some(Ok(ms)) => format!(", {ms:.3} ms replayed as a CUDA graph"),
            Some(Err(e)) => format!(", not captured ({e})"),
            None => String::new(),
        };
        let kernels = match self.launched.kernels {
            Some((n, ms)) => format!(", {n} kernels ({ms:.3} ms of GPU time)"),
            None => String::new(),
        };
        format!(
            "{preset} {kind:?} on {device:?}, a batch of {}: {:.3} ms a decode step uncaptured{graph}; {} operator calls, {} matrix multiplies{kernels}",
            self.rows, self.uncaptured_ms, self.launched.operators, self.launched.matmuls
        )
    }
}

/// What one call of `step` launched.
fn profile(device: Device, step: impl FnOnce()) -> Result<Launched> {
    let profiler = Profiler::start(device)?;
    step();
    sync(device);
    let ops = profiler.finish(None)?;
    let on = |device: &'static str| ops.iter().filter(move |op| op.device == device);
    let matmuls = on("cpu")
        .filter(|op| op.name == "aten::mm")
        .map(|op| op.calls)
        .sum();
    let kernels = device.is_cuda().then(|| {
        let ns: u64 = on("cuda").map(|op| op.total_ns).sum();
        (on("cuda").map(|op| op.calls).sum(), ns as f64 / 1e6)
    });
    Ok(Launched {
        operators: on("cpu").map(|op| op.calls).sum(),
        matmuls,
        kernels,
    })
}
