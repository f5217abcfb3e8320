//! Keys and values of many sequences decoded together (continuous batching): a fixed number
//! of slots, each holding one sequence at its own length. Live sequences occupy slots
//! `0..used`, so a decode step runs on one contiguous block; a finished sequence's slot is
//! refilled by the last one (moving one sequence's cache, once, when it leaves).

use tch::{Device, Kind, Tensor};

use crate::{KvCache, ModelConfig};

#[derive(Debug)]
pub struct SlotCache {
    /// Per layer: keys and values, shape (slots, kv_heads, max_seq_len, head_dim).
    layers: Vec<(Tensor, Tensor)>,
    /// Filled positions of each used slot.
    lens: Vec<usize>,
    slots: usize,
    capacity: usize,
}

impl SlotCache {
    pub fn new(cfg: &ModelConfig, slots: usize, kind: Kind, device: Device) -> Self {
        Self {
            layers: crate::kv_cache::zeroed_layers(cfg, slots, cfg.max_seq_len, kind, device),
            lens: Vec::with_capacity(slots),
            slots,
            capacity: cfg.max_seq_len,
        }
    }

    /// Slots holding a sequence (they are `0..used`).
    pub fn used(&self) -> usize {
        self.lens.len()
    }

    pub fn is_full(&self) -> bool {
        self.lens.len() == self.slots
    }

    /// Slots in all, used or free.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions each slot holds: the model's context length.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions filled in `slot`.
    pub fn len(&self, slot: usize) -> usize {
        self.lens[slot]
    }

    /// Positions still free in `slot` (the context length minus its length).
    pub fn remaining(&self, slot: usize) -> usize {
        self.capacity - self.lens[slot]
    }

    /// Moves the first `len` positions of row `row` of `cache` (a prefilled prompt) into
    /// the next free slot and returns that slot.
    ///
    /// # Panics
    /// If every slot is used (check [`Self::is_full`]), `len` exceeds what `cache` holds, or
    /// `cache` is not of this model.
    pub fn admit(&mut self, cache: &KvCache, row: usize, len: usize) -> usize {
        assert!(!self.is_full(), "no free slot");
        assert!(
            len <= cache.len(),
            "admitting {len} of {} positions",
            cache.len()
        );
        let slot = self.lens.len();
        let (row, len_i) = (row as i64, len as i64);
        for (i, (k, v)) in self.layers.iter_mut().enumerate() {
            let (ck, cv) = cache.layer_ref(i);
            k.narrow(0, slot as i64, 1)
                .narrow(2, 0, len_i)
                .copy_(&ck.narrow(0, row, 1).narrow(2, 0, len_i));
            v.narrow(0, slot as i64, 1)
                .narrow(2, 0, len_i)
                .copy_(&cv.narrow(0, row, 1).narrow(2, 0, len_i));
        }
        self.lens.push(len);
        slot
    }

    /// Frees `slot`. The sequence in the last used slot moves into it: returns that slot's
    /// old index (`None` when `slot` was the last), so the caller can renumber it.
    pub fn release(&mut self, slot: usize) -> Option<usize> {
        let last = self.lens.len() - 1;
        if slot == last {
            self.lens.pop();
            return None;
        }
        let len = self.lens[last] as i64;
        for (k, v) in &mut self.layers {
            for t in [k, v] {
                let moved = t.narrow(0, last as i64, 1).narrow(2, 0, len).copy();
                t.narrow(0, slot as i64, 1).narrow(2, 0, len).copy_(&moved);
            }
        }
        self.lens[slot] = self.lens[last];
        self.lens.pop();
        Some(last)
    }

    pub(crate) fn layer(&mut self, i: usize) -> (&mut Tensor, &mut Tensor) {
        let (k, v) = &mut self.layers[i];
        (k, v)
    }

    /// Every used slot took one more token (done by [`crate::LilLM::decode_slots`]; after
    /// [`crate::LilLM::decode_static`], by its caller).
    pub fn advance_all(&mut self) {
        for len in &mut self.lens {
            assert!(*len < self.capacity, "KV cache slot overflow");
            *len += 1;
        }
    }
}
