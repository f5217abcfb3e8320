//! The trainer's side of a dataloader stream: asks for the batches of consecutive steps and
//! hands them out in order, reconnecting — to wherever the dataloader now is — when the
//! stream breaks, so that a restarted dataloader costs a wait, never a skipped or repeated
//! batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lillm_proto::v1 as pb;
use pb::dataloader_client::DataloaderClient;
use tokio::runtime::Handle;

use crate::manifest::Split;
use crate::service::decode_tokens;
use crate::{Error, Result};

/// Where the dataloader is now (asked again after every failure).
pub type Locate = Arc<dyn Fn() -> std::result::Result<String, String> + Send + Sync>;

/// What every batch of one stream shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamShape {
    pub seed: u64,
    pub split: Split,
    pub micro_start: u32,
    pub micro_count: u32,
    pub micros_per_step: u32,
    pub rows: u32,
    pub seq_len: u32,
    pub prefetch: u32,
}

pub struct RemoteBatches {
    rt: Handle,
    locate: Locate,
    /// Give up after the dataloader has been unreachable this long.
    patience: Duration,
    shape: StreamShape,
    stream: Option<tonic::Streaming<pb::Batch>>,
    /// The (step, micro) the open stream delivers next.
    next: Option<(u64, u32)>,
}

async fn connect(
    address: &str,
) -> std::result::Result<DataloaderClient<tonic::transport::Channel>, String> {
    let channel = lillm_proto::client::channel(address)
        .await
        .map_err(|e| format!("dataloader: {e}"))?;
    Ok(DataloaderClient::new(channel).max_decoding_message_size(1 << 30))
}

/// The dataset a dataloader serves, retrying until `patience` runs out.
pub fn describe(rt: &Handle, locate: &Locate, patience: Duration) -> Result<pb::DatasetInfo> {
    retry(patience, "describe the dataset", || {
        let address = locate()?;
        rt.block_on(async {
            let mut client = connect(&address).await?;
            client
                .describe(pb::DescribeRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| format!("dataloader {address}: {}", s.message()))
        })
    })
}

/// Calls `attempt` until it succeeds or `patience` has passed since the first failure.
fn retry<T>(
    patience: Duration,
    what: &str,
    mut attempt: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut last_warned: Option<Instant> = None;
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() >= patience => {
                return Err(Error::Usage(format!(
                    "could not {what} for {:.0} s: {e}",
                    patience.as_secs_f64()
                )))
            }
            Err(e) => {
                if last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!("{e}; retrying");
                    last_warned = Some(Instant::now());
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl RemoteBatches {
    pub fn new(rt: Handle, locate: Locate, shape: StreamShape, patience: Duration) -> Self {
        Self {
            rt,
            locate,
            patience,
            shape,
            stream: None,
            next: None,
        }
    }

    fn successor(&self, (step, micro): (u64, u32)) -> (u64, u32) {
        match micro + 1 < self.shape.micro_start + self.shape.micro_count {
            true => (step, micro + 1),
            false => (step + 1, self.shape.micro_start),
        }
    }

    /// The windows (rows × (seq_len + 1) tokens) of micro-batch `micro` of `step`.
    pub fn windows(&mut self, step: u64, micro: u32) -> Result<Vec<i64>> {
        if self.next != Some((step, micro)) {
            // A jump (start, resume, evaluation round): ask for a stream from here. Streams
            // start at a step's first micro-batch.
            if micro != self.shape.micro_start {
                return Err(Error::Usage(format!(
                    "a batch stream cannot start at micro-batch {micro} of step {step}"
                )));
            }
            self.stream = None;
        }
        let shape = self.shape;
        let (rt, locate) = (self.rt.clone(), self.locate.clone());
        let mut stream = self.stream.take();
        let batch = retry(self.patience, "stream batches", || {
            if stream.is_none() {
                let address = locate()?;
                let request = pb::BatchRequest {
                    seed: shape.seed,
                    split: match shape.split {
                        Split::Train => pb::Split::Train,
                        Split::Val => pb::Split::Val,
                    } as i32,
                    start_step: step,
                    steps: 0,
                    micro_start: shape.micro_start,
                    micro_count: shape.micro_count,
                    micros_per_step: shape.micros_per_step,
                    rows: shape.rows,
                    seq_len: shape.seq_len,
                    prefetch: shape.prefetch,
                };
                stream = Some(rt.block_on(async {
                    let mut client = connect(&address).await?;
                    client
                        .stream_batches(request)
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|s| format!("dataloader {address}: {}", s.message()))
                })?);
            }
            let s = stream.as_mut().expect("opened above");
            match rt.block_on(s.message()) {
                Ok(Some(b)) => Ok(b),
                Ok(None) => {
                    stream = None;
                    Err("the dataloader ended the stream".to_string())
                }
                Err(status) => {
                    stream = None;
                    Err(format!("batch stream broke: {}", status.message()))
                }
            }
        })?;
        if (batch.step, batch.micro) != (step, micro) {
            return Err(Error::Usage(format!(
                "the dataloader sent step {} micro-batch {} where step {step} micro-batch {micro} was due",
                batch.step, batch.micro
            )));
        }
        let windows = decode_tokens(&batch.windows, batch.token_bytes)
            .filter(|w| w.len() == (shape.rows as usize) * (shape.seq_len as usize + 1))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "the dataloader sent a malformed batch for step {step} ({} bytes at {} bytes/token)",
                    batch.windows.len(),
                    batch.token_bytes
                ))
            })?;
        self.stream = stream;
        self.next = Some(self.successor((step, micro)));
        Ok(windows)
    }
}
