//! The trainer's side of placed shards: each micro-batch of the exactly-once order is read
//! from the dataloaders that hold its shards, as the coordinator's placement says, a few
//! micro-batches ahead of the training loop. When a holder fails, the read goes to the
//! shard's other copy at once; when no copy answers, the placement is asked for again (the
//! coordinator moves a departed dataloader's shards to the survivors) and the read retried
//! with the one retry policy's backoff and patience.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use lillm_data::epochs::{EpochOrder, Sequence};
use lillm_data::shards::{epoch_sequences, BatchKey};
use lillm_proto::client::CoordinatorClient;
use lillm_proto::net::{self, Action, ConnectSettings, NetError, RetryPolicy};
use lillm_proto::v1 as pb;
use pb::dataloader_client::DataloaderClient;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::service::decode_tokens;
use crate::{Error, Result};

/// Which dataloader reads which rows of a micro-batch: for each row, a holder of its shard
/// that is not in `avoid`, the copies taken in turn (`turn`, e.g. the micro-batch's index)
/// so that both copies of a shard serve. `Err(shard)` names a shard no usable holder has.
pub fn route(
    sequences: &[Sequence],
    holders: &[Vec<u32>],
    avoid: &BTreeSet<u32>,
    turn: u64,
) -> std::result::Result<BTreeMap<u32, Vec<usize>>, usize> {
    let mut plan: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (row, at) in sequences.iter().enumerate() {
        let usable: Vec<u32> = holders
            .get(at.shard)
            .map(|h| h.iter().copied().filter(|d| !avoid.contains(d)).collect())
            .unwrap_or_default();
        if usable.is_empty() {
            return Err(at.shard);
        }
        let pick = usable[(turn as usize + at.shard) % usable.len()];
        plan.entry(pick).or_default().push(row);
    }
    Ok(plan)
}

/// The placement as a trainer routes by it.
#[derive(Debug, Default)]
struct Routes {
    holders: Vec<Vec<u32>>,
    addresses: HashMap<u32, String>,
}

/// Reads placed shards' sequences; shared by the training thread and its prefetch tasks.
pub struct PlacedReader {
    coordinator: CoordinatorClient,
    job_token: String,
    settings: ConnectSettings,
    policy: RetryPolicy,
    routes: Mutex<Arc<Routes>>,
    clients: Mutex<HashMap<String, DataloaderClient<Channel>>>,
}

impl PlacedReader {
    /// A reader of the job's placement, or `None` when the coordinator has placed no shards
    /// (no dataloader reported its dataset) or placed another number than `train_shards`.
    pub async fn connect(
        coordinator: CoordinatorClient,
        job_token: &str,
        settings: ConnectSettings,
        policy: RetryPolicy,
        train_shards: usize,
    ) -> Result<Option<Self>> {
        let reader = Self {
            coordinator,
            job_token: job_token.to_string(),
            settings,
            policy,
            routes: Mutex::default(),
            clients: Mutex::default(),
        };
        let routes = reader.refresh().await?;
        if routes.holders.len() != train_shards {
            if !routes.holders.is_empty() {
                tracing::warn!(
                    placed = routes.holders.len(),
                    train_shards,
                    "the coordinator placed another dataset's shards; streaming from the dataloader instead"
                );
            }
            return Ok(None);
        }
        Ok(Some(reader))
    }

    /// Asks the coordinator for the placement and keeps it.
    async fn refresh(&self) -> std::result::Result<Arc<Routes>, NetError> {
        let client = self.coordinator.clone();
        let request = pb::PlacementRequest {
            job_token: self.job_token.clone(),
        };
        let placement = self
            .policy
            .run("ask the coordinator where the shards are", || {
                let mut client = client.clone();
                let request = request.clone();
                let settings = &self.settings;
                async move {
                    net::call("the coordinator", settings, client.get_placement(request)).await
                }
            })
            .await?;
        let routes = Arc::new(Routes {
            holders: placement
                .shards
                .into_iter()
                .map(|h| h.dataloaders)
                .collect(),
            addresses: placement.addresses.into_iter().collect(),
        });
        *self.routes.lock().expect("routes lock") = routes.clone();
        Ok(routes)
    }

