//! Datasets through a `file://` bucket (object_store's local backend): the same upload,
//! verification and cache code as S3, without a server.

use std::path::Path;

use lillm_data::manifest::{Manifest, ShardInfo, TokenDtype, FORMAT};
use lillm_data::shards::Dataset;
use lillm_store::{dataset, Bucket, Cache};
use sha2::{Digest, Sha256};

/// A prepared dataset of `shards` train shards and one val shard, `tokens` u16 tokens each;
/// returns its size in bytes.
fn write_dataset(dir: &Path, shards: usize, tokens: u64, fill: u8) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let shard = |name: String| {
        let bytes = vec![fill; (tokens * 2) as usize];
        std::fs::write(dir.join(&name), &bytes).unwrap();
        ShardInfo {
            file: name,
            tokens,
            documents: 1,
            sha256: hex::encode(Sha256::digest(&bytes)),
        }
    };
    let manifest = Manifest {
        format: FORMAT.into(),
        tokenizer_fingerprint: "none".into(),
        vocab_size: 300,
        dtype: TokenDtype::U16,
        eos_id: 2,
        signature: format!("test-{fill}"),
        val_fraction: 0.1,
        seed: 1,
        train: (0..shards)
            .map(|i| shard(format!("train-{i:05}.bin")))
            .collect(),
        val: vec![shard("val-00000.bin".into())],
        bad_records_skipped: 0,
        input_bytes: 0,
    };
    manifest.write(dir).unwrap();
    (shards as u64 + 1) * tokens * 2
}

#[test]
fn the_cache_holds_what_the_current_dataset_needs_and_never_exceeds_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let bucket_dir = dir.path().join("bucket");
    std::fs::create_dir_all(&bucket_dir).unwrap();
    let bucket = |name: &str| {
        Bucket::open(&format!("file://{}/{name}/", bucket_dir.display()), None).unwrap()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut sizes = Vec::new();
    for (name, fill) in [("a", 1u8), ("b", 2u8)] {
        let local = dir.path().join(format!("prepared-{name}"));
        sizes.push(write_dataset(&local, 3, 1000, fill));
        let done = rt
            .block_on(dataset::upload(&local, &bucket(name), false))
            .unwrap();
        assert_eq!((done.shards, done.skipped), (4, 0));
        let again = rt
            .block_on(dataset::upload(&local, &bucket(name), false))
            .unwrap();
        assert_eq!((again.skipped, again.bytes), (4, 0), "nothing sent twice");
    }
    let (a, b) = (sizes[0], sizes[1]);

    // Room for one dataset and a half: fetching b evicts a's shards.
    let cache = Cache::new(dir.path().join("cache"), a + b / 2);
    let got_a = rt.block_on(dataset::fetch(&bucket("a"), &cache)).unwrap();
    Dataset::open(&got_a).unwrap();
    assert_eq!(cache.used(), a);
    let got_b = rt.block_on(dataset::fetch(&bucket("b"), &cache)).unwrap();
    Dataset::open(&got_b).unwrap();
    assert!(
        cache.used() <= cache.limit,
        "{} > {}",
        cache.used(),
        cache.limit
    );
    assert!(
        Dataset::open(&got_a).is_err(),
        "a lost shards to make room for b"
    );

    // A dataset larger than the whole cache is refused, and evicts nothing.
    let small = Cache::new(dir.path().join("cache"), a - 1);
    let err = rt
        .block_on(dataset::fetch(&bucket("a"), &small))
        .unwrap_err();
    assert!(err.to_string().contains("--cache-bytes"), "{err}");
    Dataset::open(&got_b).unwrap();
}
