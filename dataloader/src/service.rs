//! The dataloader actor's gRPC service: streams the windows of consecutive steps from a
//! memory-mapped dataset, produced at most `prefetch` batches ahead of the reader.

use std::sync::Arc;

use lillm_proto::v1 as pb;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use lillm_data::epochs::DataOrder;
use lillm_data::manifest::{Split, TokenDtype};
use lillm_data::shards::{train_windows, BatchKey, Dataset};

use crate::holdings::Holdings;

/// Default number of batches produced ahead of the reader.
pub const DEFAULT_PREFETCH: u32 = 4;

pub struct DataloaderService {
    holdings: Arc<Holdings>,
    /// Ends every open stream (with UNAVAILABLE, so trainers reconnect elsewhere).
    shutdown: CancellationToken,
}

impl DataloaderService {
    pub fn new(holdings: Arc<Holdings>, shutdown: CancellationToken) -> Self {
        Self { holdings, shutdown }
    }
}

/// Sequences one `ReadSequences` may ask for.
const MAX_SEQUENCES: usize = 1 << 16;

/// Reads the sequences `r` names from `data`'s train split: refused whole when the request
/// is malformed or names a shard this dataloader does not hold.
pub fn read_sequences(r: &pb::SequencesRequest, data: &Dataset) -> Result<pb::Sequences, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if r.shards.len() != r.indices.len() {
        return bad(format!(
            "{} shards but {} indices; send one of each per sequence",
            r.shards.len(),
            r.indices.len()
        ));
    }
    if r.shards.len() > MAX_SEQUENCES || r.seq_len < 2 {
        return bad(format!(
            "ask for 1 to {MAX_SEQUENCES} sequences of at least 2 tokens (got {} of {})",
            r.shards.len(),
            r.seq_len
        ));
    }
    let stream = data.split(Split::Train);
    let shard_tokens = stream.shard_tokens();
    for (&shard, &index) in r.shards.iter().zip(&r.indices) {
        let Some(&tokens) = shard_tokens.get(shard as usize) else {
            return bad(format!(
                "train shard {shard} does not exist (the dataset has {})",
                shard_tokens.len()
            ));
        };
        if (index + 1).saturating_mul(r.seq_len as u64) > tokens {
            return bad(format!(
                "sequence {index} of {} tokens is past the end of train shard {shard} ({tokens} tokens)",
                r.seq_len
            ));
        }
        if !stream.holds(shard as usize) {
            return Err(Status::unavailable(format!(
                "train shard {shard} is not on this dataloader; ask the coordinator where it is placed now"
            )));
        }
    }
    let mut tokens = vec![0i64; r.shards.len() * r.seq_len as usize];
    for ((&shard, &index), out) in r
        .shards
        .iter()
        .zip(&r.indices)
        .zip(tokens.chunks_mut(r.seq_len as usize))
    {
        stream.read_sequence(shard as usize, index, out);
    }
    let dtype = data.manifest.dtype;
    Ok(pb::Sequences {
        token_bytes: dtype.bytes() as u32,
        tokens: encode_tokens(&tokens, dtype),
    })
}

pub fn split_of(raw: i32) -> Result<Split, Status> {
    match pb::Split::try_from(raw) {
        Ok(pb::Split::Train) => Ok(Split::Train),
        Ok(pb::Split::Val) => Ok(Split::Val),
        Err(_) => Err(Status::invalid_argument(format!(
            "`split` is {raw}; use SPLIT_TRAIN or SPLIT_VAL"
        ))),
    }
}

/// Packs tokens little-endian at the dataset's width.
pub fn encode_tokens(tokens: &[i64], dtype: TokenDtype) -> Vec<u8> {
    match dtype {
        TokenDtype::U16 => tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect(),
        TokenDtype::U32 => tokens
            .iter()
            .flat_map(|&t| (t as u32).to_le_bytes())
            .collect(),
    }
}

