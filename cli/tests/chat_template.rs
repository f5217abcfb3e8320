//! The chat template has one source (the Jinja text in tokenizer_config.json): what lillm
//! renders equals `transformers`' `apply_chat_template` on the same tokenizer directory.

mod common;

use common::*;

#[test]
fn the_rust_rendering_equals_transformers_apply_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let conversations = serde_json::json!([
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?\nShow no work."},
            {"role": "assistant", "content": "6."}
        ],
        [
            {"role": "user", "content": "Say {{ braces }} and {% tags %} back, with a trailing newline\n"}
        ],
        [
            {"role": "system", "content": ""},
            {"role": "user", "content": "Ünïcödé — 日本語 🙂"}
        ]
    ]);
    for (i, messages) in conversations.as_array().unwrap().iter().enumerate() {
        let file = dir.path().join(format!("c{i}.json"));
        std::fs::write(&file, messages.to_string()).unwrap();
        for generation_prompt in [false, true] {
            let mut args = vec!["tokenizer", "render-chat", "--messages", s(&file)];
            if generation_prompt {
                args.push("--add-generation-prompt");
            }
            let ours = lillm_ok(&args);
            let theirs = python(
                "import json, sys\nfrom transformers import AutoTokenizer\ntok = AutoTokenizer.from_pretrained(sys.argv[1])\nmessages = json.load(open(sys.argv[2]))\nsys.stdout.write(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=sys.argv[3] == '1'))",
                &[s(&tiny.tokenizer), s(&file), if generation_prompt { "1" } else { "0" }],
            );
            assert_eq!(
                ours, theirs,
                "conversation {i}, add_generation_prompt={generation_prompt}"
            );
        }
    }
}
