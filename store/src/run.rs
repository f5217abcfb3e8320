//! A run directory in a bucket. Training writes into a local mirror (`<cache-dir>/runs/…`)
//! as it does into any run directory; each checkpoint is then uploaded, its files first and
//! its `manifest.json` last, so a checkpoint is committed to the bucket exactly when its
//! manifest is there. Resuming fetches the newest committed checkpoint that verifies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::bucket::{Bucket, Expected};
use crate::{Error, Result};

const CHECKPOINTS: &str = "checkpoints";
const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.json";

/// The part of a checkpoint manifest the store needs: its files and their checksums.
#[derive(Deserialize)]
struct FileList {
    files: Vec<FileEntry>,
}

#[derive(Deserialize)]
struct FileEntry {
    file: String,
    bytes: u64,
    sha256: String,
}

/// The val loss a checkpoint's state records, for retention.
#[derive(Deserialize)]
struct ValLoss {
    val_loss: Option<f64>,
}

/// A run directory in a bucket and its local mirror, with a runtime of its own so that
/// synchronous callers (the training loop, the checkpoint writer's thread) can use it.
#[derive(Clone)]
pub struct RunBucket {
    bucket: Bucket,
    mirror: PathBuf,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for RunBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (mirrored in {})",
            self.bucket.url(),
            self.mirror.display()
        )
    }
}

fn step_dir(step: u64) -> String {
    format!("{CHECKPOINTS}/step-{step:08}")
}