    fn client(&self, address: &str) -> std::result::Result<DataloaderClient<Channel>, NetError> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let channel = net::channel(address, &self.settings)?;
        let client = DataloaderClient::new(channel).max_decoding_message_size(1 << 30);
        clients.insert(address.to_string(), client.clone());
        Ok(client)
    }

    /// One dataloader's rows of a micro-batch.
    async fn read_rows(
        &self,
        address: &str,
        rows: &[Sequence],
        window: usize,
    ) -> std::result::Result<Vec<i64>, NetError> {
        let mut client = self.client(address)?;
        let request = pb::SequencesRequest {
            seq_len: window as u32,
            shards: rows.iter().map(|s| s.shard as u32).collect(),
            indices: rows.iter().map(|s| s.index).collect(),
        };
        let reply = net::call(address, &self.settings, client.read_sequences(request)).await?;
        decode_tokens(&reply.tokens, reply.token_bytes)
            .filter(|t| t.len() == rows.len() * window)
            .ok_or_else(|| NetError::Status {
                peer: address.to_string(),
                code: tonic::Code::DataLoss,
                message: format!(
                    "sent {} bytes at {} bytes/token for {} sequences of {window} tokens",
                    reply.tokens.len(),
                    reply.token_bytes,
                    rows.len()
                ),
            })
    }

    /// The windows (rows × `window` tokens) of `sequences`, read from their holders.
    pub async fn read(
        &self,
        sequences: &[Sequence],
        window: usize,
        turn: u64,
    ) -> std::result::Result<Vec<i64>, NetError> {
        let mut avoid = BTreeSet::new();
        let mut routes = self.routes.lock().expect("routes lock").clone();
        let mut delays = self.policy.first_delay;
        let started = tokio::time::Instant::now();
        loop {
            match route(sequences, &routes.holders, &avoid, turn) {
                Ok(plan) => match self.read_plan(&routes, &plan, sequences, window).await {
                    Ok(windows) => return Ok(windows),
                    Err((holder, e)) if e.action() == Action::Retry => {
                        tracing::warn!(dataloader = holder, cause = %e, "a shard holder failed; reading the other copy");
                        avoid.insert(holder);
                        // The placement may have moved too: take the newest with the retry.
                        routes = self.refresh().await?;
                    }
                    Err((_, e)) => return Err(e),
                },
                // Every copy of a shard failed or is not served yet: wait, then ask where
                // the shards are now.
                Err(shard) => {
                    let waited = started.elapsed();
                    if waited >= self.policy.patience {
                        return Err(NetError::GaveUp {
                            what: format!("read train shard {shard} from a dataloader"),
                            after: waited,
                            last: Box::new(NetError::StreamEnded {
                                peer: format!("every holder of train shard {shard}"),
                            }),
                        });
                    }
                    tokio::time::sleep(delays).await;
                    delays = (delays * 2).min(self.policy.max_delay);
                    avoid.clear();
                    routes = self.refresh().await?;
                }
            }
        }
    }

    /// Reads every dataloader's rows of `plan` at once and puts them in row order; the
    /// first failure names its dataloader.
    async fn read_plan(
        &self,
        routes: &Routes,
        plan: &BTreeMap<u32, Vec<usize>>,
        sequences: &[Sequence],
        window: usize,
    ) -> std::result::Result<Vec<i64>, (u32, NetError)> {
        let reads = plan.iter().map(|(&holder, rows)| async move {
            let Some(address) = routes.addresses.get(&holder) else {
                let absent = NetError::Unreachable {
                    address: format!("dataloader {holder}"),
                    cause: "not registered".into(),
                };
                return Err((holder, absent));
            };
            let wanted: Vec<Sequence> = rows.iter().map(|&r| sequences[r]).collect();
            let tokens = self
                .read_rows(address, &wanted, window)
                .await
                .map_err(|e| (holder, e))?;
            Ok((rows, tokens))
        });
        let mut windows = vec![0i64; sequences.len() * window];
        for read in futures::future::join_all(reads).await {
            let (rows, tokens) = read?;
            for (&row, chunk) in rows.iter().zip(tokens.chunks(window)) {
                windows[row * window..(row + 1) * window].copy_from_slice(chunk);
            }
        }
        Ok(windows)
    }
}

/// A micro-batch being read.
type Read = JoinHandle<std::result::Result<Vec<i64>, NetError>>;

/// Micro-batches read ahead of the training loop.
const READ_AHEAD: usize = 2;

