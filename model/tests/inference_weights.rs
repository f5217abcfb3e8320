//! Weights as inference holds them give the logits of the weights as training holds them,
//! bit for bit: stored in the compute kind (not float32 cast at every use), and with each
//! layer's input projections joined into one matrix. Full forward, prefill and batched
//! decoding, dense and MoE.

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

/// Logits of a full forward and of three decode steps after a prefill, caches in `kind`.
fn logits_in(model: &LilLM, cfg: &ModelConfig, ids: &Tensor, kind: Kind) -> Vec<Tensor> {
    let _guard = tch::no_grad_guard();
    let mut out = vec![model.forward(ids, false)];
    let prompt: Vec<u32> = Vec::<i64>::try_from(&ids.get(0).narrow(0, 0, 5))
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let mut prefilled = KvCache::with_capacity(cfg, 1, 5, kind, Device::Cpu);
    out.push(model.prefill_rows(&[&prompt], &mut prefilled));
    let mut slots = SlotCache::new(cfg, 2, kind, Device::Cpu);
    slots.admit(&prefilled, 0, 5);
    for token in [3u32, 14, 15] {
        out.push(model.decode_slots(&[token], &mut slots));
    }
    out
}

fn logits(model: &LilLM, cfg: &ModelConfig, ids: &Tensor) -> Vec<Tensor> {
    logits_in(model, cfg, ids, Kind::BFloat16)
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
    same_logits_of(moe());
}

fn moe() -> ModelConfig {
    ModelConfig {
        moe: Some(MoeConfig::new(4, 2, Some(48))),
        ..tiny()
    }
}

/// The model as inference holds it ([`LilLM::hold_for_inference`]: projections joined) gives
/// the logits of separate projections, in float32 and in bf16, with every weight stored in
/// that kind, and the joined matrices take no memory of their own: the named weights are
/// views of them.
#[test]
fn joined_projections_give_the_same_logits_in_the_same_memory() {
    for (cfg, kind) in [
        (tiny(), Kind::Float),
        (tiny(), Kind::BFloat16),
        (moe(), Kind::Float),
    ] {
        let ids = Tensor::randint(97, [1, 12], (Kind::Int64, Device::Cpu));
        // The same weights twice (copied: the tests beside this one draw from the same
        // global generator): one model with its projections apart, one held for inference.
        let mut apart_vs = VarStore::new(Device::Cpu);
        let mut apart_model = LilLM::new(&apart_vs.root(), &cfg).unwrap();
        let mut vs = VarStore::new(Device::Cpu);
        let mut model = LilLM::new(&vs.root(), &cfg).unwrap();
        vs.copy(&apart_vs).unwrap();
        apart_model.set_compute_kind(kind);
        weights::store_for_inference(&mut apart_vs, kind);
        let apart = logits_in(&apart_model, &cfg, &ids, kind);
        model.hold_for_inference(&mut vs, kind);
        let joined = logits_in(&model, &cfg, &ids, kind);
        for (i, (a, b)) in apart.iter().zip(&joined).enumerate() {
            assert!(a.equal(b), "{kind:?}: logits {i} differ");
        }
        let vars = vs.variables();
        assert!(
            vars.values().all(|t| t.kind() == kind),
            "{kind:?}: weights stored in it"
        );
        let at = |name: &str| {
            let t = &vars[&format!("transformer_blocks.1.{name}.weight")];
            (
                t.data_ptr() as usize,
                t.numel() * t.kind().elt_size_in_bytes(),
            )
        };
        let adjoining = |first: &str, next: &str| at(first).0 + at(first).1 == at(next).0;
        assert!(adjoining("attn.wq", "attn.wk") && adjoining("attn.wk", "attn.wv"));
        if cfg.moe.is_none() {
            assert!(adjoining("ffn.w1", "ffn.w3"), "{kind:?}");
        }
    }
}
