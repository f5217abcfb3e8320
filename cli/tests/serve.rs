//! `lillm serve`: the official `openai` Python client talks to it (plain and streaming), bad
//! requests get OpenAI-shaped 4xx errors while the server keeps serving, concurrent requests
//! are decoded together and answer as they do alone, a client that goes away frees its
//! place, a burst past the queue gets 429 with `Retry-After`, and a headless Chromium chats
//! through the web page.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Server {
    child: Child,
    url: String,
    /// The server's stderr, printed when a test fails.
    log: tempfile::NamedTempFile,
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("lillm serve's stderr:\n{}", self.log());
        }
    }
}

fn serve(checkpoint: &std::path::Path, extra: &[&str]) -> Server {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args([
            "serve",
            "--checkpoint",
            s(checkpoint),
            "--port",
            "0",
            "--device",
            "cpu",
            "--model-name",
            "tiny",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("lillm serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split("on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("address line")
        .trim_end_matches('/')
        .to_string();
    Server { child, url, log }
}

fn model(dir: &std::path::Path) -> std::path::PathBuf {
    tiny_pretrained(dir, "128", "5").1
}

const CLIENT: &str = r#"
import json, sys, threading, urllib.request, urllib.error
from openai import OpenAI, APIStatusError
url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=url + "/v1", api_key=key)
out = {}
out["models"] = [m.id for m in client.models.list().data]
r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "who is the king?"}], max_tokens=8, seed=1, temperature=0.7)
out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason, "usage": r.usage.model_dump()}
chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "who is the king?"}], max_tokens=8, seed=1, temperature=0.7, stream=True))
out["stream"] = {"text": "".join(c.choices[0].delta.content or "" for c in chunks), "content_chunks": sum(1 for c in chunks if c.choices[0].delta.content), "finish": chunks[-1].choices[0].finish_reason}
c = client.completions.create(model="tiny", prompt="the king", max_tokens=6, seed=3, temperature=0.9, stop=["\n"])
out["completion"] = {"text": c.choices[0].text, "usage": c.usage.model_dump()}
sc = list(client.completions.create(model="tiny", prompt="the king", max_tokens=6, seed=3, temperature=0.9, stop=["\n"], stream=True))
out["completion_stream"] = "".join(x.choices[0].text for x in sc)
# n choices: choice i samples with seed + i, so choice 0 is the single answer; streamed with
# include_usage, the chunks spell the same choices and a last chunk carries the usage.
many = client.completions.create(model="tiny", prompt="the king", max_tokens=6, seed=3, temperature=0.9, stop=["\n"], n=3)
out["n"] = {"texts": [c.text for c in sorted(many.choices, key=lambda c: c.index)], "usage": many.usage.model_dump()}
streamed = {}
usage_chunks = []
for x in client.completions.create(model="tiny", prompt="the king", max_tokens=6, seed=3, temperature=0.9, stop=["\n"], n=3, stream=True, stream_options={"include_usage": True}):
    if x.usage:
        usage_chunks.append({"usage": x.usage.model_dump(), "choices": len(x.choices)})
    for c in x.choices:
        streamed[c.index] = streamed.get(c.index, "") + c.text
out["n_stream"] = {"texts": [streamed.get(i, "") for i in range(3)], "usage_chunks": usage_chunks}
plain = list(client.completions.create(model="tiny", prompt="the king", max_tokens=4, stream=True))
out["usage_without_asking"] = sum(1 for x in plain if x.usage)
chat3 = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "who is the king?"}], max_tokens=8, seed=1, temperature=0.7, n=3)
out["chat_n"] = [c.message.content for c in sorted(chat3.choices, key=lambda c: c.index)]
# Log-probabilities: greedy, so each chosen token is its own most likely alternative.
lp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "who is the king?"}], max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
out["chat_logprobs"] = {"content": [e.model_dump() for e in lp.choices[0].logprobs.content], "tokens": lp.usage.completion_tokens}
lps = [e for x in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "who is the king?"}], max_tokens=6, temperature=0, logprobs=True, stream=True) if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]
out["chat_logprobs_stream"] = [e.model_dump() for e in lps]
clp = client.completions.create(model="tiny", prompt="the king", max_tokens=6, temperature=0, logprobs=2)
out["completion_logprobs"] = {"logprobs": clp.choices[0].logprobs.model_dump(), "tokens": clp.usage.completion_tokens}
# A frequency penalty makes greedy decoding avoid repeating itself.
def greedy(**kw):
    return client.completions.create(model="tiny", prompt="the king", max_tokens=40, temperature=0, **kw).choices[0].text
