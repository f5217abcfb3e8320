//! Key/value cache for incremental decoding, passed explicitly to the model.

use tch::{Device, Kind, Tensor};

use crate::ModelConfig;

/// Zeroed keys and values for every layer, shape (rows, kv_heads, positions, head_dim).
/// Bytes of the keys and values of `rows` sequences of `positions` each, in every layer of
/// `cfg`, stored as `kind`: what [`zeroed_layers`] allocates.
pub fn kv_cache_bytes(cfg: &ModelConfig, rows: usize, positions: usize, kind: Kind) -> u64 {
    let per_layer = rows * cfg.kv_heads * positions * cfg.head_dim();
    (2 * cfg.n_layers * per_layer * kind.elt_size_in_bytes()) as u64
}

pub(crate) fn zeroed_layers(
    cfg: &ModelConfig,
    rows: usize,
    positions: usize,
    kind: Kind,
    device: Device,
) -> Vec<(Tensor, Tensor)> {
    let shape = [
        rows as i64,
        cfg.kv_heads as i64,
        positions as i64,
        cfg.head_dim() as i64,
    ];
    (0..cfg.n_layers)
        .map(|_| {
            (
                Tensor::zeros(shape, (kind, device)),
                Tensor::zeros(shape, (kind, device)),
            )
        })
        .collect()
}

/// Keys and values of every layer for positions `0..len`, preallocated to `max_seq_len`.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, batch: usize, kind: Kind, device: Device) -> Self {
        Self::with_capacity(cfg, batch, cfg.max_seq_len, kind, device)
    }

    /// A cache of `positions` (at most the context) instead of the whole context: for
    /// prefilling prompts that then move into a [`crate::SlotCache`].
    pub fn with_capacity(
        cfg: &ModelConfig,
        batch: usize,
        positions: usize,
        kind: Kind,
        device: Device,
    ) -> Self {
        let capacity = positions.min(cfg.max_seq_len);
        Self {
            layers: zeroed_layers(cfg, batch, capacity, kind, device),
            len: 0,
            capacity,
        }
    }

    /// Positions already filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions still free (the model's context length minus `len`).
    pub fn remaining(&self) -> usize {
        self.capacity - self.len
    }

    /// Forgets every position, keeping the allocation.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Says that the first `len` positions hold the sequence: fewer forgets the rest, more
    /// takes what work the cache does not track wrote there (a CUDA graph's replay).
    ///
    /// # Panics
    /// If `len` is past the capacity.
    pub fn set_filled(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "KV cache overflow: {len} > {}",
            self.capacity
        );
        self.len = len;
    }

    pub(crate) fn layer(&mut self, i: usize) -> (&mut Tensor, &mut Tensor) {
        let (k, v) = &mut self.layers[i];
        (k, v)
    }

    pub(crate) fn layer_ref(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }

    pub(crate) fn advance(&mut self, tokens: usize) {
        assert!(
            self.len + tokens <= self.capacity,
            "KV cache overflow: {} + {tokens} > {}",
            self.len,
            self.capacity
        );
        self.len += tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_count_is_what_the_cache_allocates() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let allocated: usize = zeroed_layers(&cfg, 3, cfg.max_seq_len, Kind::BFloat16, Device::Cpu)
            .iter()
            .map(|(k, v)| (k.numel() + v.numel()) * 2)
            .sum();
        // keys and values × layers × slots × kv heads × context × head dim × 2 bytes
        let by_hand = 2 * cfg.n_layers * 3 * cfg.kv_heads * cfg.max_seq_len * cfg.head_dim() * 2;
        assert_eq!(allocated, by_hand);
        let counted = kv_cache_bytes(&cfg, 3, cfg.max_seq_len, Kind::BFloat16);
        assert_eq!(counted, by_hand as u64);
    }
}
