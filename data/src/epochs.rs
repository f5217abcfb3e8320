//! Exactly-once epochs: each shard of the train split is cut into non-overlapping sequences
//! of `block_size + 1` tokens (a shard's last partial sequence is left out), and every
//! sequence is trained on exactly once per epoch, in an order that is a pure function of
//! (seed, epoch) — so any world size, resume or failure replays it exactly.
//!
//! The order has two levels, so that it needs memory proportional to the shards, not to the
//! sequences, and so that a micro-batch reads few shards: per epoch the shards are shuffled
//! (a keyed Feistel permutation of their indices) and taken [`SHARDS_PER_WINDOW`] at a time;
//! within such a window the sequences of its shards are shuffled by another keyed
//! permutation. Training position `p` (sequence `p` of the whole run: step, micro-batch and
//! row, counted over all ranks) is sequence `p mod S` of epoch `p / S` in that order.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::split::splitmix64;

/// How training windows are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataOrder {
    /// Random windows anywhere in the stream, with replacement (the original lilLM's).
    #[default]
    Random,
    /// Every `block_size + 1` sequence exactly once per epoch, in a seeded order.
    Epochs,
}

/// Shards whose sequences are shuffled together: a micro-batch's rows come from at most
/// this many shards (twice as many where it straddles two windows).
pub const SHARDS_PER_WINDOW: usize = 8;

/// A keyed bijection of `0..n`: a four-round Feistel network over the smallest even number
/// of bits that holds `n`, cycle-walked back into range (fewer than four walks expected).
#[derive(Debug, Clone, Copy)]
pub struct Feistel {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl Feistel {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        Self {
            n,
            half_bits: bits.div_ceil(2).max(1),
            key,
        }
    }

    /// Where `x` (< n) goes.
    pub fn permute(&self, x: u64) -> u64 {
        debug_assert!(x < self.n);
        let mut y = x;
        loop {
            y = self.rounds(y);
            if y < self.n {
                return y;
            }
        }
    }

    fn rounds(&self, y: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut left, mut right) = (y >> self.half_bits, y & mask);
        for round in 0..4u64 {
            let f = splitmix64(right ^ self.key ^ round.wrapping_mul(0xA24B_AED4_963E_E407)) & mask;
            (left, right) = (right, left ^ f);
        }
        (left << self.half_bits) | right
    }
}

/// Epochs of `sequences` each completed after `position` sequences.
pub fn epochs_done(sequences: u64, position: u64) -> f64 {
    (position / sequences.max(1)) as f64
        + (position % sequences.max(1)) as f64 / sequences.max(1) as f64
}

/// Sequences of `window` tokens each shard of `shard_tokens` tokens holds (its last partial
/// sequence left out).
fn sequences_per_shard(shard_tokens: &[u64], window: u64) -> Vec<u64> {
    shard_tokens.iter().map(|t| t / window.max(1)).collect()
}

/// Sequences of `window` tokens an epoch holds over shards of `shard_tokens` tokens.
pub fn sequences_per_epoch(shard_tokens: &[u64], window: u64) -> u64 {
    sequences_per_shard(shard_tokens, window).iter().sum()
}

/// Which sequence a training position reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sequence {
    pub epoch: u64,
    /// Index of the shard in the split, and of the sequence within it.
    pub shard: usize,
    pub index: u64,
}

/// One epoch's shard order and where each window of shards starts, in sequences.
#[derive(Debug)]
struct EpochPlan {
    epoch: u64,
    /// Shards in this epoch's order.
    order: Vec<u32>,
    /// `window_starts[k]` is the epoch offset of window k's first sequence; the last entry
    /// is the number of sequences.
    window_starts: Vec<u64>,
}

/// The exactly-once order over one split's shards for one sequence length.
#[derive(Debug)]
pub struct EpochOrder {
    seed: u64,
    /// Sequences of `block_size + 1` tokens each shard holds.
    per_shard: Vec<u64>,
    total: u64,
    /// The latest epoch's plan (batches of one step read the same epoch).
    plan: Mutex<Option<Arc<EpochPlan>>>,
}

impl EpochOrder {
    /// The order for shards of `shard_tokens` tokens, sequences of `window` tokens.
    pub fn new(seed: u64, shard_tokens: &[u64], window: u64) -> Self {
        let per_shard = sequences_per_shard(shard_tokens, window);
        Self {
            seed,
            total: per_shard.iter().sum(),
            per_shard,
            plan: Mutex::new(None),
        }
    }