out["greedy"] = greedy()
out["penalised"] = greedy(frequency_penalty=2.0, presence_penalty=2.0)

def status(call):
    try:
        call()
        return None
    except APIStatusError as e:
        return {"status": e.status_code, "body": e.body}
out["unknown_model"] = status(lambda: client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}]))
out["too_long"] = status(lambda: client.completions.create(model="tiny", prompt="the king " * 400, max_tokens=5))
out["past_context"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5000))
out["bad_logprobs"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5, logprobs=9))
out["top_without_logprobs"] = status(lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, top_logprobs=2))
out["bad_n"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5, n=0))
out["bad_penalty"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5, presence_penalty=3))
out["bad_bias"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5, logit_bias={"7": 101}))
out["bad_bias_id"] = status(lambda: client.completions.create(model="tiny", prompt="the king", max_tokens=5, logit_bias={"999999": 1}))
out["negative"] = status(lambda: client.completions.create(model="tiny", prompt="x", max_tokens=-3))
out["no_key"] = status(lambda: OpenAI(base_url=url + "/v1", api_key="wrong").models.list())
req = urllib.request.Request(url + "/v1/chat/completions", data=b"{not json", headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
try:
    urllib.request.urlopen(req)
except urllib.error.HTTPError as e:
    out["bad_json"] = {"status": e.code, "body": json.loads(e.read())}

# Eight concurrent requests with one seed give eight copies of the sequential answer.
results = [None] * 8
def worker(i):
    results[i] = client.completions.create(model="tiny", prompt="good night", max_tokens=10, seed=42, temperature=1.0).choices[0].text
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
out["concurrent"] = results
out["sequential"] = client.completions.create(model="tiny", prompt="good night", max_tokens=10, seed=42, temperature=1.0).choices[0].text
print(json.dumps(out))
"#;

const BURST: &str = r#"
import json, sys, threading
from openai import OpenAI, APIStatusError
url = sys.argv[1]
client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
results = [None] * 8
start = threading.Barrier(8)
def worker(i):
    start.wait()
    try:
        # `</s>` (id 2) banned: the one being answered holds its place for all 120 tokens.
        client.completions.create(model="tiny", prompt="the king", max_tokens=120, seed=i, temperature=1.0, logit_bias={"2": -100})
        results[i] = {"ok": True}
    except APIStatusError as e:
        results[i] = {"status": e.status_code, "body": e.body, "retry_after": e.response.headers.get("retry-after")}
threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
after = client.completions.create(model="tiny", prompt="the king", max_tokens=4, seed=1).choices[0].finish_reason
print(json.dumps({"burst": results, "after": after}))
"#;

/// One request generating and one waiting (`--max-batch 1 --max-queue 1`): the rest of a
/// burst of eight is refused at once with 429, OpenAI's error shape and `Retry-After`, and
/// the server goes on serving.
#[test]
fn a_burst_past_the_queue_gets_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let run = model(dir.path());
    let server = serve(&run, &["--max-batch", "1", "--max-queue", "1"]);
    let out: serde_json::Value =
        serde_json::from_str(python(BURST, &[&server.url]).trim()).unwrap();
    let burst = out["burst"].as_array().unwrap();
    let served = burst.iter().filter(|r| r["ok"] == true).count();
    let refused: Vec<_> = burst.iter().filter(|r| r["status"] == 429).collect();
    assert!(served >= 1 && served + refused.len() == 8, "{out}");
    assert!(!refused.is_empty(), "a burst of 8 past a queue of 1: {out}");
    let refused_n = refused.len();
    for r in refused {
        assert_eq!(r["retry_after"], "1", "{r}");
        assert_eq!(r["body"]["code"], "server_busy", "{r}");
        assert_eq!(r["body"]["type"], "rate_limit_error", "{r}");
    }
    assert!(out["after"].is_string(), "still serving: {out}");
    let zero = lillm_err(&["serve", "--checkpoint", s(&run), "--max-queue", "0"]);
    assert!(zero.contains("--max-queue must be at least 1"), "{zero}");
    let metrics = http_get(&format!("{}/metrics", server.url));
    let busy = metric(&metrics, "lillm_serve_requests_total{outcome=\"busy\"}");
    assert_eq!(busy as usize, refused_n, "{metrics}");
    // The operator is told why requests waited, and which setting to raise: once.
    let log = server.log();
    let full = log.matches("the batch is full (--max-batch 1)").count();
    assert_eq!(full, 1, "{log}");
}

