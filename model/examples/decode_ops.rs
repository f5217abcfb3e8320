//! What one fixed-shape decode step (the work a CUDA graph captures) calls, counted by
//! libtorch's profiler on the CPU: operator calls and matrix multiplies per step, with each
//! layer's input projections apart and joined ([`LilLM::join_projections`]). On a GPU each
//! such kernel is a few microseconds of every token, captured or not.
//!
//!   cargo run --release -p lillm-model --example decode_ops [PRESET [ROWS]]

use lillm_cuda::profiler::Profiler;
use lillm_model::{LilLM, ModelConfig, SlotCache};
use tch::{nn::VarStore, Device, Kind, Tensor};

const STEPS: u64 = 10;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().unwrap_or_else(|| "lillm-39m".into());
    let rows: i64 = args.next().map_or(Ok(8), |r| r.parse())?;
    let cfg = ModelConfig::preset(&preset)?;
    let vs = VarStore::new(Device::Cpu);
    let mut model = LilLM::new(&vs.root(), &cfg)?;
    let _guard = tch::no_grad_guard();
    for joined in [false, true] {
        if joined {
            model.join_projections();
        }
        let mut slots = SlotCache::new(&cfg, rows as usize, Kind::Float, Device::Cpu);
        let ids = Tensor::zeros([rows, 1], (Kind::Int64, Device::Cpu));
        let positions = Tensor::zeros([rows], (Kind::Int64, Device::Cpu));
        let _ = model.decode_static(&ids, &positions, &mut slots);
        let profiler = Profiler::start(Device::Cpu)?;
        for _ in 0..STEPS {
            let _ = model.decode_static(&ids, &positions, &mut slots);
        }
        let ops = profiler.finish(None)?;
        let calls = |name: Option<&str>| {
            let named = ops.iter().filter(|op| name.is_none_or(|n| op.name == n));
            named.map(|op| op.calls).sum::<u64>() / STEPS
        };
        println!(
            "{preset}, a batch of {rows}, projections {}: {} operator calls, {} matrix multiplies per decode step",
            if joined { "joined" } else { "apart" },
            calls(None),
            calls(Some("aten::mm")),
        );
    }
    Ok(())
}
