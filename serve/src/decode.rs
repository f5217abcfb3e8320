//! How the generation thread runs a decode step: eagerly on the used slots (the CPU's way:
//! nothing wasted on padding), or on fixed shapes per batch-size bucket, each bucket's step
//! captured once as a CUDA graph and replayed (the GPU's way: one launch per step where
//! eager decoding launches hundreds of small kernels from the host).
//!
//! A bucket of R rows decodes the used slots plus padding rows up to R, each row attending
//! over the whole context ([`LilLM::decode_static`]); inputs are copied into the bucket's
//! own tensors, so every replay reads the memory the graph was captured on. Buckets are
//! captured at start, largest first, into one shared memory pool (only one runs at a time),
//! before the first request is read: a request that arrives meanwhile waits in the queue.
//! Prefill stays eager: prompts vary in length and run once each, where a decode step runs
//! once per token of every reply.

use lillm_cuda::{CudaGraph, GraphPool};
use lillm_model::{LilLM, SlotCache};
use tch::{Device, Kind, Tensor};

/// How decode steps run (`lillm serve --decode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// One forward over the used slots, launched op by op.
    Eager,
    /// The fixed-shape step of the CUDA graphs, launched op by op (checks that step where
    /// there is no GPU).
    Static,
    /// The fixed-shape step captured as one CUDA graph per bucket.
    Graphs,
}

impl DecodeMode {
    /// Parses `auto|eager|static|graphs`: `auto` is graphs on CUDA when the model's decode
    /// step can be captured, eager elsewhere.
    pub fn parse(name: &str, device: Device, model: &LilLM) -> anyhow::Result<Self> {
        Ok(match name {
            "auto" if device.is_cuda() && model.decode_is_capturable() => Self::Graphs,
            "auto" | "eager" => Self::Eager,
            "static" => Self::Static,
            "graphs" if !device.is_cuda() => anyhow::bail!(
                "--decode graphs needs a CUDA device (--device cuda), not {device:?}; use auto"
            ),
            "graphs" if !model.decode_is_capturable() => anyhow::bail!(
                "--decode graphs: this model's decode step reads values back to the host (an \
                 MoE layer outside bf16, or whose sizes are not multiples of 16 bytes), which \
                 a CUDA graph cannot capture; use auto"
            ),
            "graphs" => Self::Graphs,
            other => anyhow::bail!("--decode must be auto, eager, static or graphs, not {other:?}"),
        })
    }
}

/// Runs decode steps as its mode says.
pub(crate) enum Decoder {
    Eager,
    Static(Vec<Bucket>),
}

/// A batch size's fixed-shape step: its input tensors and, once captured, its graph and the
/// logits each replay rewrites.
pub(crate) struct Bucket {
    rows: usize,
    ids: Tensor,
    positions: Tensor,
    captured: Option<(CudaGraph, Tensor)>,
}

/// What setting up the decoder did, for the start-up report and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Captured {
    /// Buckets captured as CUDA graphs.
    pub graphs: usize,
    /// GPU memory the capture took (the graphs' pool).
    pub bytes: u64,
}

/// Batch-size buckets up to `max_batch`: the powers of two below it, and itself.
pub(crate) fn bucket_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = (0..)
        .map(|p| 1usize << p)
        .take_while(|&r| r < max_batch)
        .collect();
    sizes.push(max_batch);
    sizes
}

impl Decoder {
    /// The decoder for `mode`; with graphs, every bucket captured on `slots` (empty: the
    /// capture's warm-up writes only padding). A capture libtorch refuses falls back to the
    /// eager step, with the reason in the error.
    pub(crate) fn new(
        mode: DecodeMode,
        model: &LilLM,
        slots: &mut SlotCache,
    ) -> (Self, Result<Captured, lillm_cuda::Error>) {
        let static_buckets = || -> Vec<Bucket> {
            let device = model.device();
            bucket_sizes(slots.slots())
                .into_iter()
                .map(|rows| Bucket {
                    rows,
                    ids: Tensor::zeros([rows as i64, 1], (Kind::Int64, device)),
                    positions: Tensor::zeros([rows as i64], (Kind::Int64, device)),
                    captured: None,
                })
                .collect()
        };
        match mode {
            DecodeMode::Eager => (Self::Eager, Ok(Captured::default())),
            DecodeMode::Static => (Self::Static(static_buckets()), Ok(Captured::default())),
            DecodeMode::Graphs => {
                let mut buckets = static_buckets();
                match capture(&mut buckets, model, slots) {
                    Ok(captured) => (Self::Static(buckets), Ok(captured)),
                    Err(e) => (Self::Eager, Err(e)),
                }
            }
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
            Self::Static(buckets) => buckets,
        };
        let used = tokens.len();
        let bucket = buckets
            .iter_mut()
            .find(|b| b.rows >= used)
            .expect("the largest bucket holds every slot");
        let (mut ids, mut positions) = (vec![0i64; bucket.rows], vec![0i64; bucket.rows]);
        for (i, &token) in tokens.iter().enumerate() {
            (ids[i], positions[i]) = (token as i64, slots.len(i) as i64);
        }
        bucket
            .ids
            .copy_(&Tensor::from_slice(&ids).view([bucket.rows as i64, 1]));
        bucket.positions.copy_(&Tensor::from_slice(&positions));
        let logits = match &bucket.captured {
            Some((graph, logits)) => {
                graph.replay()?;
                logits.shallow_clone()
            }
            None => model.decode_static(&bucket.ids, &bucket.positions, slots),
        };
        slots.advance_all();
        Ok(logits.narrow(0, 0, used as i64))
    }
}

/// Captures every bucket, largest first, into one pool.
fn capture(
    buckets: &mut [Bucket],
    model: &LilLM,
    slots: &mut SlotCache,
) -> Result<Captured, lillm_cuda::Error> {
    let device = model.device();
    let before = lillm_cuda::cuda_reserved(device).unwrap_or(0);
    let mut pool: Option<GraphPool> = None;
    for bucket in buckets.iter_mut().rev() {
        let (ids, positions) = (&bucket.ids, &bucket.positions);
        // Two warm-up runs: libtorch creates its cuBLAS workspaces and picks its kernels
        // on the first calls, which a capture must not contain.
        let (graph, logits) = CudaGraph::capture(device, pool, 2, || {
            model.decode_static(ids, positions, slots)
        })?;
        pool = Some(graph.pool());
        bucket.captured = Some((graph, logits));
    }
    let after = lillm_cuda::cuda_reserved(device).unwrap_or(0);
    Ok(Captured {
        graphs: buckets.len(),
        bytes: after.saturating_sub(before),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_the_powers_of_two_below_the_batch_and_the_batch() {
        assert_eq!(bucket_sizes(1), vec![1]);
        assert_eq!(bucket_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(bucket_sizes(12), vec![1, 2, 4, 8, 12]);
        assert_eq!(bucket_sizes(32), vec![1, 2, 4, 8, 16, 32]);
    }
}