const BATCHED: &str = r#"
import json, sys, threading, time
from openai import OpenAI
url = sys.argv[1]
client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
prompts = ["the king", "good night sweet prince, and", "who", "the queen of the land is here and", "to be or not", "night"]
def greedy(i):
    return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=30 + 15 * i, temperature=0).choices[0].text
def sampled():
    return client.completions.create(model="tiny", prompt="once upon a time", max_tokens=60, temperature=1.0, seed=7).choices[0].text
alone = [greedy(i) for i in range(6)] + [sampled()]
def together(stagger):
    answers = [None] * 7
    start = threading.Barrier(7)
    def worker(i):
        start.wait()
        time.sleep(stagger * i)  # staggered: later requests join a batch already running
        answers[i] = greedy(i) if i < 6 else sampled()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(7)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return answers
# A burst (prompts prefilled together in one forward), then staggered arrivals.
print(json.dumps({"alone": alone, "burst": together(0.0), "staggered": together(0.002)}))
"#;

const ONE_COMPLETION: &str = r#"
import sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0)
reply = client.completions.create(model="tiny", prompt="the king", max_tokens=12, temperature=0)
print(reply.choices[0].finish_reason, reply.usage.completion_tokens)
"#;

const CANCEL: &str = r#"
import json, sys
from openai import OpenAI
url = sys.argv[1]
client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
# A long stream whose client goes away after its first chunk, then a plain request that
# the same client abandons (its timeout), then one that waits for its answer. `</s>` (id 2) is
# banned so that neither long request can end early, whatever this CPU's model samples.
stream = client.completions.create(model="tiny", prompt="the king", max_tokens=400, temperature=1.0, seed=3, stream=True, logit_bias={"2": -100})
next(iter(stream))
stream.close()
try:
    client.with_options(timeout=0.5).completions.create(model="tiny", prompt="the king", max_tokens=400, temperature=1.0, seed=4, logit_bias={"2": -100})
    abandoned = "answered"
except Exception as e:
    abandoned = type(e).__name__
after = client.completions.create(model="tiny", prompt="the king", max_tokens=3, temperature=0).choices[0].finish_reason
print(json.dumps({"abandoned": abandoned, "after": after}))
"#;

