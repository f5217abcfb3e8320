//! One object of a bucket as a local file: a fine-tuning JSONL (`lillm sft|dpo --data
//! s3://…/chat.jsonl`), read whole by each trainer. Kept in the node's cache beside the
//! datasets, with the version it was fetched at (its ETag), so a run that starts again
//! fetches it only when it was written again since.

use std::path::{Path, PathBuf};

use crate::{is_url, Error, Result, StoreOptions};

/// `location` as a local file: a path as it is, the URL of an object fetched into the cache.
pub async fn local_object(location: &Path, options: &StoreOptions) -> Result<PathBuf> {
    let url = location.to_string_lossy();
    if !is_url(&url) {
        return Ok(location.to_path_buf());
    }
    let (folder, name) = match url.rsplit_once('/') {
        Some((folder, name)) if !name.is_empty() && !folder.ends_with(':') => (folder, name),
        _ => {
            return Err(Error::Usage(format!(
                "{url}: names a folder; --data for fine-tuning is one JSONL object (…/chat.jsonl)"
            )))
        }
    };
    let bucket = options.bucket(folder)?;
    bucket.probe().await?;
    let Some((bytes, tag)) = bucket.version(name).await? else {
        return Err(Error::Remote {
            url: url.into_owned(),
            message: "no such object: upload the JSONL there or correct --data".into(),
        });
    };
    let dest = options.cache().data_path(&url);
    let tag_file = version_file(&dest);
    let cached = std::fs::metadata(&dest).is_ok_and(|m| m.len() == bytes)
        && std::fs::read_to_string(&tag_file).is_ok_and(|t| t == tag);
    if !cached {
        bucket.download_sized(name, &dest, bytes).await?;
        std::fs::write(&tag_file, &tag).map_err(|e| Error::io(&tag_file, e))?;
    }
    Ok(dest)
}

/// Where the version of the cached copy at `dest` is kept.
fn version_file(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map_or("object".into(), |n| n.to_string_lossy().into_owned());
    dest.with_file_name(format!(".{name}.version"))
}
