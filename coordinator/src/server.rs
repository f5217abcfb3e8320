//! Runs the coordinator: gRPC (Coordinator, Status, health, reflection), `/metrics` over
//! HTTP, and the liveness tick, on state restored from the durable store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use lillm_proto::v1::{coordinator_server::CoordinatorServer, status_server::StatusServer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::service::now_ms;
use crate::{metrics, Commit, Coordinator, JobConfig, State, StateStore};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub job: JobConfig,
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address of `/metrics` (`None` = not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext address of grpc.health.v1 alone (`None` = only on `listen`).
    pub health_listen: Option<SocketAddr>,
    /// Directory of the durable state (`coordinator.redb`).
    pub state_dir: PathBuf,
    /// Serve gRPC over TLS with this certificate and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Start a new group from the saved state: forget its members (see
    /// [`State::without_members`]).
    pub forget_members: bool,
    /// With no saved state: resume the job from this commit (a checkpoint in the run's
    /// bucket, see [`State::resuming`]).
    pub resume_commit: Option<Commit>,
}

/// Restores the saved state (or starts a new job) and serves until `shutdown` is
/// cancelled. The gRPC server, the liveness tick and `/metrics` run side by side in a
/// `JoinSet`; the first to fail ends the others and `serve` returns its error.
pub async fn serve(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = StateStore::open(&cfg.state_dir)?;
    let state = match store.load()? {
        Some(mut saved) => {
            let (was, now) = (&saved.config, &cfg.job);
            if (was.nodes, was.trainers, was.dataloaders)
                != (now.nodes, now.trainers, now.dataloaders)
            {
                tracing::warn!(
                    "the job's size changed since its state was saved ({} trainer(s), {} dataloader(s) on {} node(s) → {}, {}, {}); ranks will be reassigned",
                    was.trainers, was.dataloaders, was.nodes, now.trainers, now.dataloaders, now.nodes
                );
            }
            // Ports, token and timeouts are this start's settings.
            saved.config = cfg.job.clone();
            if cfg.forget_members {
                saved = saved.without_members();
                tracing::info!("forgot the saved members: a new group forms");
            }
            if let Some(commit) = cfg.resume_commit.clone() {
                let step = commit.step;
                let took;
                (saved, took) = saved.caught_up_with(commit);
                if took {
                    tracing::warn!(
                        step,
                        "the run's bucket holds a newer commit than this node's saved state: a new group resumes from it"
                    );
                }
            }
            // Members get a full timeout to reach the restarted coordinator.
            let now = now_ms();
            for m in saved.members.values_mut() {
                m.last_heartbeat_ms = now;
            }
            tracing::info!(
                generation = saved.generation,
                members = saved.members.len(),
                last_commit = saved.last_commit.as_ref().map(|c| c.step),
                "restored coordinator state from {}",
                cfg.state_dir.display()
            );
            saved
        }
        None => match cfg.resume_commit.clone() {
            Some(commit) => {
                tracing::info!(
                    step = commit.step,
                    checkpoint = %commit.path,
                    "no saved state: the job resumes from the bucket's committed checkpoint"
                );
                State::resuming(cfg.job.clone(), commit)
            }
            None => State::new(cfg.job.clone()),
        },
    };
    store.save(&state)?;
    let coordinator = Coordinator::new(state, store);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Coordinator>>().await;
    health.set_serving::<StatusServer<Coordinator>>().await;
    // Both reflection versions: grpcurl asks for v1, older clients (grpcio's) for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lillm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Every loop of the service; a failure of one ends them all.
    let mut loops: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let span = tracing::Span::current();
    let ticker = coordinator.clone();
    // Ten ticks per timeout: a silent member is evicted within a tenth of a timeout of its
    // deadline (a tick much later than this means the coordinator was away; see decide).
    let period = Duration::from_millis((cfg.job.heartbeat_timeout_ms / 10).clamp(50, 1_000));
    let stop = shutdown.clone();
    loops.spawn(tracing::Instrument::instrument(
        async move {
            let mut interval = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = interval.tick() => ticker.tick().await,
                }
            }
        },
        span,
    ));

    if let Some(addr) = cfg.health_listen {
        let health =
            lillm_proto::health::serve_plaintext(addr, health_service.clone(), shutdown.clone());
        loops.spawn(async move { health.await.map_err(anyhow::Error::msg) });
    }
    if let Some(addr) = cfg.metrics_listen {
        let source = coordinator.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let source = source.clone();
                async move {
                    // Copied out of the lock: rendering thousands of members takes a while.
                    let text = metrics::render(&source.snapshot(), source.saves());
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve /metrics on {addr}: {e}"))?;
        tracing::info!("metrics on http://{addr}/metrics");
        let stop = shutdown.clone();
        loops.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .context("the /metrics server failed")
        });
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    tracing::info!(
        "coordinator on {} for {} trainer(s) and {} dataloader(s) on up to {} node(s)",
        cfg.listen,
        cfg.job.trainers,
        cfg.job.dataloaders,
        cfg.job.nodes
    );
    // Each request is handled on its own task: give it the coordinator's span, so every
    // log line says which role (and RPC) it came from.
    let mut builder = tonic::transport::Server::builder().trace_fn(|request| {
        tracing::info_span!("coordinator", role = "coordinator", rpc = %request.uri().path())
    });
    if let Some((cert, key)) = &cfg.tls {
        builder = builder
            .tls_config(lillm_proto::client::server_tls(cert, key).map_err(anyhow::Error::msg)?)?;
    }
    let grpc = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(coordinator.clone()))
        .add_service(StatusServer::new(coordinator))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    loops.spawn(async move { grpc.await.context("the gRPC server failed") });
    // The first loop to end (shutdown, or a failure) ends the rest.
    let mut outcome = Ok(());
    while let Some(done) = loops.join_next().await {
        shutdown.cancel();
        if let (Ok(()), Err(e)) = (&outcome, done.context("a coordinator task panicked")?) {
            outcome = Err(e);
        }
    }
    tracing::info!("coordinator stopped");
    outcome
}
