//! Continuous batching: sequences prefilled together and decoded together in a
//! [`SlotCache`] — of different lengths, joining and leaving mid-batch — get at every step
//! the logits of a full forward pass over each sequence alone, whether a step runs on the
//! used slots only or, as a captured CUDA graph does, on every slot over the whole context.

use lillm_model::{KvCache, LilLM, ModelConfig, MoeConfig, SlotCache};
use tch::{nn::VarStore, Device, Kind, Tensor};

fn tiny() -> ModelConfig {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 97;
    cfg.d_model = 32;
    cfg.n_layers = 2;
    cfg.max_seq_len = 40;
    cfg
}

/// A sequence's whole token list; the first `prompt` tokens are prefilled, the rest fed one
/// per decode step.
struct Seq {
    ids: Vec<i64>,
    prompt: usize,
    fed: usize,
}

/// A decode step: `tokens` for the used slots in, their logits out, the slots advanced.
type Decode = fn(&LilLM, &[u32], &mut SlotCache) -> Tensor;

/// The step a CUDA graph captures: every slot a row (those past the used ones padding, at
/// position 0 with token 0), every row attending over the whole context.
fn decode_every_slot(model: &LilLM, tokens: &[u32], slots: &mut SlotCache) -> Tensor {
    let rows = slots.slots();
    let (mut ids, mut positions) = (vec![0i64; rows], vec![0i64; rows]);
    for (i, &t) in tokens.iter().enumerate() {
        (ids[i], positions[i]) = (t as i64, slots.len(i) as i64);
    }
    let ids = Tensor::from_slice(&ids).view([rows as i64, 1]);
    let logits = model.decode_static(&ids, &Tensor::from_slice(&positions), slots);
    slots.advance_all();
    logits.narrow(0, 0, tokens.len() as i64)
}

fn moe() -> ModelConfig {
    ModelConfig {
        moe: Some(MoeConfig::new(4, 2, Some(48))),
        ..tiny()
    }
}

#[test]
fn batched_decoding_gives_each_sequence_its_own_logits() {
    batched_decoding_gives_each_sequence_its_own_logits_of(tiny(), LilLM::decode_slots);
}

/// A Mixture-of-Experts model: each row is routed on its own, so batching changes nothing.
#[test]
fn moe_batched_decoding_gives_each_sequence_its_own_logits() {
    batched_decoding_gives_each_sequence_its_own_logits_of(moe(), LilLM::decode_slots);
}

/// Padding rows never reach a live sequence, and the masked rest of the context changes
/// nothing.
#[test]
fn the_static_step_gives_each_sequence_its_own_logits() {
    batched_decoding_gives_each_sequence_its_own_logits_of(tiny(), decode_every_slot);
    batched_decoding_gives_each_sequence_its_own_logits_of(moe(), decode_every_slot);
}

