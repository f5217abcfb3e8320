//! The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! non-streaming and streaming (server-sent events ending with `data: [DONE]`), with `n`
//! choices, `stream_options.include_usage`, presence/frequency penalties, `logit_bias` and log-probabilities
//! (`logprobs`/`top_logprobs` for chat, `logprobs: k` for completions).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lillm_data::sft::{render_prompt, Message};
use lillm_model::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;

mod request;

use request::{plan, Api, Plan, Sampling};

use super::generator::{GenEvent, GenRequest, Refused, TokenLogprob};
use super::AppState;
use crate::metrics::Outcome;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    /// Seconds a client should wait before trying again (`Retry-After`).
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            retry_after: None,
        }
    }
    fn with(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code: Some(code),
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// Checks `Authorization: Bearer KEY` when the server was started with an API key.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::with(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        ))
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

/// Chat's `logprobs` of some tokens: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut v = entry(&t.token, t.logprob);
            v["top_logprobs"] = t.top.iter().map(|(tok, lp)| entry(tok, *lp)).collect();
            v
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` of some tokens, the first at character `offset` of the reply.
fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.token.chars().count();
    }
    let top: Vec<serde_json::Map<String, Value>> = tokens
        .iter()
        .map(|t| {
            t.top
                .iter()
                .map(|(tok, lp)| (tok.clone(), json!(lp)))
                .collect()
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    sampling: Sampling,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Queues one generation per choice; their events arrive on the returned receivers (in
/// choice order). If the queue cannot take them all, none runs.
async fn start(
    state: &AppState,
    plan: &Plan,
) -> Result<Vec<mpsc::UnboundedReceiver<GenEvent>>, ApiError> {
    let mut receivers = Vec::with_capacity(plan.choices);
    for choice in 0..plan.choices {
        let (tx, rx) = mpsc::unbounded_channel();
        let req = GenRequest {
            prompt: plan.prompt.clone(),
            max_tokens: plan.max_tokens,
            sampling: SamplingParams {
                seed: plan.sampling.seed.wrapping_add(choice as u64),
                ..plan.sampling.clone()
            },
            stops: plan.stops.clone(),
            events: tx,
            arrived: std::time::Instant::now(),
            logprobs: plan.logprobs,
        };
        // Receivers dropped on a refusal cancel the choices already queued.
        state.generator.submit(req).map_err(|refused| match refused {
            Refused::Full(queued) => ApiError {
                retry_after: Some(1),
                ..ApiError::with(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "server_busy",
                    format!(
                        "the server is busy: {queued} requests are already waiting (--max-queue); retry after a second"
                    ),
                )
            },
            Refused::Stopped => ApiError::with(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
                "the generation thread has stopped",
            ),
        })?;
        receivers.push(rx);
    }
    Ok(receivers)
}

/// A non-streamed response: every choice collected and shown by `choice`, in `envelope`,
/// with the usage of all of them.
async fn whole(
    receivers: Vec<mpsc::UnboundedReceiver<GenEvent>>,
    envelope: impl Fn(Value) -> Value,
    prompt_tokens: usize,
    choice: impl Fn(usize, &Reply) -> Value,
) -> Result<Value, ApiError> {
    let replies = collect_all(receivers).await?;
    let completion: usize = replies.iter().map(|r| r.tokens).sum();
    let choices = replies
        .iter()
        .enumerate()
        .map(|(i, r)| choice(i, r))
        .collect();
    let mut response = envelope(Value::Array(choices));
    response["usage"] = usage(prompt_tokens, completion);
    Ok(response)
}

/// The last chunk of a stream that asked for `include_usage`: no choices, the usage of all.
fn usage_chunk(
    include_usage: bool,
    envelope: impl Fn(Value) -> Value + Send + 'static,
    prompt_tokens: usize,
) -> Option<Box<dyn FnOnce(usize) -> Value + Send>> {
    include_usage.then(|| {
        Box::new(move |completion: usize| {
            let mut v = envelope(json!([]));
            v["usage"] = usage(prompt_tokens, completion);
            v
        }) as Box<dyn FnOnce(usize) -> Value + Send>
    })
}

/// One finished choice: its text, finish reason, completion tokens and (when asked for)
/// their log-probabilities.
struct Reply {
    text: String,
    finish_reason: &'static str,
    tokens: usize,
    logprobs: Vec<TokenLogprob>,
}

/// Collects every choice's whole reply.
async fn collect_all(
    receivers: Vec<mpsc::UnboundedReceiver<GenEvent>>,
) -> Result<Vec<Reply>, ApiError> {
    let mut replies = Vec::with_capacity(receivers.len());
    for rx in receivers {
        replies.push(collect(rx).await?);
    }
    Ok(replies)
}

/// Collects a whole reply.
async fn collect(mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Result<Reply, ApiError> {
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Delta {
                text: d,
                logprobs: l,
            } => {
                text.push_str(&d);
                logprobs.extend(l);
            }
            GenEvent::Done {
                finish_reason,
                completion_tokens,
            } => {
                return Ok(Reply {
                    text,
                    finish_reason,
                    tokens: completion_tokens,
                    logprobs,
                })
            }
            GenEvent::Failed(e) => {
                return Err(ApiError::with(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "generation_failed",
                    e,
                ))
            }
        }
    }
    Err(ApiError::with(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        "generation ended without a result",
    ))
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// One streamed chunk of a choice.
struct Piece<'a> {
    choice: usize,
    text: Option<&'a str>,
    finish_reason: Option<&'a str>,
    logprobs: &'a [TokenLogprob],
    /// Characters of this choice's reply sent before this chunk.
    offset: usize,
}

fn piece<'a>(
    choice: usize,
    text: Option<&'a str>,
    finish_reason: Option<&'a str>,
    logprobs: &'a [TokenLogprob],
    offset: usize,
) -> Piece<'a> {
    Piece {
        choice,
        text,
        finish_reason,
        logprobs,
        offset,
    }
}

/// How one streamed chunk looks.
type ChunkFn = Box<dyn Fn(Piece) -> Value + Send>;

/// Streams every choice's events as SSE chunks built by `chunk`, after `head` (one per
/// choice, if any); with `include_usage`, a last chunk with no choices carries the usage;
/// then `[DONE]`. A relay task merges the choices; when the client goes away it stops and
/// drops the choices' receivers, which cancels their generations.
fn sse(
    receivers: Vec<mpsc::UnboundedReceiver<GenEvent>>,
    head: Option<ChunkFn>,
    chunk: ChunkFn,
    usage_chunk: Option<Box<dyn FnOnce(usize) -> Value + Send>>,
) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let choices = receivers.len();
        let mut streams = tokio_stream::StreamMap::new();
        for (i, r) in receivers.into_iter().enumerate() {
            streams.insert(i, UnboundedReceiverStream::new(r));
        }
        let send = |v: Value| tx.send(v.to_string()).is_ok();
        if let Some(head) = &head {
            if !(0..choices).all(|i| send(head(piece(i, None, None, &[], 0)))) {
                return;
            }
        }
        let mut completion_tokens = 0;
        let mut offsets = vec![0; choices];
        while let Some((i, ev)) = streams.next().await {
            let value = match ev {
                GenEvent::Delta { text, logprobs } => {
                    let v = chunk(piece(i, Some(&text), None, &logprobs, offsets[i]));
                    offsets[i] += text.chars().count();
                    v
                }
                GenEvent::Done {
                    finish_reason,
                    completion_tokens: n,
                } => {
                    completion_tokens += n;
                    chunk(piece(i, None, Some(finish_reason), &[], offsets[i]))
                }
                GenEvent::Failed(e) => json!({"error": {"message": e, "type": "server_error"}}),
            };
            if !send(value) {
                return;
            }
        }
        if let Some(usage_chunk) = usage_chunk {
            send(usage_chunk(completion_tokens));
        }
        let _ = tx.send("[DONE]".into());
    });
    let events = UnboundedReceiverStream::new(rx)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(events).into_response()
}

pub async fn models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started, "owned_by": "lillm"}]}),
    ))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    counted(&state, chat(&state, headers, body).await)
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    counted(&state, completion(&state, headers, body).await)
}

/// Counts a request refused before generation (the generator counts the others).
fn counted(state: &AppState, result: Result<Response, ApiError>) -> Result<Response, ApiError> {
    if let Err(e) = &result {
        match e.status {
            StatusCode::TOO_MANY_REQUESTS => state.metrics().count(Outcome::Busy),
            s if s.is_client_error() => state.metrics().count(Outcome::Invalid),
            _ => {}
        }
    }
    result
}

async fn chat(state: &AppState, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorize(state, &headers)?;
    let req: ChatRequest = parse(&body)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    let mut turns = Vec::new();
    for m in req.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid(format!(
                "unsupported role `{}`; use system, user or assistant",
                m.role
            )));
        }
        let content = match m.content {
            Content::Text(t) => t,
            Content::Parts(parts) => parts.into_iter().map(|p| p.text).collect(),
        };
        turns.push(Message {
            role: m.role,
            content,
        });
    }
    let prompt = render_prompt(&turns).map_err(|e| ApiError::invalid(e.to_string()))?;
    let plan = plan(state, &prompt, req.sampling, Api::Chat)?;
    let receivers = start(state, &plan).await?;
    let id = format!("chatcmpl-{}", state.next_id());
    let with_logprobs = plan.logprobs.is_some();
    let (model, created, prompt_tokens) = (state.model_name.clone(), now(), plan.prompt.len());
    let envelope = move |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
    if plan.stream {
        let head = envelope.clone();
        let envelope_for_usage = envelope.clone();
        return Ok(sse(
            receivers,
            Some(Box::new(move |p: Piece| {
                head(
                    json!([{"index": p.choice, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]),
                )
            })),
            Box::new(move |p: Piece| {
                let delta = p.text.map_or(json!({}), |d| json!({"content": d}));
                let logprobs = match with_logprobs && p.text.is_some() {
                    true => chat_logprobs(p.logprobs),
                    false => Value::Null,
                };
                envelope(
                    json!([{"index": p.choice, "delta": delta, "logprobs": logprobs, "finish_reason": p.finish_reason}]),
                )
            }),
            usage_chunk(plan.include_usage, envelope_for_usage, prompt_tokens),
        ));
    }
    let mut response = whole(receivers, envelope, prompt_tokens, |i, r| {
        let logprobs = with_logprobs.then(|| chat_logprobs(&r.logprobs));
        json!({"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs, "finish_reason": r.finish_reason})
    })
    .await?;
    response["object"] = json!("chat.completion");
    Ok(Json(response).into_response())
}

async fn completion(
    state: &AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(state, &headers)?;
    let req: CompletionRequest = parse(&body)?;
    let plan = plan(state, &req.prompt, req.sampling, Api::Completions)?;
    let receivers = start(state, &plan).await?;
    let id = format!("cmpl-{}", state.next_id());
    let with_logprobs = plan.logprobs.is_some();
    let (model, created, prompt_tokens) = (state.model_name.clone(), now(), plan.prompt.len());
    let envelope = move |choices: Value| json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices});
    if plan.stream {
        let envelope_for_usage = envelope.clone();
        return Ok(sse(
            receivers,
            None,
            Box::new(move |p: Piece| {
                let logprobs = match with_logprobs && p.text.is_some() {
                    true => completion_logprobs(p.logprobs, p.offset),
                    false => Value::Null,
                };
                envelope(
                    json!([{"index": p.choice, "text": p.text.unwrap_or(""), "finish_reason": p.finish_reason, "logprobs": logprobs}]),
                )
            }),
            usage_chunk(plan.include_usage, envelope_for_usage, prompt_tokens),
        ));
    }
    let response = whole(receivers, envelope, prompt_tokens, |i, r| {
        let logprobs = with_logprobs.then(|| completion_logprobs(&r.logprobs, 0));
        json!({"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": logprobs})
    })
    .await?;
    Ok(Json(response).into_response())
}