/// Requests decoded together (continuous batching) — different prompt lengths and token
/// budgets, arriving in a burst (prefilled together) or joining a running batch, and
/// leaving it as they end — answer exactly what each answers alone: greedy token for token, and a sampled request with a seed the same text
/// alone and among six others. `/metrics` shows that they did run together.
#[test]
fn requests_decoded_together_answer_as_they_do_alone() {
    let dir = tempfile::tempdir().unwrap();
    let run = model(dir.path());
    let server = serve(&run, &["--max-batch", "8"]);
    let out: serde_json::Value =
        serde_json::from_str(python(BATCHED, &[&server.url]).trim()).unwrap();
    assert_eq!(out["alone"], out["burst"], "{out}");
    assert_eq!(out["alone"], out["staggered"], "{out}");
    let metrics = http_get(&format!("{}/metrics", server.url));
    let peak = metric(&metrics, "lillm_serve_batch_size_peak");
    let prefilled = metric(&metrics, "lillm_serve_prefill_batch_peak");
    eprintln!("at most {peak} requests decoded and {prefilled} prompts prefilled together");
    assert!(peak >= 2.0, "requests ran together: {metrics}");
    assert!(
        prefilled >= 2.0,
        "prompts were prefilled together: {metrics}"
    );
    // Seven requests alone, fourteen together: each timed to its first token, each completed.
    let first_tokens = metric(&metrics, "lillm_serve_time_to_first_token_seconds_count");
    assert_eq!(first_tokens, 21.0, "{metrics}");
    let completed = metric(
        &metrics,
        "lillm_serve_requests_total{outcome=\"completed\"}",
    );
    assert_eq!(completed, 21.0, "{metrics}");
    // The KV cache is allocated at start for every slot: keys and values × 2 layers × 8 slots
    // × 2 KV heads × 128 positions × head dim 8 × 4 bytes (float32).
    let kv = metric(&metrics, "lillm_serve_kv_cache_bytes");
    assert_eq!(kv, (2 * 2 * 8 * 2 * 128 * 8 * 4) as f64, "{metrics}");
    assert!(
        metric(&metrics, "lillm_serve_weight_bytes") > 0.0,
        "{metrics}"
    );
    // The step the CUDA graphs capture — every batch padded to its bucket, attending over the
    // whole context — run without capture here: the same answers, alone and together.
    let fixed = serve(&run, &["--max-batch", "8", "--decode", "static"]);
    let same: serde_json::Value =
        serde_json::from_str(python(BATCHED, &[&fixed.url]).trim()).unwrap();
    for key in ["alone", "burst", "staggered"] {
        assert_eq!(out["alone"], same[key], "--decode static, {key}: {same}");
    }
    // Its prompts are prefilled into caches of their own, one per length bucket (16, 32, 64
    // and the longest prompt that fits the 128-position context, 127), counted at start;
    // the eager server has none.
    let prefill_caches = |url: &str| {
        metric(
            &http_get(&format!("{url}/metrics")),
            "lillm_serve_prefill_cache_bytes",
        )
    };
    let positions = 16 + 32 + 64 + 127;
    assert_eq!(
        prefill_caches(&fixed.url),
        (2 * 2 * 2 * positions * 8 * 4) as f64
    );
    assert_eq!(prefill_caches(&server.url), 0.0);
    drop(fixed);
    let graphs = lillm_err(&[
        "serve",
        "--checkpoint",
        s(&run),
        "--device",
        "cpu",
        "--decode",
        "graphs",
    ]);
    assert!(
        graphs.contains("--decode graphs needs a CUDA device"),
        "{graphs}"
    );
    // `lillm generate` decodes with the server's generator: the sampled request's text.
    let generated = lillm_ok(&[
        "generate",
        "--checkpoint",
        s(&run),
        "--prompt",
        "once upon a time",
        "--max-new-tokens",
        "60",
        "--temperature",
        "1.0",
        "--top-k",
        "0",
        "--top-p",
        "1.0",
        "--seed",
        "7",
        "--device",
        "cpu",
    ]);
    let served = out["alone"][6].as_str().unwrap();
    assert_eq!(
        generated.trim_end_matches('\n'),
        format!("once upon a time{served}"),
        "lillm generate and lillm serve answer alike"
    );
    let zero = lillm_err(&["serve", "--checkpoint", s(&run), "--max-batch", "0"]);
    assert!(zero.contains("--max-batch must be at least 1"), "{zero}");
    let zero = lillm_err(&["serve", "--checkpoint", s(&run), "--threads", "0"]);
    assert!(zero.contains("--threads must be at least 1"), "{zero}");
    let fp8 = lillm_err(&["serve", "--checkpoint", s(&run), "--dtype", "fp8"]);
    assert!(
        fp8.contains("dtype `fp8` is not one of auto, float32, bfloat16"),
        "{fp8}"
    );
    // In bfloat16 (one thread) the server answers too, token budget honoured.
    let bf16 = serve(&run, &["--dtype", "bfloat16", "--threads", "1"]);
    let out = python(ONE_COMPLETION, &[&bf16.url]);
    let (reason, tokens) = out.trim().split_once(' ').expect("reason and tokens");
    let tokens: usize = tokens.parse().unwrap();
    assert!(
        (reason == "length" && tokens == 12) || (reason == "stop" && tokens < 12),
        "{out}"
    );
}

