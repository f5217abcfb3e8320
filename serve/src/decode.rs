//! How the generation thread runs a decode step and a short prompt's prefill: eagerly on
//! the exact shapes (the CPU's way: nothing wasted on padding; arrivals prefilled together),
//! or on fixed shapes per bucket, each bucket captured once as a CUDA graph and replayed
//! (the GPU's way: one launch where eager work launches hundreds of small kernels from the
//! host, which would cost a 39M model milliseconds a token).
//!
//! A decode bucket of R rows decodes the used slots plus padding rows up to R, each row
//! attending over the whole context ([`LilLM::decode_static`]). A prefill bucket of L
//! positions prefills one prompt right-padded to L ([`LilLM::prefill_static`]) into its own
//! cache, from which the prompt's positions move into a slot; prompts that arrive together
//! replay it one after another. Prefill gets graphs too because on a GPU an eager prefill
//! costs as much host time as dozens of replayed decode steps: every arrival would stall the
//! running streams (inter-token p99) and wait itself (time to first token). A longer prompt
//! goes a chunk at a time through one graph per chunk start (`long_prefill`). Inputs are
//! copied into a bucket's own tensors, so every replay reads the memory the graph was
//! captured on. Every bucket is captured at start, into one shared memory pool (only one
//! runs at a time), before the first request is read: a request that arrives meanwhile
//! waits in the queue.

use lillm_cuda::{CudaGraph, GraphPool};
use lillm_model::{upload, KvCache, LilLM, SlotCache};
use tch::{Device, Kind, Tensor};

use crate::long_prefill::LongPrefill;

/// How decode steps run (`lillm serve --decode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// One forward over the used slots, launched op by op.
    Eager,
    /// The fixed-shape steps of the CUDA graphs, launched op by op (checks those steps
    /// where there is no GPU).
    Static,
    /// The fixed-shape steps captured as one CUDA graph per bucket.
    Graphs,
}

impl DecodeMode {
    /// Parses `auto|eager|static|graphs`: `auto` is graphs on CUDA when the model's decode
    /// step can be captured, eager elsewhere.
    pub fn parse(name: &str, device: Device, model: &LilLM) -> anyhow::Result<Self> {
        Ok(match name {
            "auto" if device.is_cuda() && model.is_capturable() => Self::Graphs,
            "auto" | "eager" => Self::Eager,
            "static" => Self::Static,
            "graphs" if !device.is_cuda() => anyhow::bail!(
                "--decode graphs needs a CUDA device (--device cuda), not {device:?}; use auto"
            ),
            "graphs" if !model.is_capturable() => anyhow::bail!(
                "--decode graphs: this model's decode step reads values back to the host (an \
                 MoE layer outside bf16, or whose sizes are not multiples of 16 bytes), which \
                 a CUDA graph cannot capture; use auto"
            ),
            "graphs" => Self::Graphs,
            other => anyhow::bail!("--decode must be auto, eager, static or graphs, not {other:?}"),
        })
    }
}

/// Runs decode steps and prefills as its mode says.
pub(crate) enum Decoder {
    Eager,
    Static {
        decode: Vec<Bucket>,
        prefill: Vec<PrefillBucket>,
        /// Prompts longer than the longest bucket, a chunk at a time (`None`: the context
        /// admits none).
        long: Option<LongPrefill>,
    },
}

/// A batch size's fixed-shape decode step: its input tensors and, once captured, its graph
/// and the logits each replay rewrites.
pub(crate) struct Bucket {
    rows: usize,
    /// (2, rows): the ids, then the positions, filled by one copy a step.
    inputs: Tensor,
    /// Views of `inputs`: (rows, 1) and (rows,).
    ids: Tensor,
    positions: Tensor,
    captured: Option<Replay>,
}

impl Bucket {
    fn new(rows: usize, device: Device) -> Self {
        let inputs = Tensor::zeros([2, rows as i64], (Kind::Int64, device));
        Self {
            rows,
            ids: inputs.get(0).view([rows as i64, 1]),
            positions: inputs.get(1),
            inputs,
            captured: None,
        }
    }
}

/// A prompt length's fixed-shape prefill: its inputs, its cache and, once captured, its
/// graph and the logits each replay rewrites.
pub(crate) struct PrefillBucket {
    len: usize,
    ids: Tensor,
    last: Tensor,
    cache: KvCache,
    captured: Option<Replay>,
}

/// A bucket's captured graph and the output each replay rewrites.
pub(crate) struct Replay {
    graph: CudaGraph,
    output: Tensor,
}

impl Replay {
    /// Captures `step` (after two warm-up runs: libtorch creates its cuBLAS workspaces and
    /// picks its kernels on the first calls, which a capture must not contain) into `pool`,
    /// which then names the pool the next capture shares.
    pub(crate) fn capture(
        device: Device,
        pool: &mut Option<GraphPool>,
        step: impl FnMut() -> Tensor,
    ) -> Result<Self, lillm_cuda::Error> {
        let (graph, output) = CudaGraph::capture(device, *pool, 2, step)?;
        *pool = Some(graph.pool());
        Ok(Self { graph, output })
    }