/// Unpacks what [`encode_tokens`] packed.
pub fn decode_tokens(bytes: &[u8], token_bytes: u32) -> Option<Vec<i64>> {
    match token_bytes {
        2 if bytes.len().is_multiple_of(2) => Some(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as i64)
                .collect(),
        ),
        4 if bytes.len().is_multiple_of(4) => Some(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
        ),
        _ => None,
    }
}

fn check_request(r: &pb::BatchRequest, data: &Dataset) -> Result<(Split, DataOrder), Status> {
    let split = split_of(r.split)?;
    let order = match pb::DataOrder::try_from(r.order) {
        Ok(pb::DataOrder::Random) => DataOrder::Random,
        Ok(pb::DataOrder::Epochs) => DataOrder::Epochs,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "`order` is {}; use DATA_ORDER_RANDOM or DATA_ORDER_EPOCHS",
                r.order
            )))
        }
    };
    let bad = |m: String| Err(Status::invalid_argument(m));
    if r.rows == 0 || r.seq_len == 0 {
        return bad(format!(
            "rows ({}) and seq_len ({}) must both be at least 1",
            r.rows, r.seq_len
        ));
    }
    if r.micros_per_step == 0 || r.micro_count == 0 {
        return bad("micros_per_step and micro_count must be at least 1".into());
    }
    if r.micro_start as u64 + r.micro_count as u64 > r.micros_per_step as u64 {
        return bad(format!(
            "micro-batches {}..{} do not fit in {} per step",
            r.micro_start,
            r.micro_start + r.micro_count,
            r.micros_per_step
        ));
    }
    let tokens = data.split(split).len();
    if tokens < r.seq_len as u64 + 1 {
        return bad(format!(
            "the {} split has {tokens} tokens, fewer than seq_len + 1 = {}",
            split.name(),
            r.seq_len + 1
        ));
    }
    if order == DataOrder::Epochs && split == Split::Train {
        data.epoch_order(r.seed, r.seq_len as u64 + 1)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
    }
    Ok((split, order))
}

/// Batches a stream produces ahead of its reader: `prefetch`, 0 meaning the default,
/// at most 1,024.
fn prefetch_of(r: &pb::BatchRequest) -> usize {
    let batches = match r.prefetch {
        0 => DEFAULT_PREFETCH,
        n => n.min(1024),
    };
    batches as usize
}

/// The (step, micro-batch) pairs a stream sends, in order: `steps` steps from `start_step`
/// (0: until the reader hangs up), each with micro-batches `micro_start..+micro_count`.
fn stream_positions(r: &pb::BatchRequest) -> impl Iterator<Item = (u64, u32)> {
    let end = match r.steps {
        0 => u64::MAX,
        n => r.start_step.saturating_add(n),
    };
    let micros = r.micro_start..r.micro_start + r.micro_count;
    (r.start_step..end).flat_map(move |step| micros.clone().map(move |micro| (step, micro)))
}

/// Micro-batch `micro` of `step`: its windows, packed at the dataset's width.
fn make_batch(
    data: &Dataset,
    r: &pb::BatchRequest,
    split: Split,
    order: DataOrder,
    step: u64,
    micro: u32,
) -> Result<pb::Batch, Status> {
    let key = BatchKey {
        seed: r.seed,
        split,
        step,
        micro: micro as u64,
    };
    let windows = train_windows(
        data,
        order,
        key,
        r.micros_per_step as u64,
        r.rows as usize,
        r.seq_len as usize,
    )
    .map_err(|e| Status::internal(e.to_string()))?;
    Ok(pb::Batch {
        step,
        micro,
        rows: r.rows,
        seq_len: r.seq_len,
        token_bytes: data.manifest.dtype.bytes() as u32,
        windows: encode_tokens(&windows, data.manifest.dtype),
    })
}

