//! The shards a dataloader holds. From a directory it holds them all. From a bucket it holds
//! the val split and the train shards the coordinator placed on it, fetched into the node's
//! cache when the placement names them; a request that needs the whole train split (random
//! windows, or a trainer without the placement) fetches the rest first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use lillm_data::manifest::Manifest;
use lillm_data::shards::Dataset;
use lillm_store::dataset::{self, RemoteManifest};
use lillm_store::{Bucket, StoreOptions};

/// Where the shards come from.
enum Source {
    /// A prepared directory: every shard is already here.
    Local,
    Bucket(Box<BucketSource>),
}

struct BucketSource {
    bucket: Bucket,
    options: StoreOptions,
    remote: RemoteManifest,
}

/// What this dataloader holds, replaced whole when the set of shards changes.
pub struct Holdings {
    source: Source,
    manifest: Manifest,
    data: RwLock<Arc<Dataset>>,
    /// Train shards held (`None`: all of them).
    held: tokio::sync::Mutex<Option<BTreeSet<usize>>>,
}

impl Holdings {
    /// Opens the dataset at `location`: a directory whole, a bucket URL with its val split
    /// and no train shard until [`Holdings::hold`] names some.
    pub async fn open(location: &Path, options: &StoreOptions) -> anyhow::Result<Self> {
        let text = location.to_string_lossy();
        if !lillm_store::is_url(&text) {
            let data = Dataset::open(location)?;
            return Ok(Self {
                source: Source::Local,
                manifest: data.manifest.clone(),
                data: RwLock::new(Arc::new(data)),
                held: tokio::sync::Mutex::new(None),
            });
        }
        let bucket = options.bucket(&text)?;
        bucket.probe().await?;
        let remote = dataset::fetch_manifest(&bucket).await?;
        let none = BTreeSet::new();
        let dir = dataset::fetch_holding(&bucket, &options.cache(), &remote, Some(&none)).await?;
        let data = Dataset::open_holding(&dir, Some(&none))?;
        Ok(Self {
            manifest: remote.manifest.clone(),
            source: Source::Bucket(Box::new(BucketSource {
                bucket,
                options: options.clone(),
                remote,
            })),
            data: RwLock::new(Arc::new(data)),
            held: tokio::sync::Mutex::new(Some(none)),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The dataset as held now.
    pub fn current(&self) -> Arc<Dataset> {
        self.data.read().expect("holdings lock").clone()
    }

    /// Holds the train shards `train` (`None`: all): fetches those missing and serves from
    /// the new set once every one of them is in. Shards no longer named stay in the cache
    /// until it needs their room. Nothing to do for a directory.
    pub async fn hold(&self, train: Option<BTreeSet<usize>>) -> anyhow::Result<()> {
        let Source::Bucket(source) = &self.source else {
            return Ok(());
        };
        let BucketSource {
            bucket,
            options,
            remote,
        } = source.as_ref();
        let mut held = self.held.lock().await;
        // Once the whole split was needed it stays held: a random-order job reads it all.
        if held.is_none() || *held == train {
            return Ok(());
        }
        let dir: PathBuf =
            dataset::fetch_holding(bucket, &options.cache(), remote, train.as_ref()).await?;
        let data = Dataset::open_holding(&dir, train.as_ref())?;
        *self.data.write().expect("holdings lock") = Arc::new(data);
        tracing::info!(
            shards = train
                .as_ref()
                .map_or(self.manifest.train.len(), BTreeSet::len),
            "holding the train shards placed here"
        );
        *held = train;
        Ok(())
    }

    /// Holds the whole train split (fetching what is missing).
    pub async fn hold_all(&self) -> anyhow::Result<()> {
        self.hold(None).await
    }
}