fn batched_decoding_gives_each_sequence_its_own_logits_of(cfg: ModelConfig, decode: Decode) {
    tch::manual_seed(11);
    let vs = VarStore::new(Device::Cpu);
    let model = LilLM::new(&vs.root(), &cfg).unwrap();
    let _guard = tch::no_grad_guard();
    let seq = |prompt: usize, total: usize, seed: i64| {
        tch::manual_seed(seed);
        let ids = Tensor::randint(97, [total as i64], (Kind::Int64, Device::Cpu));
        Seq {
            ids: Vec::<i64>::try_from(&ids).unwrap(),
            prompt,
            fed: prompt,
        }
    };
    // Full forward logits of each whole sequence: what every step must reproduce.
    let reference = |s: &Seq| model.forward(&Tensor::from_slice(&s.ids).view([1, -1]), false);
    let prefill = |s: &Seq, slots: &mut SlotCache| {
        let mut cache = KvCache::new(&cfg, 1, Kind::Float, Device::Cpu);
        let _ = model.forward_cached(
            &Tensor::from_slice(&s.ids[..s.prompt]).view([1, -1]),
            &mut cache,
        );
        slots.admit(&cache, 0, s.prompt)
    };
    let mut slots = SlotCache::new(&cfg, 4, Kind::Float, Device::Cpu);
    // Three sequences start with prompts of 3, 9 and 1 tokens and different lengths; a
    // fourth joins after two steps, and sequences leave as they end (the last slot's
    // sequence then moves into the freed slot).
    // The three are prefilled together (right-padded to 9 tokens in one forward); each
    // row's last logits are its prompt's alone, and only its own positions join a slot.
    let mut running: Vec<(Seq, Tensor)> = Vec::new();
    let first = [seq(3, 12, 1), seq(9, 14, 2), seq(1, 6, 3)];
    let prompts: Vec<Vec<u32>> = first
        .iter()
        .map(|s| s.ids[..s.prompt].iter().map(|&t| t as u32).collect())
        .collect();
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut together = KvCache::with_capacity(&cfg, 3, 9, Kind::Float, Device::Cpu);
    let last = model.prefill_rows(&prompts, &mut together);
    for (row, s) in first.into_iter().enumerate() {
        let want = reference(&s);
        let at_prompt_end = want.get(0).get(s.prompt as i64 - 1);
        let diff = (last.get(row as i64) - at_prompt_end)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff < 1e-4,
            "prompt {row} prefilled in a batch: diff {diff}"
        );
        let slot = slots.admit(&together, row, s.prompt);
        assert_eq!((slot, slots.len(slot)), (row, s.prompt));
        running.push((s, want));
    }
    let mut late = Some(seq(5, 20, 4));
    let mut steps = 0;
    let mut checked = 0;
    while !running.is_empty() {
        if steps == 2 {
            let s = late.take().unwrap();
            prefill(&s, &mut slots);
            let want = reference(&s);
            running.push((s, want));
        }
        let tokens: Vec<u32> = running.iter().map(|(s, _)| s.ids[s.fed] as u32).collect();
        let logits = decode(&model, &tokens, &mut slots);
        for (i, (s, want)) in running.iter_mut().enumerate() {
            let want = want.get(0).get(s.fed as i64);
            let diff = (logits.get(i as i64) - &want).abs().max().double_value(&[]);
            assert!(
                diff < 1e-4,
                "sequence {i} at position {}: diff {diff}",
                s.fed
            );
            s.fed += 1;
            assert_eq!(slots.len(i), s.fed);
            checked += 1;
        }
        for i in (0..running.len()).rev() {
            if running[i].0.fed + 1 == running[i].0.ids.len() {
                slots.release(i);
                let _ = running.swap_remove(i);
            }
        }
        steps += 1;
    }
    // Every fed position of the four sequences: (12-3-1) + (14-9-1) + (6-1-1) + (20-5-1).
    assert!(late.is_none());
    assert_eq!(checked, 30);
    assert_eq!(slots.used(), 0);
}

/// A CUDA graph cannot capture a step that reads a value back to the host: an MoE layer
/// does unless it runs the grouped matmul (bf16, rows of whole 16-byte units).
#[test]
fn a_decode_step_is_capturable_unless_an_moe_layer_reads_back() {
    let capturable = |cfg: &ModelConfig, kind: Kind| {
        let vs = VarStore::new(Device::Cpu);
        let mut model = LilLM::new(&vs.root(), cfg).unwrap();
        model.set_compute_kind(kind);
        model.is_capturable()
    };
    assert!(capturable(&tiny(), Kind::Float));
    assert!(capturable(&moe(), Kind::BFloat16));
    assert!(!capturable(&moe(), Kind::Float));
    let odd = ModelConfig {
        // 36 bf16 = 72 bytes a row.
        moe: Some(MoeConfig::new(4, 2, Some(36))),
        ..tiny()
    };
    assert!(!capturable(&odd, Kind::BFloat16));
}

