//! The checkpoint format, shared by everything that writes or reads a model: one directory
//! per step, written atomically, committed by `manifest.json`; and [`LoadedModel`], a
//! verified checkpoint ready for inference, evaluation or export. Training (which writes
//! checkpoints) and serving (which only reads them) both depend on this crate and on nothing
//! of each other.
//!
//! ```text
//! RUN/checkpoints/step-00000200/
//!   model.safetensors      weights (lilLM tensor names)
//!   optimizer.safetensors  AdamW moments and step (absent for imported models)
//!   state.json             step, tokens, losses, configs, data cursor, seed
//!   tokenizer.json, tokenizer_config.json
//!   manifest.json          sha256 of every file above — written last, the commit marker
//! ```
//! A directory is first written as `.tmp-step-N` and renamed when complete; anything
//! without a manifest that matches its files is ignored on resume and refused on load.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use lillm_model::{LoraConfig, ModelConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

mod error;
mod loaded;

pub use error::{Error, Result};
pub use loaded::{check_vocab, LoadedModel};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// What a checkpoint says about the run it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The next optimizer step to run (= steps completed). The data cursor: batches are a
    /// pure function of (seed, step, micro-batch), so this is all a resume needs.
    pub step: u64,
    pub tokens_seen: u64,
    /// Validation loss measured at this step, if any.
    pub val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub model: ModelConfig,
    /// The training config of the run that wrote it, as that run's trainer recorded it.
    pub train: Option<serde_json::Value>,
    pub world_size: usize,
    /// Seed of batch order and dropout; dropout is reseeded from (seed, step, micro-batch)
    /// before every micro-batch.
    pub seed: u64,
    /// Membership generation of the job that wrote it (0 for single-process runs).
    pub generation: u64,
    /// Whether the evaluation scheduled at `step` already ran (so a resume does not repeat it).
    pub evaluated_at_step: bool,
    pub dataset_fingerprint: Option<String>,
    /// `train`, `dpo`, `import-hf`, `import-lillm-pt`.
    pub source: String,
    /// DPO: SHA-256 of the frozen reference's weights, so a resume uses the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_sha256: Option<String>,
    /// A LoRA fine-tune: `model.safetensors` holds only the adapters, trained on this base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraBase>,
}

/// What a LoRA checkpoint's adapters were trained on: its adapter config and the base
/// checkpoint, by path and by the SHA-256 of its weights (a moved base can be named
/// again, a different one is refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraBase {
    pub config: LoraConfig,
    /// The base checkpoint directory (absolute).
    pub base: PathBuf,
    /// SHA-256 of the base's `model.safetensors`.
    pub base_sha256: String,
}

impl LoraBase {
    /// Refuses a base whose weights are not the ones the adapters were trained on.
    pub fn check_base(&self, base_dir: &Path) -> Result<()> {
        let (_, sha) = sha256_file(&base_dir.join(MODEL_FILE))?;
        self.check_base_sha(base_dir, &sha)
    }