/// One rank's micro-batches of the exactly-once order from placed shards, driven from a
/// (blocking) training thread on `rt`; the next [`READ_AHEAD`] are read while it trains.
pub struct PlacedBatches {
    rt: Handle,
    reader: Arc<PlacedReader>,
    order: Arc<EpochOrder>,
    /// This rank's micro-batches of a step: `start .. start + count` of `per_step`.
    micros: (u32, u32, u32),
    rows: usize,
    window: usize,
    seed: u64,
    ahead: VecDeque<((u64, u32), Read)>,
}

impl PlacedBatches {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rt: Handle,
        reader: Arc<PlacedReader>,
        order: Arc<EpochOrder>,
        seed: u64,
        micros: (u32, u32, u32),
        rows: usize,
        window: usize,
    ) -> Self {
        Self {
            rt,
            reader,
            order,
            micros,
            rows,
            window,
            seed,
            ahead: VecDeque::new(),
        }
    }

    fn successor(&self, (step, micro): (u64, u32)) -> (u64, u32) {
        let (start, count, _) = self.micros;
        match micro + 1 < start + count {
            true => (step, micro + 1),
            false => (step + 1, start),
        }
    }

    fn spawn(&self, (step, micro): (u64, u32)) -> Read {
        let key = BatchKey {
            seed: self.seed,
            split: lillm_data::manifest::Split::Train,
            step,
            micro: micro as u64,
        };
        let sequences = epoch_sequences(&self.order, key, self.micros.2 as u64, self.rows);
        let reader = self.reader.clone();
        let window = self.window;
        let turn = step * self.micros.2 as u64 + micro as u64;
        self.rt
            .spawn(async move { reader.read(&sequences, window, turn).await })
    }

    /// The windows (rows × window tokens) of micro-batch `micro` of `step`.
    pub fn windows(&mut self, step: u64, micro: u32) -> Result<Vec<i64>> {
        if self.ahead.front().map(|(k, _)| *k) != Some((step, micro)) {
            // A jump (start, resume): what was read ahead is not what is wanted.
            for (_, task) in self.ahead.drain(..) {
                task.abort();
            }
            self.ahead
                .push_back(((step, micro), self.spawn((step, micro))));
        }
        let (_, task) = self
            .ahead
            .pop_front()
            .expect("the wanted micro-batch is queued");
        let mut last = (step, micro);
        if let Some((k, _)) = self.ahead.back() {
            last = *k;
        }
        while self.ahead.len() < READ_AHEAD {
            last = self.successor(last);
            self.ahead.push_back((last, self.spawn(last)));
        }
        let windows = self
            .rt
            .block_on(task)
            .map_err(|e| Error::Protocol(format!("a read of placed shards failed: {e}")))??;
        Ok(windows)
    }
}

impl Drop for PlacedBatches {
    fn drop(&mut self) {
        for (_, task) in self.ahead.drain(..) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(shard: usize, index: u64) -> Sequence {
        Sequence {
            epoch: 0,
            shard,
            index,
        }
    }

    #[test]
    fn rows_go_to_holders_of_their_shards_and_both_copies_serve() {
        let holders = vec![vec![0, 1], vec![1, 2], vec![2, 0]];
        let rows: Vec<Sequence> = (0..6).map(|i| seq(i % 3, i as u64)).collect();
        let mut served = BTreeSet::new();
        for turn in 0..4 {
            let plan = route(&rows, &holders, &BTreeSet::new(), turn).unwrap();
            let mut all: Vec<usize> = plan.values().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..6).collect::<Vec<_>>(), "every row read once");
            for (d, rows_of) in &plan {
                for &r in rows_of {
                    assert!(holders[rows[r].shard].contains(d), "row {r} from a holder");
                    served.insert((rows[r].shard, *d));
                }
            }
        }
        assert_eq!(
            served.len(),
            6,
            "over a few turns every copy serves: {served:?}"
        );
    }

    #[test]
    fn a_failed_holder_is_avoided_and_a_shard_without_one_is_named() {
        let holders = vec![vec![0, 1], vec![1]];
        let rows = vec![seq(0, 0), seq(1, 0)];
        let avoid: BTreeSet<u32> = [0].into();
        let plan = route(&rows, &holders, &avoid, 0).unwrap();
        assert_eq!(plan, BTreeMap::from([(1, vec![0, 1])]));
        let avoid: BTreeSet<u32> = [1].into();
        assert_eq!(route(&rows, &holders, &avoid, 0), Err(1));
        assert_eq!(route(&[seq(5, 0)], &holders, &BTreeSet::new(), 0), Err(5));
    }
}