/// The prefill a CUDA graph captures: a prompt right-padded to its length bucket, its
/// logits read at its last token. The padding never reaches the prompt: the logits, and a
/// decode that goes on from the admitted cache, are those of the whole sequence alone.
#[test]
fn a_prompt_padded_to_its_bucket_prefills_as_it_does_alone() {
    for cfg in [tiny(), moe()] {
        tch::manual_seed(5);
        let vs = VarStore::new(Device::Cpu);
        let model = LilLM::new(&vs.root(), &cfg).unwrap();
        let _guard = tch::no_grad_guard();
        let ids: Vec<i64> = vec![5, 17, 3, 88, 41, 9, 60, 2];
        let want = model.forward(&Tensor::from_slice(&ids).view([1, -1]), false);
        let (prompt, bucket) = (5, 16);
        let mut padded = vec![0i64; bucket];
        padded[..prompt].copy_from_slice(&ids[..prompt]);
        let mut cache = KvCache::with_capacity(&cfg, 1, bucket, Kind::Float, Device::Cpu);
        let logits = model.prefill_static(
            &Tensor::from_slice(&padded).view([1, -1]),
            &Tensor::from_slice(&[prompt as i64 - 1]),
            &mut cache,
        );
        same_as_alone(&model, &want, &logits, &cache, &ids, prompt);
    }
}

/// A long prompt prefilled as a CUDA graph per chunk start captures it: chunks of a fixed
/// length at fixed starts, the last one right-padded, each attending to the cache the earlier
/// ones filled. The logits at its last token, and a decode that goes on from the admitted
/// cache, are those of the whole sequence alone; the padding past the prompt never reaches it.
#[test]
fn a_long_prompt_prefilled_in_fixed_chunks_is_the_whole_sequence() {
    for cfg in [tiny(), moe()] {
        tch::manual_seed(6);
        let vs = VarStore::new(Device::Cpu);
        let model = LilLM::new(&vs.root(), &cfg).unwrap();
        let _guard = tch::no_grad_guard();
        let ids: Vec<i64> = (0..30).map(|i| (i * 37 + 11) % 97).collect();
        let want = model.forward(&Tensor::from_slice(&ids).view([1, -1]), false);
        // 23 prompt tokens in chunks of 8: 8 + 8 + 7 (padded to 8) at starts 0, 8, 16.
        let (prompt, chunk) = (23, 8);
        let mut cache = KvCache::new(&cfg, 1, Kind::Float, Device::Cpu);
        // Stale positions from an earlier prompt must not matter either.
        let _ = model.forward_cached(&Tensor::from_slice(&[7i64; 30]).view([1, -1]), &mut cache);
        let mut logits = None;
        for start in (0..prompt).step_by(chunk) {
            let end = (start + chunk).min(prompt);
            let mut padded = vec![0i64; chunk];
            padded[..end - start].copy_from_slice(&ids[start..end]);
            logits = Some(model.prefill_from(
                &Tensor::from_slice(&padded).view([1, -1]),
                start,
                &Tensor::from_slice(&[(end - start) as i64 - 1]),
                &mut cache,
            ));
        }
        assert_eq!(cache.len(), 24, "the last chunk's padding was written too");
        same_as_alone(&model, &want, &logits.unwrap(), &cache, &ids, prompt);
    }
}

/// A prefilled prompt's last logits, and a decode that goes on from its cache admitted to a
/// slot, against `want`, the whole sequence's logits alone.
fn same_as_alone(
    model: &LilLM,
    want: &Tensor,
    last_logits: &Tensor,
    cache: &KvCache,
    ids: &[i64],
    prompt: usize,
) {
    let at = |pos: usize| want.get(0).get(pos as i64);
    let diff = (last_logits.get(0) - at(prompt - 1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-4, "prefill: diff {diff}");
    let mut slots = SlotCache::new(model.config(), 2, Kind::Float, Device::Cpu);
    slots.admit(cache, 0, prompt);
    for (pos, &id) in ids.iter().enumerate().take(ids.len() - 1).skip(prompt) {
        let logits = decode_every_slot(model, &[id as u32], &mut slots);
        let diff = (logits.get(0) - at(pos)).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "decode at {pos}: diff {diff}");
    }
}