/// Forwards produced batches to the reader until it leaves or the dataloader shuts down
/// (the reader then gets UNAVAILABLE, to reconnect elsewhere); either way the producer's
/// next send fails and it stops too.
async fn forward_until_shutdown(
    mut produced: tokio::sync::mpsc::Receiver<Result<pb::Batch, Status>>,
    out: tokio::sync::mpsc::Sender<Result<pb::Batch, Status>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let bye = Status::unavailable("the dataloader is shutting down; reconnect");
                let _ = out.try_send(Err(bye));
                return;
            }
            item = produced.recv() => {
                let Some(item) = item else { return };
                if out.send(item).await.is_err() {
                    return;
                }
            }
        }
    }
}

type BatchStream = ReceiverStream<Result<pb::Batch, Status>>;

#[tonic::async_trait]
impl pb::dataloader_server::Dataloader for DataloaderService {
    async fn describe(
        &self,
        _request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let data = self.holdings.current();
        let m = &data.manifest;
        let tokenizer_json =
            std::fs::read_to_string(data.dir.join("tokenizer.json")).unwrap_or_default();
        Ok(Response::new(pb::DatasetInfo {
            tokenizer_fingerprint: m.tokenizer_fingerprint.clone(),
            vocab_size: m.vocab_size as u32,
            train_tokens: m.tokens(Split::Train),
            val_tokens: m.tokens(Split::Val),
            tokenizer_json,
            train_shard_tokens: data.split(Split::Train).shard_tokens(),
        }))
    }

    async fn read_sequences(
        &self,
        request: Request<pb::SequencesRequest>,
    ) -> Result<Response<pb::Sequences>, Status> {
        let data = self.holdings.current();
        let r = request.into_inner();
        // Reads of memory-mapped shards may wait for the disk: off the async workers.
        tokio::task::spawn_blocking(move || read_sequences(&r, &data))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Response::new)
    }

    type StreamBatchesStream = BatchStream;

    async fn stream_batches(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> Result<Response<BatchStream>, Status> {
        let r = request.into_inner();
        // A stream of the train split reads anywhere in it: it needs every shard.
        if r.split == pb::Split::Train as i32 {
            self.holdings
                .hold_all()
                .await
                .map_err(|e| Status::unavailable(format!("{e:#}")))?;
        }
        let data = self.holdings.current();
        let (split, order) = check_request(&r, &data)?;
        // The bounded channel is the backpressure: the producer blocks once `prefetch`
        // batches wait unread.
        let (tx, produced) = tokio::sync::mpsc::channel(prefetch_of(&r));
        tokio::task::spawn_blocking(move || {
            for (step, micro) in stream_positions(&r) {
                let batch = make_batch(&data, &r, split, order, step, micro);
                if tx.blocking_send(batch).is_err() {
                    return; // The reader hung up.
                }
            }
        });
        let (out, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(forward_until_shutdown(produced, out, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        start_step: u64,
        steps: u64,
        micro_start: u32,
        micro_count: u32,
    ) -> pb::BatchRequest {
        pb::BatchRequest {
            start_step,
            steps,
            micro_start,
            micro_count,
            micros_per_step: 4,
            ..Default::default()
        }
    }

    #[test]
    fn a_stream_sends_its_micro_batches_of_each_step_in_order() {
        let sent: Vec<_> = stream_positions(&request(7, 2, 1, 2)).collect();
        assert_eq!(sent, [(7, 1), (7, 2), (8, 1), (8, 2)]);
    }

    #[test]
    fn a_stream_of_zero_steps_goes_on_until_the_reader_leaves() {
        let sent: Vec<_> = stream_positions(&request(3, 0, 0, 2)).take(1000).collect();
        assert_eq!(sent.len(), 1000);
        assert_eq!(sent[999], (3 + 499, 1));
    }

    #[test]
    fn prefetch_is_the_default_when_unset_and_capped() {
        let mut r = request(0, 1, 0, 1);
        assert_eq!(prefetch_of(&r), DEFAULT_PREFETCH as usize);
        r.prefetch = 16;
        assert_eq!(prefetch_of(&r), 16);
        r.prefetch = 1 << 20;
        assert_eq!(prefetch_of(&r), 1024);
    }
}