    /// [`Self::check_base`] for a base whose weights' SHA-256 (`sha`) is known.
    pub fn check_base_sha(&self, base_dir: &Path, sha: &str) -> Result<()> {
        if sha != self.base_sha256 {
            return Err(Error::checkpoint(
                base_dir,
                format!(
                    "is not the base these LoRA adapters were trained on (its weights' SHA-256 is {sha}, the adapters need {}, from {}); name that base",
                    self.base_sha256,
                    self.base.display()
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    file: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointManifest {
    format: String,
    files: Vec<FileEntry>,
}

const FORMAT: &str = "lillm-checkpoint/v1";

/// Size and SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok((bytes.len() as u64, hex::encode(Sha256::digest(&bytes))))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Everything a checkpoint holds, ready to be written.
pub struct CheckpointData<'a> {
    pub state: CheckpointState,
    pub model: BTreeMap<String, Tensor>,
    pub optimizer: Option<BTreeMap<String, Tensor>>,
    /// Directory or file of the tokenizer to copy alongside.
    pub tokenizer: Option<&'a Path>,
}

/// Writes `data` as `dir` atomically: a temp sibling, fsynced, manifest last, then a rename.
pub fn write_checkpoint(dir: &Path, data: &CheckpointData) -> Result<()> {
    write_checkpoint_as(dir, data, "")
}

/// [`write_checkpoint`] by one of several writers of the same step (`writer` names it in
/// the temporary directory): the two copy writers of a job may share one volume, and the
/// copy that lands second, identical by the job's exact math, gives way to the first.
pub fn write_checkpoint_as(dir: &Path, data: &CheckpointData, writer: &str) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".tmp-{name}{writer}"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    lillm_model::weights::write_tensors(&tmp.join(MODEL_FILE), &data.model)?;
    let mut files = vec![MODEL_FILE.to_string()];
    if let Some(opt) = &data.optimizer {
        lillm_model::weights::write_tensors(&tmp.join(OPTIMIZER_FILE), opt)?;
        files.push(OPTIMIZER_FILE.into());
    }
    let state = serde_json::to_vec_pretty(&data.state).expect("state serialises");
    write_synced(&tmp.join(STATE_FILE), &state)?;
    files.push(STATE_FILE.into());
    if let Some(tok) = data.tokenizer {
        let src_dir = if tok.is_dir() {
            tok.to_path_buf()
        } else {
            tok.parent().unwrap_or(Path::new(".")).to_path_buf()
        };
        let tok_file = lillm_data::tokenizer::tokenizer_file(tok);
        fs::copy(&tok_file, tmp.join("tokenizer.json")).map_err(|e| Error::io(&tok_file, e))?;
        files.push("tokenizer.json".into());
        let cfg = src_dir.join("tokenizer_config.json");
        if cfg.is_file() {
            fs::copy(&cfg, tmp.join("tokenizer_config.json")).map_err(|e| Error::io(&cfg, e))?;
        } else {
            lillm_data::tokenizer::write_tokenizer_config(&tmp)?;
        }
        files.push("tokenizer_config.json".into());
    }
    let mut entries = Vec::new();
    for file in files {
        let path = tmp.join(&file);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        let (bytes, sha256) = sha256_file(&path)?;
        entries.push(FileEntry {
            file,
            bytes,
            sha256,
        });
    }
    let manifest = CheckpointManifest {
        format: FORMAT.into(),
        files: entries,
    };
    write_synced(
        &tmp.join(MANIFEST_FILE),
        &serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
    )?;
    let same_step = |dir: &Path| verify_checkpoint(dir).is_ok_and(|s| s.step == data.state.step);
    if dir.exists() && !same_step(dir) {
        // Incomplete, damaged or of another run: replaced.
        fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    match fs::rename(&tmp, dir) {
        Ok(()) => {}
        // The step is already there (the other copy writer on a shared volume, or a
        // rewrite after a resume): keep it.
        Err(_) if same_step(dir) => fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?,
        Err(e) => return Err(Error::io(dir, e)),
    }
    if let Ok(d) = fs::File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Checks the manifest and every file's size and checksum; returns the state.
pub fn verify_checkpoint(dir: &Path) -> Result<CheckpointState> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&manifest_path).map_err(|_| {
        Error::checkpoint(
            dir,
            "not a committed checkpoint (no manifest.json): it is incomplete or not a checkpoint directory",
        )
    })?;
    let manifest: CheckpointManifest = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&manifest_path, format!("malformed manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(Error::checkpoint(
            &manifest_path,
            format!("unknown format `{}`", manifest.format),
        ));
    }
    for entry in &manifest.files {
        let path = dir.join(&entry.file);
        let (bytes, sha) = sha256_file(&path).map_err(|_| {
            Error::checkpoint(
                &path,
                "listed in the manifest but missing; the checkpoint is damaged",
            )
        })?;
        if bytes != entry.bytes || sha != entry.sha256 {
            return Err(Error::checkpoint(
                &path,
                format!(
                    "does not match the manifest ({bytes} bytes, expected {}): the file is truncated or corrupted; use another checkpoint",
                    entry.bytes
                ),
            ));
        }
    }
    let state_path = dir.join(STATE_FILE);
    let state = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    serde_json::from_str(&state)
        .map_err(|e| Error::checkpoint(&state_path, format!("malformed state: {e}")))
}

/// Committed checkpoint directories of a run, oldest first (by step).
pub fn list_checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = fs::read_dir(run.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join(MANIFEST_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The newest checkpoint of `run` that verifies; damaged ones are skipped with a warning.
pub fn latest_valid(run: &Path) -> Option<(PathBuf, CheckpointState)> {
    for (_, dir) in list_checkpoints(run).into_iter().rev() {
        match verify_checkpoint(&dir) {
            Ok(state) => return Some((dir, state)),
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), cause = %e, "skipping damaged checkpoint")
            }
        }
    }
    None
}

pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join(CHECKPOINTS_DIR).join(format!("step-{step:08}"))
}

/// A checkpoint directory itself, or for a run directory its latest valid checkpoint.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(Error::checkpoint(
            path,
            "no such checkpoint or run directory",
        ));
    }
    if path.join(CHECKPOINTS_DIR).is_dir() {
        return latest_valid(path).map(|(dir, _)| dir).ok_or_else(|| {
            Error::checkpoint(path, "the run directory holds no valid checkpoint yet")
        });
    }
    Err(Error::checkpoint(
        path,
        "neither a checkpoint (no manifest.json) nor a run directory (no checkpoints/)",
    ))
}

/// Keeps the newest `keep_last` checkpoints and the best-val one; removes the rest.
pub fn apply_retention(run: &Path, keep_last: usize) -> Result<()> {
    let all = list_checkpoints(run);
    let best = all
        .iter()
        .filter_map(|(step, dir)| {
            let state: CheckpointState =
                serde_json::from_str(&fs::read_to_string(dir.join(STATE_FILE)).ok()?).ok()?;
            Some((state.val_loss?, *step))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, step)| step);
    let cutoff = all.len().saturating_sub(keep_last);
    for (step, dir) in &all[..cutoff] {
        if Some(*step) != best {
            match fs::remove_dir_all(dir) {
                // Another writer of the same run directory removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                other => other.map_err(|e| Error::io(dir, e))?,
            }
        }
    }
    Ok(())
}

/// The best-val checkpoint of a run, if any checkpoint carries a val loss.
pub fn best_checkpoint(run: &Path) -> Option<PathBuf> {
    list_checkpoints(run)
        .into_iter()
        .filter_map(|(_, dir)| {
            let state: CheckpointState =
                serde_json::from_str(&fs::read_to_string(dir.join(STATE_FILE)).ok()?).ok()?;
            Some((state.val_loss?, dir))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, dir)| dir)
}