    /// Sequences per epoch.
    pub fn sequences(&self) -> u64 {
        self.total
    }

    /// The sequence training position `position` reads.
    pub fn at(&self, position: u64) -> Sequence {
        assert!(self.total > 0, "an epoch order over no sequence");
        let epoch = position / self.total;
        let offset = position % self.total;
        let plan = self.plan(epoch);
        let window = plan.window_starts.partition_point(|&s| s <= offset) - 1;
        let base = plan.window_starts[window];
        let size = plan.window_starts[window + 1] - base;
        let key = self.key(epoch, 1 + window as u64);
        let mut local = Feistel::new(size, key).permute(offset - base);
        let shards = &plan.order[window * SHARDS_PER_WINDOW..];
        for &shard in shards {
            let count = self.per_shard[shard as usize];
            if local < count {
                return Sequence {
                    epoch,
                    shard: shard as usize,
                    index: local,
                };
            }
            local -= count;
        }
        unreachable!("a window's sequences are its shards'")
    }

    fn key(&self, epoch: u64, part: u64) -> u64 {
        splitmix64(self.seed ^ splitmix64(0x6570_6f63_6873 ^ splitmix64(epoch ^ splitmix64(part))))
    }

    fn plan(&self, epoch: u64) -> Arc<EpochPlan> {
        let mut cached = self.plan.lock().expect("epoch plan lock");
        if let Some(plan) = cached.as_ref().filter(|p| p.epoch == epoch) {
            return plan.clone();
        }
        let n = self.per_shard.len() as u64;
        let shuffle = Feistel::new(n, self.key(epoch, 0));
        let order: Vec<u32> = (0..n).map(|i| shuffle.permute(i) as u32).collect();
        let mut window_starts = vec![0];
        for window in order.chunks(SHARDS_PER_WINDOW) {
            let size: u64 = window.iter().map(|&s| self.per_shard[s as usize]).sum();
            window_starts.push(window_starts.last().expect("non-empty") + size);
        }
        let plan = Arc::new(EpochPlan {
            epoch,
            order,
            window_starts,
        });
        *cached = Some(plan.clone());
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feistel_is_a_bijection_for_every_size() {
        for n in [1u64, 2, 3, 7, 8, 100, 1000, 4097] {
            let f = Feistel::new(n, 42);
            let mut seen: Vec<u64> = (0..n).map(|x| f.permute(x)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
        let (a, b) = (Feistel::new(1000, 1), Feistel::new(1000, 2));
        assert!((0..1000).any(|x| a.permute(x) != b.permute(x)), "keyed");
    }

    #[test]
    fn every_sequence_once_per_epoch_and_epochs_differ() {
        // 20 shards of uneven sizes, windows of 11 tokens (some shards hold no sequence).
        let tokens: Vec<u64> = (0..20).map(|i| (i * 37 % 101) as u64 + 5).collect();
        let order = EpochOrder::new(7, &tokens, 11);
        let total = order.sequences();
        assert_eq!(total, tokens.iter().map(|t| t / 11).sum::<u64>());
        let mut epochs = Vec::new();
        for epoch in 0..3 {
            let mut seen: Vec<(usize, u64)> = (epoch * total..(epoch + 1) * total)
                .map(|p| {
                    let s = order.at(p);
                    assert_eq!(s.epoch, epoch);
                    assert!(s.index < tokens[s.shard] / 11);
                    (s.shard, s.index)
                })
                .collect();
            epochs.push(seen.clone());
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len() as u64, total, "epoch {epoch}: each exactly once");
        }
        assert_ne!(epochs[0], epochs[1], "each epoch has its own order");
        // The same seed gives the same order, whatever was asked before.
        let again = EpochOrder::new(7, &tokens, 11);
        assert_eq!(again.at(total + 5), order.at(total + 5));
    }

    #[test]
    fn consecutive_positions_read_few_shards() {
        let tokens = vec![1_000u64; 64];
        let order = EpochOrder::new(3, &tokens, 10);
        for start in (0..order.sequences()).step_by(32) {
            let mut shards: Vec<usize> = (start..start + 32).map(|p| order.at(p).shard).collect();
            shards.sort_unstable();
            shards.dedup();
            assert!(shards.len() <= 2 * SHARDS_PER_WINDOW, "{shards:?}");
        }
    }
}
