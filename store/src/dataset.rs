//! Prepared datasets in a bucket: uploaded shards first and the manifest last (so a
//! dataset is in the bucket exactly when its manifest is), and fetched into a node's
//! cache, each shard verified against the manifest's SHA-256.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use lillm_data::manifest::{Manifest, ShardInfo, FORMAT, MANIFEST_FILE};
use lillm_data::tokenizer::Tokenizer;

use crate::bucket::{temp_sibling, Bucket, Expected};
use crate::cache::Cache;
use crate::{Error, Result};

/// The tokenizer a prepared dataset carries beside its shards (dataloaders hand it to
/// trainers, which put it into every checkpoint). The manifest records its fingerprint.
const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// What an upload did.
#[derive(Debug, Default, PartialEq)]
pub struct Uploaded {
    pub shards: usize,
    /// Shards the bucket already held, byte for byte (by the manifest it held).
    pub skipped: usize,
    pub bytes: u64,
}

/// Uploads the prepared dataset in `local` to `bucket`. Shards the bucket's own manifest
/// already records with the same SHA-256 are kept, unless `force` (which rewrites every
/// object, mending a damaged one); otherwise that manifest is removed first, so no reader
/// ever pairs it with new shards.
pub async fn upload(local: &Path, bucket: &Bucket, force: bool) -> Result<Uploaded> {
    let manifest = Manifest::read(local)?;
    bucket.probe().await?;
    let held = match bucket.get_bytes(MANIFEST_FILE).await? {
        Some(_) if force => {
            bucket.delete(MANIFEST_FILE).await?;
            None
        }
        Some(bytes) => serde_json::from_slice::<Manifest>(&bytes).ok(),
        None => None,
    };
    let shards = || manifest.train.iter().chain(&manifest.val);
    if held.as_ref() == Some(&manifest) {
        for name in TOKENIZER_FILES {
            let path = local.join(name);
            if path.is_file() && bucket.size(name).await?.is_none() {
                bucket.put_file(&path, name).await?;
            }
        }
        return Ok(Uploaded {
            shards: shards().count(),
            skipped: shards().count(),
            bytes: 0,
        });
    }
    let held_shards: Vec<ShardInfo> = held
        .map(|m| m.train.into_iter().chain(m.val).collect())
        .unwrap_or_default();
    if !held_shards.is_empty() {
        bucket.delete(MANIFEST_FILE).await?;
    }
    let mut done = Uploaded::default();
    for shard in shards() {
        done.shards += 1;
        let bytes = shard.tokens * manifest.dtype.bytes() as u64;
        let same = held_shards
            .iter()
            .any(|h| h.file == shard.file && h.sha256 == shard.sha256);
        if same && bucket.size(&shard.file).await? == Some(bytes) {
            done.skipped += 1;
            continue;
        }
        bucket
            .put_file(&local.join(&shard.file), &shard.file)
            .await?;
        done.bytes += bytes;
    }
    for name in TOKENIZER_FILES {
        let path = local.join(name);
        if path.is_file() {
            bucket.put_file(&path, name).await?;
        }
    }
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    bucket.put_bytes(MANIFEST_FILE, text).await?;
    Ok(done)
}

/// The dataset at `bucket` as a local directory of `cache`, fetching the shards it lacks.
pub async fn fetch(bucket: &Bucket, cache: &Cache) -> Result<PathBuf> {
    let remote = fetch_manifest(bucket).await?;
    fetch_holding(bucket, cache, &remote, None).await
}

/// A dataset's manifest as the bucket holds it, and its text.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    pub manifest: Manifest,
    text: Vec<u8>,
}

/// Reads and checks the manifest of the dataset at `bucket`.
pub async fn fetch_manifest(bucket: &Bucket) -> Result<RemoteManifest> {
    let manifest_url = bucket.url_of(MANIFEST_FILE);
    let text = bucket.get_bytes(MANIFEST_FILE).await?.ok_or_else(|| Error::Remote {
        url: manifest_url.clone(),
        message: "no manifest: this is not a prepared dataset (run `lillm data prepare --out` to this URL), or its upload did not finish".into(),
    })?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| Error::Remote {
        url: manifest_url.clone(),
        message: format!("malformed manifest: {e}"),
    })?;
    if manifest.format != FORMAT {
        return Err(Error::Remote {
            url: manifest_url,
            message: format!(
                "format `{}` is not `{FORMAT}`; prepare the dataset again",
                manifest.format
            ),
        });
    }
    Ok(RemoteManifest {
        manifest,
        text: text.to_vec(),
    })
}

