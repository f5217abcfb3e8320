//! The trainer's side of a dataloader stream: asks for the batches of consecutive steps and
//! hands them out in order, reconnecting — to wherever the dataloader now is — when the
//! stream breaks, so that a restarted dataloader costs a wait, never a skipped or repeated
//! batch. Retries follow the one policy of [`lillm_proto::net`].

use lillm_proto::client::CoordinatorClient;
use lillm_proto::net::{self, ConnectSettings, NetError, RetryPolicy};
use lillm_proto::v1 as pb;
use pb::dataloader_client::DataloaderClient;
use tokio::runtime::Handle;
use tonic::transport::Channel;

use crate::service::decode_tokens;
use crate::{Error, Result};
use lillm_data::epochs::DataOrder;
use lillm_data::manifest::Split;

/// Where a trainer's dataloader is.
#[derive(Clone)]
pub enum Locate {
    /// Always this address (benchmarks, tools).
    Fixed(String),
    /// The assigned address first; after a failure, whatever the coordinator now lists for
    /// dataloader `index` (it may have restarted elsewhere).
    Coordinator {
        client: CoordinatorClient,
        job_token: String,
        index: u32,
        assigned: String,
    },
}

impl Locate {
    /// The address to dial; `after_failure` asks the coordinator again.
    async fn address(&self, settings: &ConnectSettings, after_failure: bool) -> Result<String> {
        match self {
            Locate::Fixed(address) => Ok(address.clone()),
            Locate::Coordinator { assigned, .. } if !after_failure => Ok(assigned.clone()),
            Locate::Coordinator {
                client,
                job_token,
                index,
                ..
            } => {
                let mut client = client.clone();
                let request = pb::LocateDataloaderRequest {
                    job_token: job_token.clone(),
                    dataloader_index: *index,
                };
                let found = net::call(
                    "the coordinator",
                    settings,
                    client.locate_dataloader(request),
                )
                .await?;
                Ok(found.address)
            }
        }
    }
}

/// How a trainer reaches its dataloader: where, how to dial, how long to retry.
#[derive(Clone)]
pub struct StreamSource {
    pub locate: Locate,
    pub settings: ConnectSettings,
    pub policy: RetryPolicy,
}

impl StreamSource {
    async fn client(&self, after_failure: bool) -> Result<(String, DataloaderClient<Channel>)> {
        let address = self.locate.address(&self.settings, after_failure).await?;
        let channel = net::connect(&address, &self.settings).await?;
        Ok((
            address,
            DataloaderClient::new(channel).max_decoding_message_size(1 << 30),
        ))
    }

    /// The dataset the dataloader serves.
    pub async fn describe(&self) -> Result<pb::DatasetInfo> {
        let mut failed = false;
        let info = self
            .policy
            .run("ask the dataloader what it serves", || {
                let after_failure = std::mem::replace(&mut failed, true);
                async move {
                    let (address, mut client) =
                        self.client(after_failure).await.map_err(net_error)?;
                    net::call(
                        &address,
                        &self.settings,
                        client.describe(pb::DescribeRequest {}),
                    )
                    .await
                }
            })
            .await?;
        Ok(info)
    }

    /// Opens a stream starting at `step` and reads its first batch.
    async fn open(
        &self,
        request: pb::BatchRequest,
        after_failure: bool,
    ) -> std::result::Result<(tonic::Streaming<pb::Batch>, pb::Batch), NetError> {
        let (address, mut client) = self.client(after_failure).await.map_err(net_error)?;
        let mut stream = client
            .stream_batches(request)
            .await
            .map_err(|s| NetError::status(&address, s))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| NetError::status(&address, s))?
            .ok_or(NetError::StreamEnded { peer: address })?;
        Ok((stream, first))
    }
}

