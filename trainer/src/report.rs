//! What the training loop tells the outside world: progress at every log interval and each
//! checkpoint once it is durable. A single-process run reports to nobody; a trainer actor
//! reports to the coordinator (heartbeats and commits).

use std::path::Path;

use crate::metrics::Record;
use crate::Result;

pub trait Reporter: Send + Sync {
    /// A training record was logged (rank 0 and every other rank).
    fn progress(&self, _record: &Record) {}

    /// The checkpoint of `step` is complete on disk (manifest written, fsynced).
    fn checkpoint_written(&self, _step: u64, _dir: &Path, _val_loss: Option<f64>) -> Result<()> {
        Ok(())
    }

    /// Returns once every checkpoint reported so far is committed.
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Reports to nobody.
pub struct Silent;

impl Reporter for Silent {}
