//! What the server reports at `/metrics` (Prometheus text format): requests by outcome, the
//! queue and the batch, tokens generated, and time-to-first-token and inter-token latency
//! histograms. Updated lock-free by the HTTP handlers and the generation thread.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use lillm_checkpoint::LoadedModel;

/// Upper bounds (seconds) of the latency histograms' buckets: from half a millisecond, as a
/// small model on a GPU emits a token every millisecond or so (on a CPU, tens of them).
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus histogram of durations with fixed buckets.
#[derive(Default)]
pub struct Histogram {
    /// Observations at most `BUCKETS[i]` (not cumulative; summed when rendered).
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum of the observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Answered to the end (`stop` or `length`).
    Completed = 0,
    /// Refused before any work (a bad request: 4xx).
    Invalid,
    /// Refused because the queue was full (429).
    Busy,
    /// The client went away before the end; its place was freed.
    Cancelled,
    /// Generation failed (500).
    Failed,
}

const OUTCOMES: [&str; 5] = ["completed", "invalid", "busy", "cancelled", "failed"];

/// What the server holds on its device from the start: the weights, the KV cache of every
/// slot of the batch (`--max-batch` sequences of the whole context) and, with fixed-shape
/// decoding, the caches its prompts are prefilled into.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub prefill_cache_bytes: u64,
}

impl Memory {
    /// For a server of `max_batch` slots decoding as `decode` says, prefilling prompts of
    /// up to `longest_prompt` tokens at once.
    pub fn of(
        loaded: &LoadedModel,
        max_batch: usize,
        decode: crate::decode::DecodeMode,
        longest_prompt: usize,
    ) -> Self {
        let cfg = loaded.model.config();
        Self {
            prefill_cache_bytes: crate::decode::prefill_cache_bytes(
                decode,
                &loaded.model,
                longest_prompt,
            ),
            weight_bytes: loaded
                .vs
                .variables()
                .values()
                .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum(),
            kv_cache_bytes: lillm_model::kv_cache_bytes(
                cfg,
                max_batch,
                cfg.max_seq_len,
                loaded.model.compute_kind(),
            ),
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Set once the generator holds the model.
    pub memory: OnceLock<Memory>,
    requests: [AtomicU64; OUTCOMES.len()],
    /// Sequences in the running batch, now and at most so far.
    pub batch: AtomicU64,
    pub batch_peak: AtomicU64,
    /// Most prompts prefilled in one forward so far.
    pub prefill_peak: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    /// Decode-step buckets captured as CUDA graphs, and the GPU memory they took.
    cuda_graphs: AtomicU64,
    cuda_graph_bytes: AtomicU64,
}

impl Metrics {
    pub fn count(&self, outcome: Outcome) {
        self.requests[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn note_graphs(&self, captured: crate::decode::Captured) {
        self.cuda_graphs
            .store(captured.graphs as u64, Ordering::Relaxed);
        self.cuda_graph_bytes
            .store(captured.bytes, Ordering::Relaxed);
    }

    pub fn set_batch(&self, size: usize) {
        self.batch.store(size as u64, Ordering::Relaxed);
        self.batch_peak.fetch_max(size as u64, Ordering::Relaxed);
    }

    /// The Prometheus exposition, with `queued` requests waiting for a place in the batch.
    pub fn render(&self, queued: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP lillm_serve_requests_total Requests by how they ended.\n# TYPE lillm_serve_requests_total counter"
        );
        for (name, n) in OUTCOMES.iter().zip(&self.requests) {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(out, "lillm_serve_requests_total{{outcome=\"{name}\"}} {n}");
        }
        let gauges = [
            (
                "lillm_serve_queue_length",
                "Requests waiting for a place in the batch.",
                queued as u64,
            ),
            (
                "lillm_serve_batch_size",
                "Sequences decoded together now.",
                self.batch.load(Ordering::Relaxed),
            ),
            (
                "lillm_serve_batch_size_peak",
                "Most sequences decoded together so far.",
                self.batch_peak.load(Ordering::Relaxed),
            ),
            (
                "lillm_serve_prefill_batch_peak",
                "Most prompts prefilled together in one forward so far.",
                self.prefill_peak.load(Ordering::Relaxed),
            ),
        ];
        let memory = self.memory.get().copied().unwrap_or_default();
        let gauges = gauges.into_iter().chain([
            (
                "lillm_serve_weight_bytes",
                "Bytes of the model's weights on the device.",
                memory.weight_bytes,
            ),
            (
                "lillm_serve_kv_cache_bytes",
                "Bytes of the KV cache allocated at start: every slot of --max-batch, the whole context.",
                memory.kv_cache_bytes,
            ),
            (
                "lillm_serve_prefill_cache_bytes",
                "Bytes of the KV caches prompts are prefilled into (one per length bucket, one of the whole context for long prompts), allocated at start (0: decoding eagerly).",
                memory.prefill_cache_bytes,
            ),
            (
                "lillm_serve_cuda_graphs",
                "Decode-step batch buckets captured as CUDA graphs (0: decoding without).",
                self.cuda_graphs.load(Ordering::Relaxed),
            ),
            (
                "lillm_serve_cuda_graph_bytes",
                "GPU memory the captured decode graphs took.",
                self.cuda_graph_bytes.load(Ordering::Relaxed),
            ),
        ]);
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let tokens = self.generated_tokens.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP lillm_serve_generated_tokens_total Tokens generated.\n# TYPE lillm_serve_generated_tokens_total counter\nlillm_serve_generated_tokens_total {tokens}"
        );
        self.time_to_first_token.render(
            &mut out,
            "lillm_serve_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "lillm_serve_inter_token_latency_seconds",
            "Between consecutive tokens of one request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rendered cumulative count of `name`'s bucket `le`.
    fn bucket(text: &str, name: &str, le: &str) -> u64 {
        let key = format!("{name}_bucket{{le=\"{le}\"}} ");
        let line = text.lines().find(|l| l.starts_with(&key)).unwrap();
        line[key.len()..].parse().unwrap()
    }

    #[test]
    fn gpu_speed_latencies_land_in_their_own_buckets() {
        let h = Histogram::default();
        for micros in [400, 800, 900, 3_000, 40_000_000] {
            h.observe(Duration::from_micros(micros));
        }
        let mut text = String::new();
        h.render(&mut text, "itl", "help");
        // A token every 0.4 ms and every 0.8-0.9 ms are told apart, not both "under 5 ms".
        assert_eq!(bucket(&text, "itl", "0.0005"), 1, "{text}");
        assert_eq!(bucket(&text, "itl", "0.001"), 3, "{text}");
        assert_eq!(bucket(&text, "itl", "0.0025"), 3, "{text}");
        assert_eq!(bucket(&text, "itl", "0.005"), 4, "{text}");
        // Past the last bound only +Inf and the count hold it.
        assert_eq!(bucket(&text, "itl", "30"), 4, "{text}");
        assert_eq!(bucket(&text, "itl", "+Inf"), 5, "{text}");
        assert!(text.contains("itl_count 5\n"), "{text}");
        assert!(text.contains("itl_sum 40.0051\n"), "{text}");
    }
}