/// Network errors pass through; anything else (a bad answer) is final.
fn net_error(e: Error) -> NetError {
    match e {
        Error::Network(e) => e,
        other => NetError::Status {
            peer: "the dataloader".into(),
            code: tonic::Code::FailedPrecondition,
            message: other.to_string(),
        },
    }
}

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
    pub order: DataOrder,
}

impl StreamShape {
    fn request(&self, start_step: u64) -> pb::BatchRequest {
        pb::BatchRequest {
            seed: self.seed,
            split: match self.split {
                Split::Train => pb::Split::Train,
                Split::Val => pb::Split::Val,
            } as i32,
            start_step,
            steps: 0,
            micro_start: self.micro_start,
            micro_count: self.micro_count,
            micros_per_step: self.micros_per_step,
            rows: self.rows,
            seq_len: self.seq_len,
            prefetch: self.prefetch,
            order: match self.order {
                DataOrder::Random => pb::DataOrder::Random,
                DataOrder::Epochs => pb::DataOrder::Epochs,
            } as i32,
        }
    }
}

/// One stream of batches, driven from a (blocking) training thread on `rt`.
pub struct RemoteBatches {
    rt: Handle,
    source: StreamSource,
    shape: StreamShape,
    stream: Option<tonic::Streaming<pb::Batch>>,
    /// The (step, micro) the open stream delivers next.
    next: Option<(u64, u32)>,
}

impl RemoteBatches {
    pub fn new(rt: Handle, source: StreamSource, shape: StreamShape) -> Self {
        Self {
            rt,
            source,
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

    /// The next batch of the open stream, or `None` when there is none or it broke.
    fn read_open_stream(&mut self) -> Option<pb::Batch> {
        let stream = self.stream.as_mut()?;
        match self.rt.block_on(stream.message()) {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                tracing::warn!("the dataloader ended the batch stream; reconnecting");
                None
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), cause = status.message(), "the batch stream broke; reconnecting");
                None
            }
        }
    }

    /// The windows (rows × (seq_len + 1) tokens) of micro-batch `micro` of `step`.
    pub fn windows(&mut self, step: u64, micro: u32) -> Result<Vec<i64>> {
        if self.next != Some((step, micro)) {
            // A jump (start, resume, evaluation round): ask for a stream from here. Streams
            // start at a step's first micro-batch.
            if micro != self.shape.micro_start {
                return Err(Error::Protocol(format!(
                    "a batch stream cannot start at micro-batch {micro} of step {step}"
                )));
            }
            self.stream = None;
        }
        let had_stream = self.stream.is_some();
        let batch = match self.read_open_stream() {
            Some(b) => b,
            None => {
                // Resume the stream at the step this micro-batch belongs to: a stream
                // restarts at a step's first micro-batch, so skip to `micro` below.
                self.stream = None;
                let request = self.shape.request(step);
                let mut attempts = 0u32;
                let (stream, mut first) = self.rt.block_on(self.source.policy.run(
                    "stream batches from the dataloader",
                    || {
                        attempts += 1;
                        self.source.open(request, had_stream || attempts > 1)
                    },
                ))?;
                self.stream = Some(stream);
                while (first.step, first.micro) != (step, micro) && first.step == step {
                    first = self
                        .read_open_stream()
                        .ok_or_else(|| Error::Protocol("the dataloader ended the stream".into()))?;
                }
                first
            }
        };
        if (batch.step, batch.micro) != (step, micro) {
            return Err(Error::Protocol(format!(
                "the dataloader sent step {} micro-batch {} where step {step} micro-batch {micro} was due",
                batch.step, batch.micro
            )));
        }
        let shape = self.shape;
        let windows = decode_tokens(&batch.windows, batch.token_bytes)
            .filter(|w| w.len() == (shape.rows as usize) * (shape.seq_len as usize + 1))
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "the dataloader sent a malformed batch for step {step} ({} bytes at {} bytes/token)",
                    batch.windows.len(),
                    batch.token_bytes
                ))
            })?;
        self.next = Some(self.successor((step, micro)));
        Ok(windows)
    }
}
