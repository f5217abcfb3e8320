//! Tokenizer: trained and released tokenizers encode exactly as Python `tokenizers` and
//! `transformers` do; the special tokens have ids 0–15; the chat template renders as SPEC §6.

mod common;
use common::*;

const SAMPLES: &[&str] = &[
    "Hello world",
    "  leading spaces and trailing   ",
    "The quick brown fox jumps over the lazy dog.\n\nNew paragraph\twith tab.",
    "Unicode: café, naïve, 東京, emoji 🦀🔥, Ω≈ç√",
    "<r0>user<r1>What is the capital of France?</r2><r0>assistant<r1>Paris.</s>",
    "numbers 1234567890 and symbols !@#$%^&*()_+-=[]{};':\",./<>?",
    "</s><s><unk> special tokens inside text <r12>",
    "",
];

fn python_ids(tokenizer_json: &str) -> Vec<Vec<u32>> {
    let script = r#"
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps([tok.encode(t, add_special_tokens=False).ids for t in texts]))
"#;
    let out = python(
        script,
        &[tokenizer_json, &serde_json::to_string(SAMPLES).unwrap()],
    );
    serde_json::from_str(out.trim()).unwrap()
}

fn our_ids(tokenizer: &str, text: &str) -> Vec<u32> {
    let out = lillm_ok(&[
        "tokenizer",
        "encode",
        "--tokenizer",
        tokenizer,
        "--text",
        text,
    ]);
    serde_json::from_str(out.trim()).unwrap()
}

#[test]
fn released_lillm_tokenizer_encodes_and_decodes_like_python() {
    let reference = shared_reference("lilLM-tokenizer.json");
    let reference = s(&reference);
    let expected = python_ids(reference);
    for (text, want) in SAMPLES.iter().zip(expected) {
        let ids = our_ids(reference, text);
        assert_eq!(ids, want, "encoding of {text:?}");
        if !ids.is_empty() {
            let decoded = lillm_ok(&[
                "tokenizer",
                "decode",
                "--tokenizer",
                reference,
                "--ids",
                &serde_json::to_string(&ids).unwrap(),
            ]);
            assert_eq!(
                decoded.strip_suffix('\n').unwrap(),
                *text,
                "decode round trip"
            );
        }
    }
    // With the released tokenizer the role names are several ordinary tokens (SPEC §6).
    let user = our_ids(reference, "<r0>user<r1>");
    assert_eq!(user.first(), Some(&3));
    assert_eq!(user.last(), Some(&4));
    assert!(user.len() > 3, "`user` is several tokens: {user:?}");
}

#[test]
fn trained_tokenizer_has_specials_first_and_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c.txt");
    std::fs::write(&corpus, corpus_text(300, 1) + "café 東京 🦀\n").unwrap();
    let tok_dir = dir.path().join("tok");
    lillm_ok(&[
        "tokenizer",
        "train",
        "--input",
        s(&corpus),
        "--vocab-size",
        "400",
        "--out",
        s(&tok_dir),
    ]);
    let tok_json = tok_dir.join("tokenizer.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_json).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    assert_eq!(vocab.len(), 400, "vocab size includes the special tokens");
    let mut specials = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    specials.extend((0..13).map(|i| format!("<r{i}>")));
    for (id, token) in specials.iter().enumerate() {
        assert_eq!(
            vocab[token].as_u64(),
            Some(id as u64),
            "{token} has id {id}"
        );
    }
    assert_eq!(json["pre_tokenizer"]["type"], "ByteLevel");
    assert_eq!(json["pre_tokenizer"]["add_prefix_space"], false);
    assert_eq!(json["decoder"]["type"], "ByteLevel");
    assert!(
        json["post_processor"].is_null(),
        "no BOS is added automatically"
    );

    let expected = python_ids(s(&tok_json));
    for (text, want) in SAMPLES.iter().zip(expected) {
        assert_eq!(our_ids(s(&tok_dir), text), want, "encoding of {text:?}");
    }

    let script = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
chat = tok.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], tokenize=False)
prompt = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
print(json.dumps({"ids": [tok.encode(t, add_special_tokens=False) for t in texts], "chat": chat, "prompt": prompt,
                  "bos": tok.bos_token, "eos": tok.eos_token, "unk": tok.unk_token}))
"#;
    let out: serde_json::Value = serde_json::from_str(
        python(
            script,
            &[s(&tok_dir), &serde_json::to_string(SAMPLES).unwrap()],
        )
        .trim(),
    )
    .unwrap();
    for (text, want) in SAMPLES.iter().zip(out["ids"].as_array().unwrap()) {
        let want: Vec<u32> = serde_json::from_value(want.clone()).unwrap();
        assert_eq!(
            our_ids(s(&tok_dir), text),
            want,
            "transformers encoding of {text:?}"
        );
    }
    assert_eq!(
        out["chat"],
        "<r0>user<r1>Hi?</r2><r0>assistant<r1>Hello.</s>"
    );
    assert_eq!(out["prompt"], "<r0>user<r1>Hi?</r2><r0>assistant<r1>");
    assert_eq!(
        (
            out["bos"].as_str(),
            out["eos"].as_str(),
            out["unk"].as_str()
        ),
        (Some("<s>"), Some("</s>"), Some("<unk>"))
    );
}

#[test]
fn tokenizer_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.txt");
    let err = lillm_err(&[
        "tokenizer",
        "train",
        "--input",
        s(&missing),
        "--out",
        s(&dir.path().join("t")),
    ]);
    assert!(err.contains("nope.txt"), "{err}");
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = lillm_err(&[
        "tokenizer",
        "train",
        "--input",
        s(&empty),
        "--vocab-size",
        "300",
        "--out",
        s(&dir.path().join("t")),
    ]);
    assert!(err.contains("empty"), "{err}");
    let err = lillm_err(&[
        "tokenizer",
        "encode",
        "--tokenizer",
        s(&dir.path().join("none")),
        "--text",
        "x",
    ]);
    assert!(err.contains("tokenizer not found"), "{err}");
}
