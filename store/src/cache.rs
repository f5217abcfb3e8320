//! A node's bounded cache of dataset objects: files under `<cache-dir>/data/<scheme>/<bucket>/
//! <prefix>/`, whose shards (`*.bin`) take at most `limit` bytes in all (a manifest and a
//! tokenizer beside them are small and not counted). Files are only ever created by renaming a
//! verified download, so a file that is there with its recorded size is whole. When room is
//! needed, the least recently used files that the current dataset does not need go first;
//! a dataset that cannot fit is refused before anything is evicted.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    pub limit: u64,
}

impl Cache {
    pub fn new(dir: PathBuf, limit: u64) -> Self {
        Self { dir, limit }
    }

    fn data_root(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Where the object at `url` is kept.
    pub fn data_path(&self, url: &str) -> PathBuf {
        self.data_root().join(url_to_relative(url))
    }

    /// Where the run directory at `url` is mirrored (checkpoints in flight, the metrics log);
    /// outside the byte limit, which bounds datasets only (retention bounds a run).
    pub fn run_path(&self, url: &str) -> PathBuf {
        self.dir.join("runs").join(url_to_relative(url))
    }

    /// Frees room for `missing` more bytes, keeping every file in `needed`. Refuses when the
    /// needed files alone exceed the limit.
    pub fn make_room(&self, needed: &[PathBuf], needed_bytes: u64, missing: u64) -> Result<()> {
        if needed_bytes > self.limit {
            return Err(Error::Usage(format!(
                "the dataset needs {needed_bytes} bytes of cache, more than the {} bytes --cache-bytes allows in {}; raise --cache-bytes",
                self.limit,
                self.dir.display()
            )));
        }
        let mut files = Vec::new();
        collect_files(&self.data_root(), &mut files);
        let used: u64 = files.iter().map(|f| f.1).sum();
        let mut over = (used + missing).saturating_sub(self.limit);
        if over == 0 {
            return Ok(());
        }
        files.retain(|(path, _, _)| !needed.contains(path));
        files.sort_by_key(|f| f.2);
        for (path, bytes, _) in files {
            if over == 0 {
                break;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), bytes, "evicted from the cache");
                    over = over.saturating_sub(bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(())
    }

    /// Marks `path` used now, so that it is evicted last.
    pub fn touch(path: &Path) {
        if let Ok(f) = std::fs::File::options().append(true).open(path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Bytes held by the cache's shards.
    pub fn used(&self) -> u64 {
        let mut files = Vec::new();
        collect_files(&self.data_root(), &mut files);
        files.iter().map(|f| f.1).sum()
    }
}

/// `s3://bucket/a/b` → `s3/bucket/a/b`; no `..` can climb out of the cache.
fn url_to_relative(url: &str) -> PathBuf {
    let (scheme, rest) = url.split_once("://").unwrap_or(("local", url));
    let mut path = PathBuf::from(scheme);
    for part in rest.split('/') {
        if !part.is_empty() && part != "." && part != ".." {
            path.push(part);
        }
    }
    path
}

/// Every whole shard file under `dir`: (path, bytes, last modified). Downloads in progress
/// (`.part`) are not the cache's yet.
fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, u64, SystemTime)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            collect_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "bin") {
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((path, meta.len(), modified));
        }
    }
}

/// `50G`, `512M`, `1T`, `1000` (bytes); powers of 1024.
pub fn parse_bytes(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |i| t.split_at(i));
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "`{text}`: not a size; write bytes or a size like 512M, 50G, 1T"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: not a size; write bytes or a size like 512M, 50G, 1T"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}`: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("50G"), Ok(50 << 30));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn urls_map_inside_the_cache() {
        let cache = Cache::new("/c".into(), 1);
        assert_eq!(
            cache.data_path("s3://b/x/../y/"),
            PathBuf::from("/c/data/s3/b/x/y")
        );
        assert_eq!(
            cache.run_path("s3://b/run"),
            PathBuf::from("/c/runs/s3/b/run")
        );
    }

    #[test]
    fn eviction_takes_the_least_recently_used_files_the_dataset_does_not_need() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf(), 300);
        let root = dir.path().join("data/s3/b");
        std::fs::create_dir_all(&root).unwrap();
        let file = |name: &str, age_s: u64| {
            let p = root.join(format!("{name}.bin"));
            std::fs::write(&p, [0u8; 100]).unwrap();
            let f = std::fs::File::options().append(true).open(&p).unwrap();
            f.set_modified(SystemTime::now() - std::time::Duration::from_secs(age_s))
                .unwrap();
            p
        };
        let (old, newer, needed) = (file("old", 300), file("newer", 200), file("needed", 400));
        // 300 held, 100 more wanted: the oldest unneeded file goes, and only it.
        cache
            .make_room(std::slice::from_ref(&needed), 200, 100)
            .unwrap();
        assert!(!old.exists() && newer.exists() && needed.exists());
        assert!(cache.used() + 100 <= cache.limit);
        // More than the limit for the dataset alone is refused, and nothing is evicted.
        let err = cache
            .make_room(std::slice::from_ref(&needed), 301, 0)
            .unwrap_err();
        assert!(err.to_string().contains("--cache-bytes"), "{err}");
        assert!(newer.exists() && needed.exists());
    }
}