    /// The bucket's step: its replay when captured, else `eager`, the same work uncaptured.
    pub(crate) fn run(
        captured: &Option<Self>,
        eager: impl FnOnce() -> Tensor,
    ) -> Result<Tensor, lillm_cuda::Error> {
        match captured {
            Some(replay) => {
                replay.graph.replay()?;
                Ok(replay.output.shallow_clone())
            }
            None => Ok(eager()),
        }
    }
}

/// What setting up the decoder did, for the start-up report and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Captured {
    /// Buckets captured as CUDA graphs.
    pub graphs: usize,
    /// GPU memory the capture took (the graphs' pool).
    pub bytes: u64,
}

/// Buckets up to `most`: the powers of two from `least` below it, and itself.
pub(crate) fn bucket_sizes(least: usize, most: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..)
        .map(|p| least << p)
        .take_while(|&r| r < most)
        .collect();
    sizes.push(most);
    sizes
}

/// The shortest padded prompt: below it, prefill time hardly depends on the length.
const SHORTEST_PREFILL: usize = 16;

/// The prompt lengths the fixed-shape decoder prefills in buckets of their own, for prompts
/// of up to `longest_prompt` tokens in a context of `context` positions (a prompt leaves
/// room for at least one token).
pub(crate) fn prefill_lengths(longest_prompt: usize, context: usize) -> Vec<usize> {
    let longest = longest_prompt.min(context - 1);
    bucket_sizes(SHORTEST_PREFILL.min(longest).max(1), longest)
}

/// Bytes of the KV caches of the prefill buckets `mode` allocates at start, and of the one
/// long prompts are prefilled into (none eager).
pub fn prefill_cache_bytes(mode: DecodeMode, model: &LilLM, longest_prompt: usize) -> u64 {
    if mode == DecodeMode::Eager {
        return 0;
    }
    let cfg = model.config();
    let buckets: u64 = prefill_lengths(longest_prompt, cfg.max_seq_len)
        .into_iter()
        .map(|len| lillm_model::kv_cache_bytes(cfg, 1, len, model.compute_kind()))
        .sum();
    buckets + LongPrefill::cache_bytes(model, longest_prompt)
}

impl Decoder {
    /// The decoder for `mode`, prefilling prompts of up to `longest_prompt` tokens itself;
    /// with graphs, every bucket captured on `slots` (empty: the capture's warm-up writes
    /// only padding). A capture libtorch refuses falls back to eager work, with the reason
    /// in the error.
    pub(crate) fn new(
        mode: DecodeMode,
        model: &LilLM,
        slots: &mut SlotCache,
        longest_prompt: usize,
    ) -> (Self, Result<Captured, lillm_cuda::Error>) {
        let static_buckets = || {
            let device = model.device();
            let decode = bucket_sizes(1, slots.slots())
                .into_iter()
                .map(|rows| Bucket::new(rows, device))
                .collect();
            let prefill = prefill_lengths(longest_prompt, slots.capacity())
                .into_iter()
                .map(|len| PrefillBucket {
                    len,
                    ids: Tensor::zeros([1, len as i64], (Kind::Int64, device)),
                    last: Tensor::zeros([1], (Kind::Int64, device)),
                    cache: KvCache::with_capacity(
                        model.config(),
                        1,
                        len,
                        model.compute_kind(),
                        device,
                    ),
                    captured: None,
                })
                .collect();
            let long = LongPrefill::new(model, longest_prompt);
            Self::Static {
                decode,
                prefill,
                long,
            }
        };
        match mode {
            DecodeMode::Eager => (Self::Eager, Ok(Captured::default())),
            DecodeMode::Static => (static_buckets(), Ok(Captured::default())),
            DecodeMode::Graphs => {
                let mut decoder = static_buckets();
                match decoder.capture(model, slots) {
                    Ok(captured) => (decoder, Ok(captured)),
                    Err(e) => (Self::Eager, Err(e)),
                }
            }
        }
    }

    /// Whether prompts are prefilled one by one in [`Self::prefill`] (the eager decoder
    /// prefills the arrivals of a step together, `LilLM::prefill_rows`).
    pub(crate) fn prefills(&self) -> bool {
        matches!(self, Self::Static { .. })
    }

    /// Prefills `prompt` (at most the longest prompt of [`Self::new`]) in its bucket:
    /// returns its last position's logits (1, vocab) and the cache holding its positions.
    ///
    /// # Panics
    /// On the eager decoder (see [`Self::prefills`]) or a prompt longer than every bucket.
    pub(crate) fn prefill(
        &mut self,
        model: &LilLM,
        prompt: &[u32],
    ) -> Result<(Tensor, &KvCache), lillm_cuda::Error> {
        let Self::Static { prefill, .. } = self else {
            panic!("the eager decoder prefills the arrivals together");
        };
        let bucket = prefill
            .iter_mut()
            .find(|b| b.len >= prompt.len())
            .expect("a prefill bucket holds every short prompt");
        let mut ids = vec![0i64; bucket.len];
        for (id, &t) in ids.iter_mut().zip(prompt) {
            *id = t as i64;
        }
        let device = bucket.ids.device();
        bucket
            .ids
            .copy_(&upload(&ids, device).view([1, bucket.len as i64]));
        bucket
            .last
            .copy_(&upload(&[prompt.len() as i64 - 1], device));
        let (ids, last, cache) = (&bucket.ids, &bucket.last, &mut bucket.cache);
        let logits = Replay::run(&bucket.captured, || model.prefill_static(ids, last, cache))?;
        Ok((logits, &bucket.cache))
    }

