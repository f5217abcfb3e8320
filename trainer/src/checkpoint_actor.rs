//! The checkpoint actor: writes checkpoints on its own thread from snapshots the training
//! loop hands over, so a step never waits on the disk (only on the previous write, when
//! checkpoints come faster than the disk takes them). After a checkpoint is durable it
//! applies retention and tells the [`Reporter`] — in a distributed job, the coordinator.
//! When the run directory is a bucket, the checkpoint is uploaded (manifest last) before it
//! is reported: committed then means committed to the bucket.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::{Device, Tensor};

use crate::checkpoint::{self, CheckpointData, CheckpointState};
use crate::report::Reporter;
use crate::{Error, Result};
use lillm_store::RunBucket;

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

/// The run's bucket, which rank 0's checkpoints go to (a job's second copy writer keeps
/// its copy on its own node: the bucket already holds one).
pub struct Publish {
    pub bucket: RunBucket,
}

/// Files of the run directory worth keeping with its checkpoints.
pub const RUN_FILES: [&str; 3] = [
    crate::metrics::METRICS_FILE,
    "config.toml",
    crate::plot::PLOT_FILE,
];

impl Publish {
    /// Uploads the run's files (the metrics log, the resolved config), then the checkpoint
    /// `dir` of `step` — so that a checkpoint committed to the bucket always has the log up
    /// to its step beside it — and applies retention in the bucket; returns the
    /// checkpoint's URL, the path the job records.
    fn checkpoint(&self, dir: &std::path::Path, step: u64, keep_last: usize) -> Result<PathBuf> {
        self.upload_run_files()?;
        let url = self.bucket.upload_checkpoint(dir, step)?;
        self.bucket.apply_retention(keep_last)?;
        Ok(PathBuf::from(url))
    }

    pub fn upload_run_files(&self) -> Result<()> {
        for name in RUN_FILES {
            self.bucket.upload_file(name)?;
        }
        Ok(())
    }
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
        publish: Option<Publish>,
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
                    let recorded = match &publish {
                        Some(p) => p.checkpoint(&snap.dir, snap.state.step, keep_last)?,
                        None => snap.dir.clone(),
                    };
                    reporter.checkpoint_written(snap.state.step, &recorded, snap.state.val_loss)?;
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
