//! The checkpoint actor: writes checkpoints on its own thread from snapshots the training
//! loop hands over, so a step never waits on the disk (only on the previous write, when
//! checkpoints come faster than the disk takes them). After a checkpoint is durable it
//! applies retention and tells the [`Reporter`] — in a distributed job, the coordinator.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::{Device, Tensor};

use crate::checkpoint::{self, CheckpointData, CheckpointState};
use crate::report::Reporter;
use crate::{Error, Result};

/// A checkpoint's contents, copied off the live parameters.
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: CheckpointState,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
    pub tokenizer: Option<PathBuf>,
}

/// Copies tensors to host memory, detached from the live ones (which the next step changes).
pub fn host_copy(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let _guard = tch::no_grad_guard();
    tensors
        .iter()
        .map(|(name, t)| {
            let copy = match t.device() {
                Device::Cpu => t.detach().copy(),
                _ => t.to_device(Device::Cpu),
            };
            (name.clone(), copy)
        })
        .collect()
}

pub struct CheckpointActor {
    tx: Option<SyncSender<Box<Snapshot>>>,
    worker: Option<JoinHandle<Result<()>>>,
}

impl CheckpointActor {
    /// Starts the writer for the run directory `out`, keeping `keep_last` checkpoints + best.
    /// `writer` tells the job's two copy writers apart (see `checkpoint::write_checkpoint_as`).
    pub fn start(
        out: PathBuf,
        keep_last: usize,
        writer: &'static str,
        reporter: Arc<dyn Reporter>,
    ) -> Self {
        // Capacity 0: a second snapshot waits until the writer has taken the first.
        let (tx, rx) = sync_channel::<Box<Snapshot>>(0);
        let span = tracing::Span::current();
        let worker = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || -> Result<()> {
                let _logs_as_the_trainer = span.enter();
                for snap in rx {
                    checkpoint::write_checkpoint_as(
                        &snap.dir,
                        &CheckpointData {
                            state: snap.state.clone(),
                            model: snap.model,
                            optimizer: Some(snap.optimizer),
                            tokenizer: snap.tokenizer.as_deref(),
                        },
                        writer,
                    )?;
                    checkpoint::apply_retention(&out, keep_last)?;
                    reporter.checkpoint_written(snap.state.step, &snap.dir, snap.state.val_loss)?;
                }
                Ok(())
            })
            .expect("spawn the checkpoint writer");
        Self {
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    /// Hands a snapshot to the writer; fails if an earlier write failed.
    pub fn submit(&mut self, snapshot: Snapshot) -> Result<()> {
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(Box::new(snapshot)).is_ok());
        match sent {
            Some(true) => Ok(()),
            _ => Err(self
                .finish()
                .err()
                .unwrap_or_else(|| Error::Writer("it stopped without saying why".into()))),
        }
    }

    /// Waits for every submitted checkpoint to be written.
    pub fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.worker.take() {
            Some(w) => w
                .join()
                .map_err(|_| Error::Writer("it panicked (see the message above)".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for CheckpointActor {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
