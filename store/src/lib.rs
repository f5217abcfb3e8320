//! Object storage for lillm: prepared datasets and run directories in a bucket (S3, GCS,
//! Azure, or `file://`, all through the Apache Arrow project's `object_store`), and the
//! bounded local cache a node keeps of them.
//!
//! - `dataset`: upload a prepared dataset (shards, then the manifest) and fetch it into the
//!   cache, each shard checked against the manifest's SHA-256.
//! - `run`: a run directory in a bucket, mirrored locally; checkpoints uploaded manifest
//!   last, so "committed" means "its manifest is in the bucket".
//! - `cache`: the node's cache, bounded in bytes, least recently used first out.
//! - `credentials`: the environment, or a file a flag names; never the command line.

use std::path::{Path, PathBuf};

mod bucket;
pub mod cache;
pub mod credentials;
pub mod dataset;
mod error;
pub mod object;
pub mod run;

pub use bucket::{is_url, Bucket, Expected};
pub use cache::Cache;
pub use error::{Error, Result};
pub use run::RunBucket;

/// Where a process keeps what it fetches, and how it authenticates.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub cache_dir: PathBuf,
    pub cache_bytes: u64,
    pub credentials_file: Option<PathBuf>,
}

/// The cache's byte limit when none is given.
pub const DEFAULT_CACHE_BYTES: u64 = 100 << 30;

/// `$LILLM_CACHE_DIR`, else `$XDG_CACHE_HOME/lillm`, else `~/.cache/lillm`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LILLM_CACHE_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lillm")
}

/// What the variables say: `LILLM_CACHE_DIR`, `LILLM_CACHE_BYTES` (when it parses) and
/// `LILLM_CREDENTIALS_FILE`, for commands without the storage flags.
impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_dir: default_cache_dir(),
            cache_bytes: std::env::var("LILLM_CACHE_BYTES")
                .ok()
                .and_then(|v| cache::parse_bytes(&v).ok())
                .unwrap_or(DEFAULT_CACHE_BYTES),
            credentials_file: std::env::var_os("LILLM_CREDENTIALS_FILE").map(PathBuf::from),
        }
    }
}

impl StoreOptions {
    pub fn cache(&self) -> Cache {
        Cache::new(self.cache_dir.clone(), self.cache_bytes)
    }

    pub fn bucket(&self, url: &str) -> Result<Bucket> {
        Bucket::open(url, self.credentials_file.as_deref())
    }

    /// The run directory at `url`, mirrored in this cache.
    pub fn run(&self, url: &str) -> Result<RunBucket> {
        RunBucket::new(self.bucket(url)?, self.cache().run_path(url))
    }
}

/// `location` as a local dataset directory: a path as it is, a URL fetched into the cache.
pub async fn local_dataset(location: &Path, options: &StoreOptions) -> Result<PathBuf> {
    let text = location.to_string_lossy();
    if !is_url(&text) {
        return Ok(location.to_path_buf());
    }
    let bucket = options.bucket(&text)?;
    bucket.probe().await?;
    dataset::fetch(&bucket, &options.cache()).await
}

/// `location` as a local checkpoint directory: a path as it is; the URL of a checkpoint
/// (`…/checkpoints/step-N`) fetched into the cache; the URL of a run directory, its newest
/// committed checkpoint that verifies.
pub fn local_checkpoint(location: &Path, options: &StoreOptions) -> Result<PathBuf> {
    let text = location.to_string_lossy();
    if !is_url(&text) {
        return Ok(location.to_path_buf());
    }
    let trimmed = text.trim_end_matches('/');
    let step = trimmed
        .rsplit_once("/checkpoints/step-")
        .and_then(|(run, step)| Some((run, step.parse::<u64>().ok()?)));
    match step {
        Some((run, step)) => options.run(run)?.fetch_checkpoint(step),
        None => options
            .run(trimmed)?
            .fetch_latest()?
            .ok_or_else(|| Error::Remote {
                url: text.to_string(),
                message: "holds no committed checkpoint (no checkpoints/step-N/manifest.json)"
                    .into(),
            }),
    }
}

/// [`local_dataset`] for a caller outside any async runtime.
pub fn local_dataset_blocking(location: &Path, options: &StoreOptions) -> Result<PathBuf> {
    if !is_url(&location.to_string_lossy()) {
        return Ok(location.to_path_buf());
    }
    block_on_storage(|| local_dataset(location, options))
}

/// [`object::local_object`] for a caller outside any async runtime.
pub fn local_object_blocking(location: &Path, options: &StoreOptions) -> Result<PathBuf> {
    if !is_url(&location.to_string_lossy()) {
        return Ok(location.to_path_buf());
    }
    block_on_storage(|| object::local_object(location, options))
}

/// Runs the storage work `work` makes on a runtime of its own (on a scoped thread when the
/// caller is inside another runtime, which may not block).
fn block_on_storage<F: std::future::Future<Output = Result<PathBuf>>>(
    work: impl FnOnce() -> F + Send,
) -> Result<PathBuf> {
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Usage(format!("cannot start the storage runtime: {e}")))?
            .block_on(work())
    };
    match tokio::runtime::Handle::try_current() {
        Ok(_) => std::thread::scope(|s| s.spawn(run).join().expect("storage thread")),
        Err(_) => run(),
    }
}

/// The storage flags every command that reads or writes a bucket takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct StoreArgs {
    /// Where this node caches what it fetches from object storage
    /// [default: $XDG_CACHE_HOME/lillm or ~/.cache/lillm].
    #[arg(long, env = "LILLM_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The most the cache may hold of datasets (bytes, or 512M, 50G, 1T) [default: 100G].
    #[arg(long, env = "LILLM_CACHE_BYTES", value_parser = cache::parse_bytes)]
    pub cache_bytes: Option<u64>,
    /// Object-storage credentials as `key = value` lines (AWS credentials-file form), for
    /// when the usual environment variables (AWS_ACCESS_KEY_ID, …) are not set.
    #[arg(long, env = "LILLM_CREDENTIALS_FILE")]
    pub credentials_file: Option<PathBuf>,
}

impl StoreArgs {
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
            cache_bytes: self.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
            credentials_file: self.credentials_file.clone(),
        }
    }
}
