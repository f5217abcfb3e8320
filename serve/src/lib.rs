//! Serving a model (`lillm serve`): a web chat page and an OpenAI-compatible API over one
//! checkpoint. Depends on the model, the checkpoint format and libtorch's CUDA graphs
//! (`lillm-cuda`) only: serving never links the training engine or c10d.
//!
//! Layout:
//! - `generator`: the actor thread that owns the model and decodes the running requests
//!   together (continuous batching).
//! - `decode`: how a decode step runs (eager, or one CUDA graph per batch-size bucket).
//! - `metrics`: `/metrics` for Prometheus (requests, queue, batch, latencies).
//! - `openai`: request validation and the `/v1/*` handlers (JSON and SSE).
//! - `text_stream`: text decoded as tokens arrive, with stop strings (also used by
//!   `lillm generate` and `lillm chat`).
//! - `page.html`: the self-contained chat page served at `/`.

mod decode;
mod full_batch;
mod generator;
mod long_prefill;
mod metrics;
mod openai;
pub mod text_stream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use clap::Args;
use lillm_checkpoint::LoadedModel;
use tokio_util::sync::CancellationToken;

pub use decode::DecodeMode;
pub use generator::{GenEvent, GenRequest, Generator, Limits};

const PAGE: &str = include_str!("page.html");

#[derive(Clone)]
pub struct AppState {
    generator: Generator,
    model_name: String,
    api_key: Option<String>,
    started: u64,
    /// Source of response ids; shared by all handlers.
    counter: Arc<AtomicU64>,
}

impl AppState {
    fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn metrics(&self) -> &metrics::Metrics {
        &self.generator.metrics
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Checkpoint (or run directory, or either's bucket URL) to serve; it must carry its
    /// tokenizer.
    #[arg(long)]
    checkpoint: PathBuf,
    /// LoRA adapter checkpoint (`lillm sft --lora-rank`) merged into --checkpoint, which
    /// must be the base it was trained on.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Address to bind; loopback unless you mean to expose it (then set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on the API (also read from LILLM_API_KEY).
    #[arg(long, env = "LILLM_API_KEY")]
    api_key: Option<String>,
    /// The model id clients must name (default: the checkpoint directory's name).
    #[arg(long)]
    model_name: Option<String>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dtype of the activations (weights stay float32): auto is bfloat16 on CUDA and
    /// float32 on CPU, where a request's answer in a batch equals its answer alone exactly;
    /// bfloat16 decodes more streams per second on CPUs with native bf16 (AVX512-BF16 or
    /// AMX) at slightly different numerics.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Requests decoded together (continuous batching): each step runs one forward for all
    /// of them, and a new request joins at the next step.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests that may wait for a place in the batch; past that the server answers 429
    /// with `Retry-After` instead of queueing without bound.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// CPU threads for the model's forward passes (default: libtorch's, one per core).
    /// Fewer leave cores to whatever shares the machine, such as an HTTP proxy or, in
    /// `make bench`, the load generator.
    #[arg(long)]
    threads: Option<usize>,
    /// How decode steps run: auto (CUDA graphs on a GPU, eager on a CPU), eager, graphs
    /// (one captured CUDA graph per batch-size bucket), or static (the graphs' fixed-shape
    /// step without capture, to check it on a CPU).
    #[arg(long, default_value = "auto")]
    decode: String,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(state): State<AppState>| async move {
                state.metrics().render(state.generator.queued())
            }),
        )
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .with_state(state)
}

/// Serves until `shutdown` is cancelled (by `main`, on SIGTERM or Ctrl-C).
pub fn serve(args: ServeArgs, shutdown: CancellationToken) -> Result<()> {
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1 (requests waiting for a place in the batch)");
    }
    if args.max_batch == 0 {
        anyhow::bail!("--max-batch must be at least 1 (requests decoded together)");
    }
    if args.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1 (or left out for one per core)");
    }
    let device = lillm_model::parse_device(&args.device)?;
    let kind = inference_kind(&args.dtype, device)?;
    // A bucket URL is fetched into the cache (see `lillm_store::local_checkpoint`).
    let checkpoint =
        lillm_store::local_checkpoint(&args.checkpoint, &lillm_store::StoreOptions::default())?;
    let mut loaded = match &args.lora {
        Some(adapter) => LoadedModel::load_adapted(&checkpoint, adapter, device)?,
        None => LoadedModel::load(&checkpoint, device)?,
    };
    loaded.set_inference_kind(kind);
    let decode = DecodeMode::parse(&args.decode, device, &loaded.model)?;
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        // Named after what was fine-tuned last: the adapter, if any.
        let named = args.lora.as_ref().unwrap_or(&args.checkpoint);
        let path = std::fs::canonicalize(named).unwrap_or(named.clone());
        path.file_name()
            .map_or("lillm".into(), |n| n.to_string_lossy().into_owned())
    });
    let state = AppState {
        generator: Generator::new(
            loaded,
            Limits {
                max_batch: args.max_batch,
                max_queue: args.max_queue,
                threads: args.threads,
                decode,
            },
        )?,
        model_name,
        api_key: args.api_key.clone(),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        counter: Arc::default(),
    };
    if let Some(memory) = state.generator.metrics.memory.get() {
        let context = state.generator.context;
        let prefill = match memory.prefill_cache_bytes {
            0 => String::new(),
            bytes => format!(", prefill caches {}", mib(bytes)),
        };
        eprintln!(
            "memory on {}: weights {}, KV cache {} (--max-batch {} x {context} positions, {kind:?}){prefill}, allocated at start",
            args.device,
            mib(memory.weight_bytes),
            mib(memory.kv_cache_bytes),
            args.max_batch,
        );
    }
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| {
            format!(
                "--host {} --port {} is not a socket address",
                args.host, args.port
            )
        })?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(addr, state, shutdown))
}

/// The compute kind `dtype` names for inference on `device`: `auto` is bf16 on CUDA and
/// float32 on a CPU (where float32 decodes faster).
pub fn inference_kind(dtype: &str, device: tch::Device) -> Result<tch::Kind> {
    Ok(match lillm_model::parse_dtype(dtype)? {
        Some(kind) => kind,
        None if device.is_cuda() => tch::Kind::BFloat16,
        None => tch::Kind::Float,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// Serves until `shutdown` is cancelled.
pub async fn run(addr: SocketAddr, state: AppState, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!(
        "serving `{}` on http://{local}/ (OpenAI API at http://{local}/v1)",
        state.model_name
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    // Each streamed token is a small write: with Nagle's algorithm on, the kernel holds it
    // until the client acknowledges the one before, which a client may delay by up to 40 ms.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