    /// Prefills the chunk of a long `prompt` (longer than every bucket) that starts at `done`
    /// into the long prompts' cache ([`Self::long_cache`]); returns the logits (1, vocab) at
    /// its last token and where it ends.
    ///
    /// # Panics
    /// On the eager decoder, or when the context admits no long prompt.
    pub(crate) fn prefill_long(
        &mut self,
        model: &LilLM,
        prompt: &[u32],
        done: usize,
    ) -> Result<(Tensor, usize), lillm_cuda::Error> {
        self.long_mut().next_chunk(model, prompt, done)
    }

    /// The cache a long prompt's positions are in once [`Self::prefill_long`] is done.
    pub(crate) fn long_cache(&mut self) -> &KvCache {
        self.long_mut().cache()
    }

    fn long_mut(&mut self) -> &mut LongPrefill {
        match self {
            Self::Static {
                long: Some(long), ..
            } => long,
            _ => panic!("long prompts are prefilled by the fixed-shape decoder in a context that admits them"),
        }
    }

    /// One decode step: `tokens[i]` for used slot `i`; returns their logits (used, vocab)
    /// and advances the slots.
    pub(crate) fn step(
        &mut self,
        model: &LilLM,
        tokens: &[u32],
        slots: &mut SlotCache,
    ) -> Result<Tensor, lillm_cuda::Error> {
        let buckets = match self {
            Self::Eager => return Ok(model.decode_slots(tokens, slots)),
            Self::Static { decode, .. } => decode,
        };
        let used = tokens.len();
        let bucket = buckets
            .iter_mut()
            .find(|b| b.rows >= used)
            .expect("the largest bucket holds every slot");
        // Padding rows: token 0 at position 0.
        let mut inputs = vec![0i64; 2 * bucket.rows];
        let (ids, positions) = inputs.split_at_mut(bucket.rows);
        for (i, &token) in tokens.iter().enumerate() {
            (ids[i], positions[i]) = (token as i64, slots.len(i) as i64);
        }
        let device = bucket.inputs.device();
        bucket
            .inputs
            .copy_(&upload(&inputs, device).view([2, bucket.rows as i64]));
        let (ids, positions) = (&bucket.ids, &bucket.positions);
        let logits = Replay::run(&bucket.captured, || {
            model.decode_static(ids, positions, slots)
        })?;
        slots.advance_all();
        Ok(logits.narrow(0, 0, used as i64))
    }

    /// Captures every bucket, the largest first, into one pool.
    fn capture(
        &mut self,
        model: &LilLM,
        slots: &mut SlotCache,
    ) -> Result<Captured, lillm_cuda::Error> {
        let Self::Static {
            decode,
            prefill,
            long,
        } = self
        else {
            return Ok(Captured::default());
        };
        let device = model.device();
        let before = lillm_cuda::cuda_reserved(device).unwrap_or(0);
        let mut pool = None;
        for bucket in decode.iter_mut().rev() {
            let (ids, positions) = (&bucket.ids, &bucket.positions);
            let step = || model.decode_static(ids, positions, slots);
            bucket.captured = Some(Replay::capture(device, &mut pool, step)?);
        }
        for bucket in prefill.iter_mut().rev() {
            let (ids, last, cache) = (&bucket.ids, &bucket.last, &mut bucket.cache);
            let step = || model.prefill_static(ids, last, cache);
            bucket.captured = Some(Replay::capture(device, &mut pool, step)?);
        }
        let chunks = match long {
            Some(long) => long.capture(model, &mut pool)?,
            None => 0,
        };
        let after = lillm_cuda::cuda_reserved(device).unwrap_or(0);
        Ok(Captured {
            graphs: decode.len() + prefill.len() + chunks,
            bytes: after.saturating_sub(before),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_up_to_the_most_and_end_there() {
        assert_eq!(bucket_sizes(1, 1), vec![1]);
        assert_eq!(bucket_sizes(1, 8), vec![1, 2, 4, 8]);
        assert_eq!(bucket_sizes(1, 12), vec![1, 2, 4, 8, 12]);
        assert_eq!(bucket_sizes(1, 32), vec![1, 2, 4, 8, 16, 32]);
        // Prompt lengths: from 16 up to the longest short prompt.
        assert_eq!(bucket_sizes(16, 128), vec![16, 32, 64, 128]);
        assert_eq!(bucket_sizes(16, 31), vec![16, 31]);
    }
}
