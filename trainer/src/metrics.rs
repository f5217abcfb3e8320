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
    /// CUDA: the most GPU memory libtorch had allocated during the log window, in GiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_gib: Option<f64>,
    /// Exactly-once data order: epochs done after this step (1.25 = a quarter into the
    /// second epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// DPO: fraction of pairs whose chosen reply has the higher implicit reward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_accuracy: Option<f64>,
    /// DPO: mean reward(chosen) − reward(rejected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_margin: Option<f64>,
    /// MoE: the load-balancing loss, mean over sparse layers (experts_per_token when the
    /// routing is balanced, up to experts_per_token × experts when it has collapsed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// MoE: the router z-loss, mean over sparse layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub z_loss: Option<f64>,
    /// MoE: each expert's share of the routed tokens, averaged over sparse layers (sums to 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load: Option<Vec<f64>>,
    /// MoE: the least-loaded expert of any sparse layer, in fair shares (1 = balanced, 0 =
    /// an expert that got no token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load_min: Option<f64>,
    /// MoE: the most-loaded expert of any sparse layer, in fair shares.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_load_max: Option<f64>,
}

/// Appends records; each line is flushed so a killed run keeps what it logged. The file
/// holds one record per step and kind (training step or evaluation).
pub struct MetricsLog {
    path: PathBuf,
    file: fs::File,
    /// The step of the latest training-step record in the file.
    last_loss_step: Option<u64>,
    /// (step, is a training-step record) of every record in the file.
    logged: std::collections::HashSet<(u64, bool)>,
}

/// How a run opens its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// A new run: an empty log.
    Fresh,
    /// A resume from this step in one process: records after it are dropped, since the
    /// run redoes those steps (possibly with changed settings).
    After(u64),
    /// A group of a job, at any step: every record is kept. A job's settings are fixed
    /// (fingerprinted) and its math deterministic, so a record is right whichever group
    /// computed it; a group that starts behind (without the most advanced trainer) must
    /// not delete records that a later group, which has that trainer back, will not
    /// compute again.
    Keep,
}

impl MetricsLog {
    /// Opens the log as `reopen` says.
    pub fn open(run: &Path, reopen: Reopen) -> Result<Self> {
        let path = run.join(METRICS_FILE);
        // The records up to the resume step, kept byte for byte (a parse and re-print
        // could move a float by an ulp), each step's training and evaluation record once:
        // a rank 0 that froze and woke up after the job went on without it may have
        // appended a record the job had logged already.
        let mut seen = std::collections::HashSet::new();
        let last = match reopen {
            Reopen::Fresh => None,
            Reopen::After(step) => Some(step),
            Reopen::Keep => Some(u64::MAX),
        };
        let kept: Vec<String> = match last {
            Some(last) => fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Record>(l)
                        .is_ok_and(|r| r.step <= last && seen.insert((r.step, r.loss.is_some())))
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            None => Vec::new(),
        };
        fs::write(&path, kept.concat()).map_err(|e| Error::io(&path, e))?;
        let last_loss_step = kept
            .iter()
            .filter_map(|l| serde_json::from_str::<Record>(l).ok())
            .filter(|r| r.loss.is_some())
            .map(|r| r.step)
            .max();
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file,
            last_loss_step,
            logged: seen,
        })
    }

    /// Appends `record` unless the log already holds a record of its step and kind.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        if !self.logged.insert((record.step, record.loss.is_some())) {
            return Ok(());
        }
        let mut line = serde_json::to_string(record).expect("record serialises");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))?;
        if record.loss.is_some() {
            self.last_loss_step = Some(record.step);
        }
        Ok(())
    }

    /// The step of the latest training-step record logged.
    pub fn last_loss_step(&self) -> Option<u64> {
        self.last_loss_step
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_keeps_the_earlier_records_byte_for_byte_and_drops_the_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let first = r#"{"step":198,"loss":7.8402252197265625,"tokens_seen":101376}"#;
        let later = r#"{"step":199,"loss":7.800789833068848}"#;
        fs::write(dir.path().join(METRICS_FILE), format!("{first}\n{later}\n")).unwrap();
        MetricsLog::open(dir.path(), Reopen::After(198)).unwrap();
        let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, format!("{first}\n"));
    }

    #[test]
    fn resuming_keeps_one_record_per_step_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":3,"loss":2.5}"#,
            r#"{"step":3,"val_loss":2.6}"#,
            r#"{"step":4,"loss":2.4}"#,
            r#"{"step":3,"loss":2.5}"#,
        ];
        fs::write(dir.path().join(METRICS_FILE), lines.join("\n")).unwrap();
        MetricsLog::open(dir.path(), Reopen::After(4)).unwrap();
        let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(text, format!("{}\n", lines[..3].join("\n")));
    }

    /// A group of a job that starts behind keeps the records a more advanced trainer's
    /// group logged, and logs each step once.
    #[test]
    fn a_job_group_keeps_every_record_and_logs_each_step_once() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [r#"{"step":2,"loss":2.5}"#, r#"{"step":3,"loss":2.4}"#];
        fs::write(dir.path().join(METRICS_FILE), lines.join("\n")).unwrap();
        let mut log = MetricsLog::open(dir.path(), Reopen::Keep).unwrap();
        for step in [3, 4] {
            let again = Record {
                step,
                loss: Some(9.0),
                ..Record::default()
            };
            log.append(&again).unwrap();
        }
        let text = fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(
            text,
            format!("{}\n{}\n", lines.join("\n"), r#"{"step":4,"loss":9.0}"#)
        );
    }

    #[test]
    fn the_log_knows_its_latest_training_step() {
        let dir = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":10,"loss":2.5}"#,
            r#"{"step":10,"val_loss":2.6}"#,
            r#"{"step":11,"val_loss":2.4}"#,
        ];
        fs::write(dir.path().join(METRICS_FILE), lines.join("\n")).unwrap();
        let mut log = MetricsLog::open(dir.path(), Reopen::After(11)).unwrap();
        assert_eq!(log.last_loss_step(), Some(10));
        log.append(&Record {
            step: 12,
            loss: Some(2.0),
            ..Record::default()
        })
        .unwrap();
        assert_eq!(log.last_loss_step(), Some(12));
    }
}