const LONG: &str = r#"
import json, sys, threading
from openai import OpenAI
url = sys.argv[1]
client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
def ask(prompt, n):
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    return {"text": r.choices[0].text, "prompt_tokens": r.usage.prompt_tokens}
# About 300 tokens in this tokenizer: three chunks of 128, the last one partial.
unit = "the king and the queen of the land said good night "
long_prompt = unit * (300 // ask(unit, 1)["prompt_tokens"])
out = {"long": ask(long_prompt, 12), "short": ask("good night", 20)}
together = {}
def run(key, prompt, n):
    together[key] = ask(prompt, n)
threads = [threading.Thread(target=run, args=("short", "good night", 20)),
           threading.Thread(target=run, args=("long", long_prompt, 12))]
[t.start() for t in threads]
[t.join() for t in threads]
out["together"] = together
print(json.dumps(out))
"#;

/// A prompt longer than a prefill chunk (128 tokens) is prefilled a chunk per step. With
/// fixed shapes (`--decode static`, what CUDA graphs replay: chunks at fixed starts into one
/// cache, the last one padded) it gets the eager server's greedy answer, alone and while a
/// short request decodes beside it.
#[test]
fn a_long_prompt_prefilled_in_fixed_chunks_answers_as_eagerly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run) = tiny_pretrained(dir.path(), "400", "5");
    let answers = |decode: &str| -> serde_json::Value {
        let server = serve(&run, &["--max-batch", "4", "--decode", decode]);
        serde_json::from_str(python(LONG, &[&server.url]).trim()).unwrap()
    };
    let (eager, fixed) = (answers("eager"), answers("static"));
    let prompt_tokens = eager["long"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > 256 && prompt_tokens < 388,
        "three chunks, the last one partial: {eager}"
    );
    assert_eq!(fixed["long"], eager["long"], "alone");
    assert_eq!(
        fixed["together"]["long"], eager["long"],
        "beside a short one"
    );
    assert_eq!(fixed["together"]["short"], eager["short"], "{fixed}");
    assert_eq!(eager["together"]["long"], eager["long"], "{eager}");
}

/// With one place in the batch (`--max-batch 1`), a long request whose client goes away —
/// a stream closed after its first chunk, a plain request past its client's timeout — stops
/// at the next step: the request after it is answered at once, and `/metrics` counts both
/// as cancelled, neither as completed. Decoding takes milliseconds per token here, so each
/// of the 400-token requests would otherwise run for seconds.
#[test]
fn a_client_that_goes_away_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let run = slow_model(dir.path());
    let server = serve(&run, &["--max-batch", "1"]);
    let out: serde_json::Value =
        serde_json::from_str(python(CANCEL, &[&server.url]).trim()).unwrap();
    assert!(
        out["abandoned"].as_str().unwrap().contains("Timeout"),
        "{out}"
    );
    assert!(out["after"].is_string(), "{out}");
    let metrics = http_get(&format!("{}/metrics", server.url));
    let count = |outcome: &str| {
        metric(
            &metrics,
            &format!("lillm_serve_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("cancelled"), 2.0, "{metrics}");
    assert_eq!(count("completed"), 1.0, "{metrics}");
}

/// A model that decodes in milliseconds per token on this CPU (untrained: its text is
/// noise), so that a long request runs for seconds.
fn slow_model(dir: &std::path::Path) -> std::path::PathBuf {
    let tiny = tiny_data(dir, 300);
    let run = dir.join("slow");
    let mut args = tiny_train_args(s(&tiny.data), s(&run), "300", "1");
    for (flag, value) in [
        ("--d-model", "512"),
        ("--n-layers", "8"),
        ("--q-heads", "8"),
        ("--kv-heads", "4"),
        ("--max-seq-len", "512"),
        ("--batch-size", "1"),
    ] {
        set_flag(&mut args, flag, value);
    }
    lillm_ok(&args);
    run
}

const DRAIN: &str = r#"
import http.client, json, sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1])
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "the king", "max_tokens": 200, "temperature": 1.0, "seed": 1, "stream": True, "logit_bias": {"2": -100}}), {"Content-Type": "application/json"})
response = conn.getresponse()
events, done, finish = 0, False, None
for line in response:
    if line.startswith(b"data: [DONE]"):
        done = True
    elif line.startswith(b"data: "):
        events += 1
        if events == 1:
            print("started", flush=True)
        finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