impl RunBucket {
    pub fn new(bucket: Bucket, mirror: PathBuf) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Usage(format!("cannot start the storage runtime: {e}")))?;
        Ok(Self {
            bucket,
            mirror,
            runtime: Arc::new(runtime),
        })
    }

    pub fn url(&self) -> &str {
        self.bucket.url()
    }

    /// The local directory this run is mirrored in.
    pub fn mirror(&self) -> &Path {
        &self.mirror
    }

    /// Runs `work` to completion on this run's runtime, from any thread (one already inside
    /// another runtime hands it to a scoped thread, since runtimes do not nest).
    fn block_on<T: Send>(&self, work: impl std::future::Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.runtime.block_on(work))
                    .join()
                    .expect("storage thread")
            })
        } else {
            self.runtime.block_on(work)
        }
    }

    /// Fails as any later request would (missing bucket, wrong credentials, no endpoint).
    pub fn probe(&self) -> Result<()> {
        self.block_on(self.bucket.probe())
    }

    /// Steps of the checkpoints committed to the bucket, oldest first.
    pub fn committed_steps(&self) -> Result<Vec<u64>> {
        self.block_on(async {
            let mut steps = Vec::new();
            for name in self.bucket.list_dirs(CHECKPOINTS).await? {
                let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if self
                    .bucket
                    .size(&format!("{}/{MANIFEST}", step_dir(step)))
                    .await?
                    .is_some()
                {
                    steps.push(step);
                }
            }
            steps.sort();
            Ok(steps)
        })
    }

    /// The URL of the checkpoint of `step` in the bucket.
    pub fn checkpoint_url(&self, step: u64) -> String {
        self.bucket.url_of(&step_dir(step))
    }

    /// Uploads the committed local checkpoint `dir` (of `step`): files, then the manifest.
    /// Returns its URL.
    pub fn upload_checkpoint(&self, dir: &Path, step: u64) -> Result<String> {
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let list: FileList = serde_json::from_slice(&text).map_err(|e| {
            Error::Usage(format!(
                "{}: malformed manifest: {e}",
                manifest_path.display()
            ))
        })?;
        let rel = step_dir(step);
        self.block_on(async {
            for entry in &list.files {
                self.bucket
                    .put_file(&dir.join(&entry.file), &format!("{rel}/{}", entry.file))
                    .await?;
            }
            self.bucket
                .put_bytes(&format!("{rel}/{MANIFEST}"), text)
                .await
        })?;
        Ok(self.checkpoint_url(step))
    }

    /// Fetches the checkpoint of `step` from the bucket into the mirror (each file checked
    /// against its manifest) and returns the local directory. A local copy that already
    /// matches the bucket's manifest is used as it is.
    pub fn fetch_checkpoint(&self, step: u64) -> Result<PathBuf> {
        let rel = step_dir(step);
        let dest = self.mirror.join(&rel);
        self.block_on(async {
            let url = self.bucket.url_of(&rel);
            let text = self
                .bucket
                .get_bytes(&format!("{rel}/{MANIFEST}"))
                .await?
                .ok_or_else(|| Error::Remote {
                    url: url.clone(),
                    message: "not a committed checkpoint (no manifest.json in the bucket)".into(),
                })?;
            if std::fs::read(dest.join(MANIFEST)).is_ok_and(|local| local == text) {
                return Ok(dest.clone());
            }
            let list: FileList = serde_json::from_slice(&text).map_err(|e| Error::Remote {
                url: url.clone(),
                message: format!("malformed manifest: {e}"),
            })?;
            let staging = self
                .mirror
                .join(CHECKPOINTS)
                .join(format!(".fetch-step-{step:08}"));
            let _ = std::fs::remove_dir_all(&staging);
            for entry in &list.files {
                let expected = Expected {
                    bytes: entry.bytes,
                    sha256: entry.sha256.clone(),
                };
                self.bucket
                    .download(
                        &format!("{rel}/{}", entry.file),
                        &staging.join(&entry.file),
                        &expected,
                    )
                    .await?;
            }
            std::fs::write(staging.join(MANIFEST), &text)
                .map_err(|e| Error::io(staging.join(MANIFEST), e))?;
            if dest.exists() {
                std::fs::remove_dir_all(&dest).map_err(|e| Error::io(&dest, e))?;
            }
            std::fs::rename(&staging, &dest).map_err(|e| Error::io(&dest, e))?;
            Ok(dest.clone())
        })
    }

    /// Fetches the newest committed checkpoint that downloads whole, skipping damaged ones
    /// with a warning; `None` when the bucket holds none.
    pub fn fetch_latest(&self) -> Result<Option<PathBuf>> {
        for step in self.committed_steps()?.into_iter().rev() {
            match self.fetch_checkpoint(step) {
                Ok(dir) => return Ok(Some(dir)),
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(step, cause = %e, "skipping a damaged checkpoint in the bucket")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Keeps the newest `keep_last` committed checkpoints and the best-val one in the
    /// bucket; deletes the rest, each manifest first.
    pub fn apply_retention(&self, keep_last: usize) -> Result<()> {
        let steps = self.committed_steps()?;
        let cutoff = steps.len().saturating_sub(keep_last);
        if cutoff == 0 {
            return Ok(());
        }
        self.block_on(async {
            let mut best: Option<(f64, u64)> = None;
            for &step in &steps {
                let state = self
                    .bucket
                    .get_bytes(&format!("{}/{STATE}", step_dir(step)))
                    .await?;
                let val = state
                    .and_then(|s| serde_json::from_slice::<ValLoss>(&s).ok())
                    .and_then(|s| s.val_loss);
                if let Some(v) = val {
                    if best.is_none_or(|(b, _)| v < b) {
                        best = Some((v, step));
                    }
                }
            }
            for &step in &steps[..cutoff] {
                if best.map(|b| b.1) != Some(step) {
                    self.bucket.delete_dir(&step_dir(step), MANIFEST).await?;
                }
            }
            Ok(())
        })
    }

    /// Uploads the mirror's file `name` (the metrics log, the resolved config), if any.
    pub fn upload_file(&self, name: &str) -> Result<()> {
        let path = self.mirror.join(name);
        if !path.is_file() {
            return Ok(());
        }
        self.block_on(self.bucket.put_file(&path, name))
    }

    /// Replaces the mirror's file `name` with the bucket's, when the bucket has one.
    pub fn fetch_file(&self, name: &str) -> Result<bool> {
        let path = self.mirror.join(name);
        let Some(bytes) = self.block_on(self.bucket.get_bytes(name))? else {
            return Ok(false);
        };
        std::fs::create_dir_all(&self.mirror).map_err(|e| Error::io(&self.mirror, e))?;
        let tmp = crate::bucket::temp_sibling(&path);
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(true)
    }
}
