//! A prefix of an object store, addressed by URL (`s3://bucket/prefix/`, `gs://…`, `az://…`,
//! `file:///…`), with the few operations lillm needs: whole-file upload (multipart when
//! large), verified download, listing, deletion.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as Key;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, RetryConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use crate::{credentials, Error, Result};

/// Whether `location` names an object store rather than a local path.
pub fn is_url(location: &str) -> bool {
    [
        "s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "file://",
    ]
    .iter()
    .any(|scheme| location.starts_with(scheme))
}

/// What a downloaded object must be.
#[derive(Debug, Clone)]
pub struct Expected {
    pub bytes: u64,
    pub sha256: String,
}

/// Transient failures are retried for up to a minute; a refused connection gives up after
/// a few seconds' backoff, so a wrong endpoint is reported promptly.
fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 5,
        retry_timeout: Duration::from_secs(60),
    }
}

#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// The prefix every key of this location starts with.
    root: Key,
    /// The location as given, with one trailing `/`.
    url: String,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Bucket {
    /// Opens `location` with credentials from the environment, overridden by
    /// `credentials_file` when given. Nothing is sent yet (see [`Bucket::probe`]).
    pub fn open(location: &str, credentials_file: Option<&Path>) -> Result<Self> {
        let url = Url::parse(location)
            .map_err(|e| Error::Usage(format!("{location}: not a storage URL ({e})")))?;
        let mut options = match credentials_file {
            Some(path) => credentials::read_file(path)?,
            None => Vec::new(),
        };
        // The AWS CLI's name for a custom endpoint, which object_store reads as AWS_ENDPOINT.
        if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
            if !options.iter().any(|(k, _)| k.contains("endpoint")) {
                options.push(("aws_endpoint".into(), endpoint));
            }
        }
        let bad = |e: object_store::Error| Error::Usage(format!("{location}: {e}"));
        let (store, root): (Arc<dyn ObjectStore>, Key) = match url.scheme() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(location)
                    .with_retry(retry());
                for (k, v) in &options {
                    if let Ok(key) = k.parse() {
                        b = b.with_config(key, v);
                    }
                }
                (Arc::new(b.build().map_err(bad)?), path_of(&url)?)
            }
            "gs" => {
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .with_retry(retry());
                for (k, v) in &options {
                    if let Ok(key) = k.parse() {
                        b = b.with_config(key, v);
                    }
                }
                (Arc::new(b.build().map_err(bad)?), path_of(&url)?)
            }
            "az" | "abfs" | "abfss" => {
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(location)
                    .with_retry(retry());
                for (k, v) in &options {
                    if let Ok(key) = k.parse() {
                        b = b.with_config(key, v);
                    }
                }
                (Arc::new(b.build().map_err(bad)?), path_of(&url)?)
            }
            "file" => {
                let (store, root) = object_store::parse_url(&url).map_err(bad)?;
                (Arc::from(store), root)
            }
            other => {
                return Err(Error::Usage(format!(
                    "{location}: unsupported scheme `{other}`; use s3://, gs://, az:// or file://"
                )))
            }
        };
        Ok(Self {
            store,
            root,
            url: format!("{}/", location.trim_end_matches('/')),
        })
    }

    /// The location's URL, ending in `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of `rel` under this location.
    pub fn url_of(&self, rel: &str) -> String {
        format!("{}{rel}", self.url)
    }

    fn key(&self, rel: &str) -> Key {
        rel.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |k, part| k.join(part))
    }

    /// One cheap request that fails as the real work would: a missing bucket, wrong
    /// credentials or an unreachable endpoint are reported before anything is written.
    pub async fn probe(&self) -> Result<()> {
        self.store
            .list_with_delimiter(Some(&self.root))
            .await
            .map(|_| ())
            .map_err(|e| Error::remote(&self.url, e))
    }

    /// Uploads the file `local` as `rel`, in parts when it is large. The object appears
    /// whole or not at all.
    pub async fn put_file(&self, local: &Path, rel: &str) -> Result<()> {
        const PART: usize = 16 << 20;
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| Error::io(local, e))?;
        let mut writer = BufWriter::with_capacity(self.store.clone(), self.key(rel), PART);
        let mut buf = vec![0u8; PART];
        loop {
            let n = read_full(&mut file, &mut buf)
                .await
                .map_err(|e| Error::io(local, e))?;
            if n == 0 {
                break;
            }
            if let Err(e) = writer.put(Bytes::copy_from_slice(&buf[..n])).await {
                let _ = writer.abort().await;
                return Err(Error::remote(&self.url_of(rel), e));
            }
        }
        writer.shutdown().await.map_err(|e| Error::Remote {
            url: self.url_of(rel),
            message: format!("upload failed: {e}"),
        })
    }

    pub async fn put_bytes(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&self.key(rel), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| Error::remote(&self.url_of(rel), e))
    }

    /// The object `rel`, or `None` when there is none.
    pub async fn get_bytes(&self, rel: &str) -> Result<Option<Bytes>> {
        let got = match self.store.get(&self.key(rel)).await {
            Ok(got) => got,
            Err(e) if Error::is_not_found(&e) => return Ok(None),
            Err(e) => return Err(Error::remote(&self.url_of(rel), e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(|e| Error::remote(&self.url_of(rel), e))
    }

    /// The size of object `rel`, or `None` when there is none.
    pub async fn size(&self, rel: &str) -> Result<Option<u64>> {
        match self.store.head(&self.key(rel)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if Error::is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::remote(&self.url_of(rel), e)),
        }
    }

    /// The size of object `rel` and a tag that changes when it is written again (its ETag,
    /// else its modification time), or `None` when there is none.
    pub async fn version(&self, rel: &str) -> Result<Option<(u64, String)>> {
        match self.store.head(&self.key(rel)).await {
            Ok(meta) => {
                let tag = meta
                    .e_tag
                    .unwrap_or_else(|| meta.last_modified.to_rfc3339());
                Ok(Some((meta.size, tag)))
            }
            Err(e) if Error::is_not_found(&e) => Ok(None),
            Err(e) => Err(Error::remote(&self.url_of(rel), e)),
        }
    }

    /// Downloads `rel`, which has no manifest to verify it against, to `dest` (through a
    /// temporary sibling): a copy of another size than `bytes` is fetched once more, then
    /// refused with the object named.
    pub async fn download_sized(&self, rel: &str, dest: &Path, bytes: u64) -> Result<()> {
        let url = self.url_of(rel);
        let parent = dest.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::io(parent, e))?;
        let tmp = temp_sibling(dest);
        let mut got = 0;
        for attempt in 0..2 {
            got = self.fetch_to(rel, &tmp).await?.0;
            if got == bytes {
                return tokio::fs::rename(&tmp, dest)
                    .await
                    .map_err(|e| Error::io(dest, e));
            }
            if attempt == 0 {
                tracing::warn!(object = %url, got, bytes, "a short download; fetching it again");
            }
        }
        let _ = tokio::fs::remove_file(&tmp).await;
        Err(Error::Corrupt {
            url,
            message: format!(
                "twice downloaded as {got} bytes, but the bucket says {bytes}: the transfer is cut short; try again"
            ),
        })
    }

    /// The names directly under `rel/` that are "directories" (common prefixes).
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.key(rel)))
            .await
            .map_err(|e| Error::remote(&self.url_of(rel), e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Deletes the object `rel`, if there is one.
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self.store.delete(&self.key(rel)).await {
            Ok(()) => Ok(()),
            Err(e) if Error::is_not_found(&e) => Ok(()),
            Err(e) => Err(Error::remote(&self.url_of(rel), e)),
        }
    }

    /// Deletes every object under `rel/`, `first` before the others (a manifest, so that
    /// what remains of an interrupted deletion is uncommitted, never half a checkpoint).
    pub async fn delete_dir(&self, rel: &str, first: &str) -> Result<()> {
        let url = self.url_of(rel);
        self.delete(&format!("{rel}/{first}")).await?;
        let keys: Vec<_> = self
            .store
            .list(Some(&self.key(rel)))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| Error::remote(&url, e))?;
        for key in keys {
            match self.store.delete(&key).await {
                Ok(()) => {}
                Err(e) if Error::is_not_found(&e) => {}
                Err(e) => return Err(Error::remote(&url, e)),
            }
        }
        Ok(())
    }

    /// Downloads `rel` to `dest` (through a temporary sibling, renamed when it matches
    /// `expected`). A mismatch is fetched once more, then refused with the object named.
    pub async fn download(&self, rel: &str, dest: &Path, expected: &Expected) -> Result<()> {
        let url = self.url_of(rel);
        let parent = dest.parent().unwrap_or(Path::new("."));
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::io(parent, e))?;
        let tmp = temp_sibling(dest);
        let mut last = String::new();
        for attempt in 0..2 {
            let (bytes, sha256) = self.fetch_to(rel, &tmp).await?;
            if bytes == expected.bytes && sha256 == expected.sha256 {
                return tokio::fs::rename(&tmp, dest)
                    .await
                    .map_err(|e| Error::io(dest, e));
            }
            last = format!(
                "{bytes} bytes with SHA-256 {sha256}, but the manifest records {} bytes with SHA-256 {}",
                expected.bytes, expected.sha256
            );
            if attempt == 0 {
                tracing::warn!(object = %url, "{last}; fetching it again");
            }
        }
        let _ = tokio::fs::remove_file(&tmp).await;
        Err(Error::Corrupt {
            url,
            message: format!(
                "twice downloaded as {last}: the object is truncated or corrupted; write it again (for a dataset, `lillm data prepare --force --out` the same URL)"
            ),
        })
    }

    /// Streams `rel` into `path`, returning its size and SHA-256.
    async fn fetch_to(&self, rel: &str, path: &Path) -> Result<(u64, String)> {
        let url = self.url_of(rel);
        let got = self.store.get(&self.key(rel)).await.map_err(|e| {
            if Error::is_not_found(&e) {
                Error::Remote {
                    url: url.clone(),
                    message: "missing: the manifest lists it but the bucket does not hold it; write the dataset or checkpoint again".into(),
                }
            } else {
                Error::remote(&url, e)
            }
        })?;
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        let mut stream = got.into_stream();
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = stream
            .try_next()
            .await
            .map_err(|e| Error::remote(&url, e))?
        {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| Error::io(path, e))?;
        }
        file.sync_all().await.map_err(|e| Error::io(path, e))?;
        Ok((bytes, hex::encode(hasher.finalize())))
    }
}

fn path_of(url: &Url) -> Result<Key> {
    Key::from_url_path(url.path())
        .map_err(|e| Error::Usage(format!("{url}: not a valid object path ({e})")))
}

/// A name beside `dest` that no other process downloading the same object uses.
pub(crate) fn temp_sibling(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or("object".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(
        ".{name}.{}-{:x}.part",
        std::process::id(),
        rand_suffix()
    ))
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}