try:
    http.client.HTTPConnection(u.hostname, u.port, timeout=5).request("GET", "/health")
    refused = False
except OSError:
    refused = True
print(json.dumps({"events": events, "done": done, "finish": finish, "new_connection_refused": refused}))
"#;

/// SIGTERM while a long reply streams: the server stops accepting connections, finishes
/// the reply to its `[DONE]`, and exits 0. `</s>` is banned (`logit_bias`), so the reply runs
/// to its length whatever the sampled model would say on this CPU.
#[test]
fn sigterm_finishes_the_running_replies_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let run = slow_model(dir.path());
    let mut server = serve(&run, &[]);
    let mut client = Command::new(python_path())
        .args(["-c", DRAIN, &server.url])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    signal(server.child.id(), libc::SIGTERM);
    let out: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(client.wait().unwrap().success());
    assert_eq!(out["done"], true, "the reply ran to its end: {out}");
    assert_eq!(out["finish"], "length", "{out}");
    assert!(out["events"].as_u64().unwrap() > 10, "{out}");
    assert_eq!(out["new_connection_refused"], true, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after its last reply"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

fn http_get(url: &str) -> String {
    python(
        "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1]).read().decode())",
        &[url],
    )
}

/// The value of one sample line of a Prometheus exposition.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in\n{text}"))
}

