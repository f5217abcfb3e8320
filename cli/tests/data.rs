//! Data preparation: shards end every document with </s>, the manifest records dtype, counts
//! and checksums, reruns are no-ops, and bad input fails with file:line without damage.

mod common;
use common::*;
use std::fs;

fn read_manifest(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
}

fn shard_tokens(path: &std::path::Path) -> Vec<u16> {
    fs::read(path)
        .unwrap()
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

#[test]
fn shards_hold_every_document_followed_by_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let jsonl = dir.path().join("docs.jsonl");
    let docs = [
        "first document",
        "second one, longer than the first",
        "third",
    ];
    let lines: Vec<String> = docs
        .iter()
        .map(|d| serde_json::json!({"body": d, "id": 1}).to_string())
        .collect();
    fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = dir.path().join("jsonl-data");
    lillm_ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&jsonl),
        "--field",
        "body",
        "--out",
        s(&out),
        "--val-fraction",
        "0",
    ]);
    let m = read_manifest(&out);
    assert_eq!(m["dtype"], "u16");
    assert_eq!(m["train"][0]["documents"], 3);
    let tokens = shard_tokens(&out.join(m["train"][0]["file"].as_str().unwrap()));
    let mut expected = Vec::new();
    for d in docs {
        let ids: Vec<u16> = serde_json::from_str(
            lillm_ok(&[
                "tokenizer",
                "encode",
                "--tokenizer",
                s(&tiny.tokenizer),
                "--text",
                d,
            ])
            .trim(),
        )
        .unwrap();
        expected.extend(ids);
        expected.push(2);
    }
    assert_eq!(tokens, expected);
    assert_eq!(m["train"][0]["tokens"], expected.len());
    lillm_ok(&["data", "verify", s(&out)]);
}

#[test]
fn split_is_seeded_and_rerun_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let m = read_manifest(&tiny.data);
    let val_docs = m["val"][0]["documents"].as_u64().unwrap();
    let train_docs = m["train"][0]["documents"].as_u64().unwrap();
    assert_eq!(val_docs + train_docs, 600);
    assert!(
        (30..=90).contains(&val_docs),
        "about 10% held out, got {val_docs}"
    );
    let before = fs::read(tiny.data.join("manifest.json")).unwrap();
    let prepare = |out: &std::path::Path, val_fraction: &str| {
        lillm(&[
            "data",
            "prepare",
            "--tokenizer",
            s(&tiny.tokenizer),
            "--input",
            s(&tiny.corpus),
            "--out",
            s(out),
            "--val-fraction",
            val_fraction,
        ])
    };
    let out = String::from_utf8(prepare(&tiny.data, "0.1").stdout).unwrap();
    assert!(out.contains("nothing to do"), "{out}");
    assert_eq!(fs::read(tiny.data.join("manifest.json")).unwrap(), before);
    // The same seed elsewhere gives the same split; the checksums agree.
    let again = dir.path().join("again");
    assert!(prepare(&again, "0.1").status.success());
    assert_eq!(read_manifest(&again)["val"], m["val"]);
    // Other options never overwrite an existing dataset silently.
    let refused = prepare(&tiny.data, "0.2");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("--force"), "{err}");
    assert_eq!(fs::read(tiny.data.join("manifest.json")).unwrap(), before);
}

