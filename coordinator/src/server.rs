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
    /// The newest commit in the run's bucket: with no saved state the job resumes from it
    /// ([`State::resuming`]), and saved state older than it gives way to it
    /// ([`State::caught_up_with`]).
    pub resume_commit: Option<Commit>,
}

/// Restores the saved state (or starts a new job) and serves until `shutdown` is
/// cancelled. The gRPC server, the liveness tick and `/metrics` run side by side in a
/// `JoinSet`; the first to fail ends the others and `serve` returns its error.
pub async fn serve(cfg: ServerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let store = StateStore::open(&cfg.state_dir)?;
    let state = starting_state(&cfg, store.load()?, now_ms());
    store.save(&state)?;
    let coordinator = Coordinator::new(state, store);

    // Every loop of the service; a failure of one ends them all.
    let mut loops: JoinSet<anyhow::Result<()>> = JoinSet::new();
    // Ten ticks per timeout: a silent member is evicted within a tenth of a timeout of its
    // deadline (a tick much later than this means the coordinator was away; see decide).
    let period = Duration::from_millis((cfg.job.heartbeat_timeout_ms / 10).clamp(50, 1_000));
    loops.spawn(tracing::Instrument::instrument(
        tick(coordinator.clone(), period, shutdown.clone()),
        tracing::Span::current(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<Coordinator>>().await;
    health.set_serving::<StatusServer<Coordinator>>().await;
    if let Some(addr) = cfg.health_listen {
        let health =
            lillm_proto::health::serve_plaintext(addr, health_service.clone(), shutdown.clone());
        loops.spawn(async move { health.await.map_err(anyhow::Error::msg) });
    }
    if let Some(addr) = cfg.metrics_listen {
        loops.spawn(serve_metrics(addr, coordinator.clone(), shutdown.clone()).await?);
    }
    loops.spawn(serve_grpc(&cfg, coordinator, health_service, shutdown.clone()).await?);
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

/// The liveness tick: evicts silent members (see [`Coordinator::tick`]) every `period`.
async fn tick(
    coordinator: Coordinator,
    period: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut interval = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = interval.tick() => coordinator.tick().await,
        }
    }
}

/// Binds `/metrics` on `addr` (an address in use fails the start) and returns the server.
async fn serve_metrics(
    addr: SocketAddr,
    coordinator: Coordinator,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let source = coordinator.clone();
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
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .context("the /metrics server failed")
    })
}

/// Binds the gRPC services (Coordinator, Status, health, reflection; over TLS when
/// configured) on `cfg.listen` and returns the server.
async fn serve_grpc(
    cfg: &ServerConfig,
    coordinator: Coordinator,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    stop: CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    // Both reflection versions: grpcurl asks for v1, older clients (grpcio's) for v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lillm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
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
            stop.cancelled_owned(),
        );
    Ok(async move { grpc.await.context("the gRPC server failed") })
}

/// The state this start serves from: the saved one (this start's job settings applied, its
/// members given a full timeout to reach the restarted coordinator, caught up with a newer
/// commit in the run's bucket), or a new job, resuming from the bucket's commit if given.
fn starting_state(cfg: &ServerConfig, saved: Option<State>, now: u64) -> State {
    match saved {
        Some(mut saved) => {
            let (was, wanted) = (&saved.config, &cfg.job);
            if (was.nodes, was.trainers, was.dataloaders)
                != (wanted.nodes, wanted.trainers, wanted.dataloaders)
            {
                tracing::warn!(
                    "the job's size changed since its state was saved ({} trainer(s), {} dataloader(s) on {} node(s) → {}, {}, {}); ranks will be reassigned",
                    was.trainers, was.dataloaders, was.nodes, wanted.trainers, wanted.dataloaders, wanted.nodes
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Member, MemberId, Role};

    fn config(resume_from: Option<u64>, forget_members: bool) -> ServerConfig {
        ServerConfig {
            job: JobConfig {
                nodes: 1,
                trainers: 2,
                dataloaders: 1,
                job_token: String::new(),
                heartbeat_timeout_ms: 2_000,
                store_port: 29500,
                min_nodes: None,
                elastic_grace_ms: 30_000,
            },
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: None,
            health_listen: None,
            state_dir: PathBuf::from("state"),
            tls: None,
            forget_members,
            resume_commit: resume_from.map(|step| {
                Commit::in_bucket(&format!("s3://b/r/checkpoints/step-{step}")).unwrap()
            }),
        }
    }

    /// A saved job at step 100, generation 3, with one trainer last heard at time 5.
    fn saved() -> State {
        let mut state = State::new(config(None, false).job);
        state.generation = 3;
        state.last_commit = Some(Commit::in_bucket("s3://b/r/checkpoints/step-100").unwrap());
        let id = MemberId {
            node: "n".into(),
            role: Role::Trainer,
            local_index: 0,
        };
        let mut member = Member::registered(id.clone(), "127.0.0.1:1".into(), 5, None, 100);
        member.rank = Some(0);
        state.members.insert(id, member);
        state
    }

    #[test]
    fn a_restart_keeps_the_saved_group_and_gives_its_members_a_full_timeout() {
        // No bucket commit, or one the saved state has (or is past): the saved group stands.
        for resume in [None, Some(100), Some(60)] {
            let state = starting_state(&config(resume, false), Some(saved()), 1_000);
            assert_eq!((state.generation, state.resume_point().0), (3, 100));
            let member = state.members.values().next().unwrap();
            assert_eq!(member.last_heartbeat_ms, 1_000);
        }
    }

    #[test]
    fn a_newer_commit_in_the_bucket_or_forgetting_starts_a_new_group() {
        let caught_up = starting_state(&config(Some(160), false), Some(saved()), 1_000);
        assert_eq!(caught_up.resume_point().0, 160);
        assert!(caught_up.generation > 3 && caught_up.members.is_empty());
        let forgot = starting_state(&config(None, true), Some(saved()), 1_000);
        assert_eq!(forgot.resume_point().0, 100);
        assert!(forgot.generation > 3 && forgot.members.is_empty());
    }

    #[test]
    fn without_saved_state_a_job_starts_new_or_from_the_buckets_commit() {
        assert_eq!(
            starting_state(&config(None, false), None, 0).resume_point(),
            (0, None)
        );
        let resumed = starting_state(&config(Some(40), false), None, 0);
        assert_eq!(
            resumed.resume_point(),
            (40, Some("s3://b/r/checkpoints/step-40"))
        );
    }
}