#[test]
fn openai_client_talks_to_the_server_and_errors_are_openai_shaped() {
    let dir = tempfile::tempdir().unwrap();
    let run = model(dir.path());
    let server = serve(&run, &["--api-key", "secret"]);
    let out: serde_json::Value =
        serde_json::from_str(python(CLIENT, &[&server.url, "secret"]).trim()).unwrap();
    assert_eq!(out["models"], serde_json::json!(["tiny"]));
    let chat = &out["chat"];
    assert!(
        matches!(chat["finish"].as_str(), Some("stop" | "length")),
        "{chat}"
    );
    let usage = &chat["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 8);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );
    assert_eq!(
        out["stream"]["text"], chat["text"],
        "same seed: the stream spells the same reply"
    );
    if chat["finish"] == "length" {
        assert!(
            out["stream"]["content_chunks"].as_u64().unwrap() >= 2,
            "streamed in pieces: {}",
            out["stream"]
        );
    }
    assert!(
        !out["completion"]["text"].as_str().unwrap().contains('\n'),
        "stop sequence honoured"
    );
    assert_eq!(out["completion_stream"], out["completion"]["text"]);
    assert_eq!(out["unknown_model"]["status"], 404);
    assert!(out["unknown_model"]["body"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-9"));
    assert_eq!(out["too_long"]["status"], 400);
    assert_eq!(out["too_long"]["body"]["code"], "context_length_exceeded");
    // prompt + max_tokens past the context: refused up front, not cut short.
    assert_eq!(out["past_context"]["status"], 400, "{out}");
    assert_eq!(
        out["past_context"]["body"]["code"],
        "context_length_exceeded"
    );
    for (case, word) in [
        ("bad_logprobs", "logprobs must be"),
        ("top_without_logprobs", "top_logprobs needs logprobs"),
        ("bad_n", "n must"),
        ("bad_penalty", "presence_penalty"),
        ("bad_bias", "logit_bias of token 7"),
        ("bad_bias_id", "\"999999\""),
    ] {
        assert_eq!(out[case]["status"], 400, "{case}: {out}");
        let message = out[case]["body"]["message"].as_str().unwrap();
        assert!(message.contains(word), "{case}: {message}");
    }
    // n = 3: three choices, the first the single answer, the stream the same three texts,
    // one usage chunk (no choices) only when asked for, counting every choice's tokens.
    let texts = out["n"]["texts"].as_array().unwrap();
    assert_eq!(texts.len(), 3, "{out}");
    assert_eq!(texts[0], out["completion"]["text"], "{out}");
    assert!(
        texts[1] != texts[0] || texts[2] != texts[0],
        "different seeds: {out}"
    );
    assert_eq!(out["n_stream"]["texts"], out["n"]["texts"], "{out}");
    let usage_chunks = out["n_stream"]["usage_chunks"].as_array().unwrap();
    assert_eq!(usage_chunks.len(), 1, "{out}");
    assert_eq!(usage_chunks[0]["choices"], 0);
    assert_eq!(usage_chunks[0]["usage"], out["n"]["usage"], "{out}");
    assert_eq!(out["usage_without_asking"], 0, "{out}");
    assert_eq!(out["chat_n"].as_array().unwrap().len(), 3);
    assert_eq!(out["chat_n"][0], chat["text"], "{out}");
    // Log-probabilities: one entry per generated token, each at most 0, with the asked-for
    // alternatives; greedy decoding chose the most likely one each time. Streamed (without
    // alternatives), the same tokens and values.
    let content = out["chat_logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        out["chat_logprobs"]["tokens"].as_u64().unwrap()
    );
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let (chosen, best) = (
            e["logprob"].as_f64().unwrap(),
            top[0]["logprob"].as_f64().unwrap(),
        );
        assert!(chosen <= 0.0 && (chosen - best).abs() < 1e-5, "{e}");
    }
    let without_alternatives: Vec<serde_json::Value> = content
        .iter()
        .map(|e| {
            let mut e = e.clone();
            e["top_logprobs"] = serde_json::json!([]);
            e
        })
        .collect();
    assert_eq!(
        out["chat_logprobs_stream"],
        serde_json::Value::Array(without_alternatives)
    );
    let completion_lp = &out["completion_logprobs"]["logprobs"];
    let n = out["completion_logprobs"]["tokens"].as_u64().unwrap() as usize;
    assert_eq!(
        completion_lp["tokens"].as_array().unwrap().len(),
        n,
        "{completion_lp}"
    );
    assert_eq!(completion_lp["token_logprobs"].as_array().unwrap().len(), n);
    assert_eq!(completion_lp["text_offset"][0], 0);
    for top in completion_lp["top_logprobs"].as_array().unwrap() {
        let k = top.as_object().unwrap().len();
        assert!((1..=2).contains(&k), "{completion_lp}");
    }
    // The penalties change what greedy decoding says, and it repeats itself less.
    let distinct = |text: &str| {
        text.split_whitespace()
            .collect::<std::collections::HashSet<_>>()
            .len() as f64
            / text.split_whitespace().count().max(1) as f64
    };
    let (greedy, penalised) = (
        out["greedy"].as_str().unwrap(),
        out["penalised"].as_str().unwrap(),
    );
    assert_ne!(greedy, penalised);
    assert!(
        distinct(penalised) >= distinct(greedy),
        "{greedy:?} vs {penalised:?}"
    );
    assert_eq!(out["negative"]["status"], 400);
    assert!(out["negative"]["body"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    assert_eq!(out["no_key"]["status"], 401);
    assert_eq!(out["bad_json"]["status"], 400);
    assert!(out["bad_json"]["body"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid request body"));
    let sequential = &out["sequential"];
    for r in out["concurrent"].as_array().unwrap() {
        assert_eq!(
            r, sequential,
            "concurrent requests do not disturb each other"
        );
    }
}

const BROWSER: &str = r##"
import sys
from playwright.sync_api import sync_playwright
url = sys.argv[1]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page()
    page.goto(url)
    page.fill("#max_tokens", "12")
    page.fill("#input", "who is the king?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.user")
    page.wait_for_function("() => { const a = document.querySelectorAll('.msg.assistant'); return a.length && a[a.length-1].textContent.length > 0 && !document.getElementById('send').disabled; }")
    reply = page.inner_text(".msg.assistant")
    page.fill("#input", "and the queen?")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant').length == 2 && !document.getElementById('send').disabled")
    count = page.locator(".msg").count()
    page.click("#clear")
    after = page.locator(".msg").count()
    browser.close()
    print(f"{count} {after} {len(reply)}")
"##;

#[test]
fn web_page_chats_and_clears_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let run = model(dir.path());
    let server = serve(&run, &[]);
    let out = python(BROWSER, &[&server.url]);
    let nums: Vec<usize> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert_eq!(nums[0], 4, "two user and two assistant messages were shown");
    assert_eq!(nums[1], 0, "clear empties the conversation");
    assert!(nums[2] > 0, "a reply appeared");
}