#[test]
fn bad_records_fail_with_file_and_line_and_damage_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let before = fs::read(tiny.data.join("manifest.json")).unwrap();
    let tok = s(&tiny.tokenizer);
    let prepare = |input: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "data",
            "prepare",
            "--tokenizer",
            tok,
            "--input",
            s(input),
            "--out",
            s(&tiny.data),
            "--force",
            "--val-fraction",
            "0",
        ];
        args.extend_from_slice(extra);
        lillm(&args)
    };

    let bad_json = dir.path().join("bad.jsonl");
    fs::write(
        &bad_json,
        "{\"text\": \"fine\"}\n{\"text\": broken\n{\"other\": \"x\"}\n{\"text\": \"ok\"}\n",
    )
    .unwrap();
    let out = prepare(&bad_json, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.jsonl:2: not valid JSON"), "{err}");
    assert_eq!(
        fs::read(tiny.data.join("manifest.json")).unwrap(),
        before,
        "the existing dataset is untouched"
    );

    let missing_field = dir.path().join("field.jsonl");
    fs::write(
        &missing_field,
        "{\"text\": \"fine\"}\n{\"content\": \"x\"}\n",
    )
    .unwrap();
    let err = String::from_utf8_lossy(&prepare(&missing_field, &[]).stderr).into_owned();
    assert!(
        err.contains("field.jsonl:2: no string field `text`") && err.contains("--field"),
        "{err}"
    );

    let bad_utf8 = dir.path().join("latin1.txt");
    fs::write(&bad_utf8, b"good line\n\ncaf\xe9 au lait\n").unwrap();
    let err = String::from_utf8_lossy(&prepare(&bad_utf8, &[]).stderr).into_owned();
    assert!(err.contains("latin1.txt:3: invalid UTF-8"), "{err}");

    let err =
        String::from_utf8_lossy(&prepare(&dir.path().join("absent.txt"), &[]).stderr).into_owned();
    assert!(err.contains("absent.txt"), "{err}");
    assert_eq!(fs::read(tiny.data.join("manifest.json")).unwrap(), before);

    // --skip-bad counts and skips instead (and --force replaces the dataset only when done).
    let out = prepare(&bad_json, &["--skip-bad"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = read_manifest(&tiny.data);
    assert_eq!(m["bad_records_skipped"], 2);
    assert_eq!(m["train"][0]["documents"], 2);
}

#[test]
fn parquet_corpora_are_read_by_column() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let file = dir.path().join("owt.parquet");
    python(
        "import sys, pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({'text': ['the king', 'good night sweet prince'], 'n': [1, 2]}), sys.argv[1], compression='snappy')",
        &[s(&file)],
    );
    let out = dir.path().join("pq");
    lillm_ok(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&file),
        "--out",
        s(&out),
        "--val-fraction",
        "0",
    ]);
    assert_eq!(read_manifest(&out)["train"][0]["documents"], 2);
    let err = lillm_err(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&file),
        "--field",
        "body",
        "--out",
        s(&dir.path().join("pq2")),
    ]);
    assert!(
        err.contains("owt.parquet") && err.contains("no column `body`"),
        "{err}"
    );
}

#[test]
fn truncated_shard_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let m = read_manifest(&tiny.data);
    let shard = tiny.data.join(m["train"][0]["file"].as_str().unwrap());
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    let err = lillm_err(&["data", "verify", s(&tiny.data)]);
    assert!(
        err.contains("train-00000.bin") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn a_killed_prepare_leaves_no_dataset_that_looks_complete() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let big = dir.path().join("big.txt");
    fs::write(&big, corpus_text(60_000, 3)).unwrap();
    let out = dir.path().join("big-data");
    let args = [
        "data",
        "prepare",
        "--tokenizer",
        s(&tiny.tokenizer),
        "--input",
        s(&big),
        "--out",
        s(&out),
        "--val-fraction",
        "0.01",
        "--shard-tokens",
        "100000",
    ];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(args)
        .spawn()
        .unwrap();
    let staging = dir.path().join(".big-data.partial");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !staging.join("train-00000.bin").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "prepare never started writing"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.join("manifest.json").exists(),
        "an interrupted run leaves no dataset behind"
    );
    let err = lillm_err(&["data", "verify", s(&out)]);
    assert!(err.contains("big-data"), "{err}");
    // A rerun starts cleanly and finishes.
    lillm_ok(&args);
    lillm_ok(&["data", "verify", s(&out)]);
    assert!(!staging.exists());
}