/// The dataset at `bucket` as a local directory of `cache` holding the train shards in
/// `train` (all when `None`) and every val shard: what is missing is fetched and verified,
/// and the cache makes room by dropping what nothing asked for lately.
pub async fn fetch_holding(
    bucket: &Bucket,
    cache: &Cache,
    remote: &RemoteManifest,
    train: Option<&BTreeSet<usize>>,
) -> Result<PathBuf> {
    let (manifest, text) = (&remote.manifest, &remote.text);
    let dir = cache.data_path(bucket.url());
    let wanted: Vec<&ShardInfo> = manifest
        .train
        .iter()
        .enumerate()
        .filter(|(i, _)| train.is_none_or(|t| t.contains(i)))
        .map(|(_, s)| s)
        .chain(&manifest.val)
        .collect();
    let size = |s: &ShardInfo| s.tokens * manifest.dtype.bytes() as u64;
    let paths: Vec<PathBuf> = wanted.iter().map(|s| dir.join(&s.file)).collect();
    // A file of the right size under its final name came from a verified download; one of
    // another dataset's manifest with the same name is replaced.
    let local = Manifest::read(&dir).ok();
    let missing: Vec<&ShardInfo> = wanted
        .iter()
        .copied()
        .filter(|s| {
            let same_shard = local.as_ref().is_some_and(|m| {
                m.train
                    .iter()
                    .chain(&m.val)
                    .any(|l| l.file == s.file && l.sha256 == s.sha256)
            });
            let whole = std::fs::metadata(dir.join(&s.file)).is_ok_and(|m| m.len() == size(s));
            !(same_shard && whole)
        })
        .collect();
    let needed_bytes: u64 = wanted.iter().map(|s| size(s)).sum();
    let missing_bytes: u64 = missing.iter().map(|s| size(s)).sum();
    cache.make_room(&paths, needed_bytes, missing_bytes)?;
    // The local manifest goes first: until the shards are all in, this directory is not
    // a dataset, and a reader of it is refused.
    let local_manifest = dir.join(MANIFEST_FILE);
    if local.as_ref() != Some(manifest) {
        match std::fs::remove_file(&local_manifest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&local_manifest, e)),
        }
    }
    for shard in &missing {
        tracing::info!(object = %bucket.url_of(&shard.file), bytes = size(shard), "fetching a shard");
        let expected = Expected {
            bytes: size(shard),
            sha256: shard.sha256.clone(),
        };
        bucket
            .download(&shard.file, &dir.join(&shard.file), &expected)
            .await?;
    }
    fetch_tokenizer(bucket, &dir, manifest).await?;
    for path in &paths {
        Cache::touch(path);
    }
    let tmp = temp_sibling(&local_manifest);
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &local_manifest).map_err(|e| Error::io(&local_manifest, e))?;
    Ok(dir)
}

/// Fetches the dataset's tokenizer files and checks `tokenizer.json` against the fingerprint
/// the manifest records.
async fn fetch_tokenizer(bucket: &Bucket, dir: &Path, manifest: &Manifest) -> Result<()> {
    for name in TOKENIZER_FILES {
        let Some(bytes) = bucket.get_bytes(name).await? else {
            continue;
        };
        let path = dir.join(name);
        let tmp = temp_sibling(&path);
        std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    }
    let path = dir.join(TOKENIZER_FILES[0]);
    if !path.is_file() {
        return Ok(());
    }
    let fingerprint = Tokenizer::load(&path)?.fingerprint()?;
    if fingerprint != manifest.tokenizer_fingerprint {
        return Err(Error::Corrupt {
            url: bucket.url_of(TOKENIZER_FILES[0]),
            message: format!(
                "its fingerprint {fingerprint} is not the manifest's {}: the tokenizer beside the shards is not the one they were prepared with; prepare the dataset again",
                manifest.tokenizer_fingerprint
            ),
        });
    }
    Ok(())
}
