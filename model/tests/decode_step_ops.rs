//! What a decode step launches once and what it launches per layer. On a GPU a small
//! model's decode step is a few hundred small kernels replayed from a CUDA graph, so each
//! kernel a layer repeats for nothing costs every token: the rows of the rotation's tables,
//! the cache indices and the attention mask depend on the step's positions alone, and are
//! made once per step whatever the depth.

use lillm_cuda::profiler::Profiler;
use lillm_model::{LilLM, ModelConfig, SlotCache};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Operators that make a step's shared inputs (and the conversion of a boolean mask, which
/// attention would repeat in every layer).
const ONCE_PER_STEP: [&str; 7] = [
    "aten::index_select",
    "aten::arange",
    "aten::le",
    "aten::gt",
    "aten::where",
    "aten::logical_not",
    "aten::masked_fill",
];

/// Calls of each [`ONCE_PER_STEP`] operator in one static decode step (as a CUDA graph
/// captures it) of four rows, for a model of `layers` layers.
fn shared_input_ops(layers: usize) -> Vec<(&'static str, u64)> {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.n_layers = layers;
    let vs = VarStore::new(Device::Cpu);
    let model = LilLM::new(&vs.root(), &cfg).unwrap();
    let _guard = tch::no_grad_guard();
    let mut slots = SlotCache::new(&cfg, 4, Kind::Float, Device::Cpu);
    let ids = Tensor::from_slice(&[3i64, 1, 4, 1]).view([4, 1]);
    let positions = Tensor::from_slice(&[5i64, 0, 9, 2]);
    let _ = model.decode_static(&ids, &positions, &mut slots);
    let profiler = Profiler::start(Device::Cpu).unwrap();
    let _ = model.decode_static(&ids, &positions, &mut slots);
    let ops = profiler.finish(None).unwrap();
    ONCE_PER_STEP
        .iter()
        .map(|&name| {
            let calls = ops.iter().filter(|op| op.name == name).map(|op| op.calls);
            (name, calls.sum())
        })
        .collect()
}

#[test]
fn a_decode_steps_shared_inputs_are_made_once_whatever_the_depth() {
    let (shallow, deep) = (shared_input_ops(2), shared_input_ops(6));
    assert_eq!(shallow, deep, "calls at 2 layers, then at 6");
    let calls = |name| shallow.iter().find(|(n, _)| *n == name).unwrap().1;
    // The step does gather its rotation rows (cos and sin) and build its mask: the profile
    // saw them.
    assert!(calls("aten::index_select") >= 2, "{shallow:?}");
    assert!(calls("aten::masked_fill") >= 1, "{shallow:?}");
}
