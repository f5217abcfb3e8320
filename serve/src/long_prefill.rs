//! A long prompt's prefill on fixed shapes, for the fixed-shape decoder: chunks of `chunk`
//! tokens at fixed starts (0, chunk, 2·chunk, …) into one cache of the whole context, the
//! last chunk right-padded, one CUDA graph per start ([`LilLM::prefill_from`]). The
//! generator runs one chunk between two decode steps, so on a GPU a long prompt costs the
//! running streams a replay per step instead of an eager chunk's hundreds of launches.
//! Only one long prompt is prefilled at a time, so one cache serves them all; a chunk whose
//! padded end would pass the context (a context that is not a whole number of chunks) runs
//! eagerly on its exact length.

use lillm_cuda::GraphPool;
use lillm_model::{upload, KvCache, LilLM};
use tch::{Kind, Tensor};

use crate::decode::Replay;

pub(crate) struct LongPrefill {
    chunk: usize,
    ids: Tensor,
    last: Tensor,
    cache: KvCache,
    /// Every chunk start whose whole chunk fits the context.
    starts: Vec<ChunkStart>,
}

/// A chunk start and, once captured, its graph.
struct ChunkStart {
    start: usize,
    captured: Option<Replay>,
}

impl LongPrefill {
    /// For the prompts longer than `chunk` tokens that `model`'s context admits; `None`
    /// when it admits none (a prompt leaves room for one token).
    pub(crate) fn new(model: &LilLM, chunk: usize) -> Option<Self> {
        let context = model.config().max_seq_len;
        if !admits_long(context, chunk) {
            return None;
        }
        let device = model.device();
        let starts = (0..)
            .map(|k| k * chunk)
            .take_while(|start| start + chunk <= context)
            .map(|start| ChunkStart {
                start,
                captured: None,
            })
            .collect();
        Some(Self {
            chunk,
            ids: Tensor::zeros([1, chunk as i64], (Kind::Int64, device)),
            last: Tensor::zeros([1], (Kind::Int64, device)),
            cache: KvCache::new(model.config(), 1, model.compute_kind(), device),
            starts,
        })
    }

    /// Bytes of its cache (one sequence of the whole context).
    pub(crate) fn cache_bytes(model: &LilLM, chunk: usize) -> u64 {
        let cfg = model.config();
        match admits_long(cfg.max_seq_len, chunk) {
            true => lillm_model::kv_cache_bytes(cfg, 1, cfg.max_seq_len, model.compute_kind()),
            false => 0,
        }
    }

    /// Prefills the chunk of `prompt` that starts at `done` (0 or the end of the previous
    /// chunk); returns the logits (1, vocab) at its last token and where it ends.
    pub(crate) fn next_chunk(
        &mut self,
        model: &LilLM,
        prompt: &[u32],
        done: usize,
    ) -> Result<(Tensor, usize), lillm_cuda::Error> {
        let end = (done + self.chunk).min(prompt.len());
        let Some(at) = self.starts.iter().find(|s| s.start == done) else {
            self.cache.set_filled(done);
            return Ok(exact_chunk(
                model,
                prompt,
                done,
                self.chunk,
                &mut self.cache,
            ));
        };
        let mut ids = vec![0i64; self.chunk];
        for (id, &t) in ids.iter_mut().zip(&prompt[done..end]) {
            *id = t as i64;
        }
        let device = self.ids.device();
        self.ids
            .copy_(&upload(&ids, device).view([1, self.chunk as i64]));
        self.last.copy_(&upload(&[(end - done) as i64 - 1], device));
        let (ids, last, cache) = (&self.ids, &self.last, &mut self.cache);
        let logits = Replay::run(&at.captured, || model.prefill_from(ids, done, last, cache))?;
        // A replay writes the cache without telling it.
        self.cache.set_filled(end);
        Ok((logits, end))
    }

    /// The cache holding the prompt's positions once its last chunk is done.
    pub(crate) fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Captures every chunk start into `pool`; returns how many.
    pub(crate) fn capture(
        &mut self,
        model: &LilLM,
        pool: &mut Option<GraphPool>,
    ) -> Result<usize, lillm_cuda::Error> {
        let (ids, last, cache) = (&self.ids, &self.last, &mut self.cache);
        for at in self.starts.iter_mut().rev() {
            let start = at.start;
            let step = || model.prefill_from(ids, start, last, cache);
            at.captured = Some(Replay::capture(model.device(), pool, step)?);
        }
        Ok(self.starts.len())
    }
}

/// Whether a context of `context` positions admits prompts longer than `chunk` tokens (a
/// prompt leaves room for one token).
fn admits_long(context: usize, chunk: usize) -> bool {
    context > chunk + 1
}

/// The chunk of `prompt` at `done` (at most `chunk` tokens), on its exact length, through
/// `cache` (which holds the first `done` positions); returns the logits (1, vocab) at its
/// last token and where it ends.
pub(crate) fn exact_chunk(
    model: &LilLM,
    prompt: &[u32],
    done: usize,
    chunk: usize,
    cache: &mut KvCache,
) -> (Tensor, usize) {
    let end = (done + chunk).min(prompt.len());
    let ids: Vec<i64> = prompt[done..end].iter().map(|&t| t as i64).collect();
    let tokens = upload(&ids, model.device()).view([1, -1]);
    (model.forward_cached(&tokens, cache), end)
}
