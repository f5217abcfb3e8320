//! Run metrics as JSON lines (`RUN/metrics.jsonl`), one object per record.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// A training-step record (`loss`) or an evaluation record (`val_loss`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Evaluation-time loss on the train split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_seen: Option<u64>,
    /// DPO: fraction of pairs whose chosen reply has the higher implicit reward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
    /// DPO: mean reward(chosen) − reward(rejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
}

/// Appends records; each line is flushed so a killed run keeps what it logged.
pub struct MetricsLog {
    path: PathBuf,
    file: fs::File,
}

impl MetricsLog {
    /// Opens the log. A new run starts an empty file; a resume from step `s` keeps only the
    /// records up to `s` (those after it were logged past the checkpoint and will be redone).
    pub fn open(run: &Path, resume_from: Option<u64>) -> Result<Self> {
        let path = run.join(METRICS_FILE);
        let kept: Vec<String> = match resume_from {
            Some(from) => read_records(&path)
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r.step <= from)
                .map(|r| serde_json::to_string(&r).expect("record serialises") + "\n")
                .collect(),
            None => Vec::new(),
        };
        fs::write(&path, kept.concat()).map_err(|e| Error::io(&path, e))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file })
    }

    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("record serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Reads every record of a metrics file (malformed lines are skipped).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
