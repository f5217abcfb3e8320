//! Weights stored in the compute kind for inference give the logits of float32 weights cast
//! at every use, bit for bit: full forward and batched decoding, dense and MoE.

use lillm_model::{weights, KvCache, LilLM, ModelConfig, MoeConfig, SlotCache};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 97;
    cfg.d_model = 32;
    cfg.n_layers = 2;
    cfg.max_seq_len = 24;
    cfg
}

/// Logits of a full forward and of three decode steps after a prefill, in bf16.
fn logits(model: &LilLM, cfg: &ModelConfig, ids: &Tensor) -> Vec<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut out = vec![model.forward(ids, false)];
    let prompt: Vec<u32> = Vec::<i64>::try_from(&ids.get(0).narrow(0, 0, 5))
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let mut prefilled = KvCache::with_capacity(cfg, 1, 5, Kind::BFloat16, Device::Cpu);
    out.push(model.prefill_rows(&[&prompt], &mut prefilled));
    let mut slots = SlotCache::new(cfg, 2, Kind::BFloat16, Device::Cpu);
    slots.admit(&prefilled, 0, 5);
    for token in [3u32, 14, 15] {
        out.push(model.decode_slots(&[token], &mut slots));
    }
    out
}

fn same_logits_of(cfg: ModelConfig) {
    tch::manual_seed(5);
    let mut vs = VarStore::new(Device::Cpu);
    let mut model = LilLM::new(&vs.root(), &cfg).unwrap();
    let ids = Tensor::randint(97, [1, 12], (Kind::Int64, Device::Cpu));
    let original = tch::no_grad(|| model.forward(&ids, false));
    model.set_compute_kind(Kind::BFloat16);
    let cast_at_use = logits(&model, &cfg, &ids);
    let bytes = |vs: &VarStore| -> i64 {
        vs.variables()
            .values()
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum()
    };
    let before = bytes(&vs);
    weights::store_for_inference(&mut vs, Kind::BFloat16);
    assert_eq!(bytes(&vs) * 2, before, "every weight now takes two bytes");
    let stored = logits(&model, &cfg, &ids);
    for (i, (a, b)) in cast_at_use.iter().zip(&stored).enumerate() {
        assert!(a.equal(b), "logits {i} differ");
    }
    // The model computes with the stored weights, not float32 copies of its own: in float32
    // they now give the bf16-rounded weights' logits, not the original ones.
    model.set_compute_kind(Kind::Float);
    let rounded = tch::no_grad(|| model.forward(&ids, false));
    assert!(
        !rounded.equal(&original),
        "the model still holds float32 weights"
    );
}

#[test]
fn bf16_weights_give_the_logits_of_casting_at_use() {
    same_logits_of(tiny());
}

#[test]
fn moe_bf16_weights_give_the_logits_of_casting_at_use() {
    same_logits_of(ModelConfig {
        moe: Some(MoeConfig::new(4, 2, Some(48))),
        ..tiny()
    });
}
