//! The dataloader actor's process: memory-maps a prepared dataset, registers with the
//! coordinator, heartbeats, and streams batches to the trainers it is paired with. Shared by
//! the `dataloader` binary and `lillm dataloader`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use crate::holdings::Holdings;
use crate::service::DataloaderService;
use clap::Parser;
use lillm_proto::client;
use lillm_proto::member::{MemberClient, Registration};
use lillm_proto::net::{Action, ConnectSettings, RetryPolicy, WarnEvery};
use lillm_proto::v1 as pb;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A lillm dataloader actor: streams training batches over gRPC"
)]
pub struct Args {
    /// Coordinator address (host:port).
    #[arg(long, env = "LILLM_COORDINATOR")]
    coordinator: String,
    /// Prepared dataset directory (`lillm data prepare --out`), or its bucket URL
    /// (`s3://…`), fetched into --cache-dir.
    #[arg(long, env = "LILLM_DATA")]
    data: PathBuf,
    #[command(flatten)]
    store: lillm_store::StoreArgs,
    /// Address to serve batches on (loopback unless you mean otherwise; port 0 = any).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also answer grpc.health.v1 in plaintext here, for probes that cannot speak TLS.
    #[arg(long)]
    health_listen: Option<SocketAddr>,
    /// Address trainers should dial, when it differs from --listen (e.g. behind NAT).
    #[arg(long)]
    advertise: Option<String>,
    /// Node name (default: the host name).
    #[arg(long, env = "LILLM_NODE")]
    node: Option<String>,
    /// Index of this dataloader on its node.
    #[arg(long, default_value_t = 0)]
    local_index: u32,
    #[arg(
        long,
        env = "LILLM_JOB_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    job_token: String,
    /// Serve batches over TLS with this certificate (PEM); trainers then need LILLM_TLS_CA.
    #[arg(long, env = "LILLM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "LILLM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Milliseconds between heartbeats (default: what the coordinator says when this
    /// dataloader registers; 250 if it says nothing).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// CA certificate (PEM) of the coordinator's TLS certificate: dial it over TLS.
    #[arg(long, env = "LILLM_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

/// Registers (the retry policy waits for an unreachable coordinator); refusals are fatal.
/// Returns this dataloader's index and how often to heartbeat (`--heartbeat-ms` wins over
/// the coordinator's word).
async fn register(
    args: &Args,
    member: &MemberClient,
    address: &str,
    holdings: &Holdings,
) -> anyhow::Result<(u32, Duration)> {
    let manifest = holdings.manifest();
    let registration = Registration {
        address: address.to_string(),
        dataset_fingerprint: manifest.train_fingerprint(),
        train_shard_tokens: manifest.train.iter().map(|s| s.tokens).collect(),
        ..Registration::default()
    };
    let registered = member
        .register(&registration, DEFAULT_HEARTBEAT)
        .await
        .map_err(|e| anyhow::anyhow!("registration with {} failed: {e}", args.coordinator))?;
    let every = args
        .heartbeat_ms
        .map_or(registered.heartbeat, Duration::from_millis);
    Ok((registered.reply.dataloader_index.unwrap_or_default(), every))
}

/// Between heartbeats when neither the coordinator nor `--heartbeat-ms` says.
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(250);

/// Serves until `shutdown` is cancelled (by `main`, on SIGTERM or Ctrl-C), then leaves the
/// job.
pub fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = args.node.clone().unwrap_or_else(client::hostname);
    let span = tracing::info_span!("dataloader", role = "dataloader", node = %node, local_index = args.local_index);
    tokio::runtime::Runtime::new()?.block_on(serve(args, shutdown).instrument(span))
}

/// Heartbeats until `shutdown`; registers again when the coordinator no longer lists this
/// dataloader (evicted while paused or partitioned). The shards the coordinator places here
/// go to `placed` whenever they change.
async fn heartbeats(
    args: Arc<Args>,
    member: MemberClient,
    address: String,
    interval: Duration,
    holdings: Arc<Holdings>,
    placed: tokio::sync::watch::Sender<Option<BTreeSet<usize>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warn = WarnEvery::new(Duration::from_secs(5));
    // The version of the placement this dataloader holds (0: none yet).
    let mut version = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = every.tick() => {}
        }
        let beat = pb::HeartbeatRequest {
            placement_version: version,
            ..Default::default()
        };
        match member.heartbeat(beat).await {
            Ok(reply) if reply.placement_version != 0 && reply.placement_version != version => {
                version = reply.placement_version;
                let shards: BTreeSet<usize> = reply.shards.iter().map(|&s| s as usize).collect();
                tracing::info!(
                    version,
                    shards = shards.len(),
                    "the coordinator placed train shards here"
                );
                placed.send_replace(Some(shards));
            }
            Ok(_) => {}
            Err(e) if e.action() == Action::Register => {
                tracing::warn!(
                    "the coordinator no longer lists this dataloader; registering again"
                );
                register(&args, &member, &address, &holdings).await?;
                version = 0;
            }
            Err(e) if warn.due() => tracing::warn!(cause = %e, "heartbeat not delivered"),
            Err(_) => {}
        }
    }
}

/// Fetches the shards each new placement names, one placement at a time (a newer one
/// replaces any not yet started). A shard that cannot be fetched ends the dataloader.
async fn hold_placed(
    holdings: Arc<Holdings>,
    mut placements: tokio::sync::watch::Receiver<Option<BTreeSet<usize>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            changed = placements.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
        }
        let shards = placements.borrow_and_update().clone();
        if let Some(shards) = shards {
            holdings.hold(Some(shards)).await?;
        }
    }
}

/// The gRPC server of batches (and health) on `listener`, over TLS when `args` has a
/// certificate, until `shutdown`.
fn batch_server(
    args: &Args,
    holdings: Arc<Holdings>,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>>> {
    let span = tracing::Span::current();
    let mut builder = tonic::transport::Server::builder().trace_fn(move |_| span.clone());
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls_config(client::server_tls(cert, key).map_err(anyhow::Error::msg)?)?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(pb::dataloader_server::DataloaderServer::new(
            DataloaderService::new(holdings, shutdown.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    Ok(async move { Ok(server.await?) })
}

/// Waits for every loop, ending the others (through `shutdown`) as soon as one ends; the
/// first error is the outcome.
async fn first_failure(
    mut loops: JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut outcome = Ok(());
    while let Some(done) = loops.join_next().await {
        shutdown.cancel();
        if let (Ok(()), Err(e)) = (&outcome, done?) {
            outcome = Err(e);
        }
    }
    outcome
}

async fn serve(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let holdings = Arc::new(Holdings::open(&args.data, &args.store.options()).await?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let bound = listener.local_addr()?;
    let address = args.advertise.clone().unwrap_or_else(|| bound.to_string());
    let node = args.node.clone().unwrap_or_else(client::hostname);
    let member = MemberClient::new(
        &args.coordinator,
        (&node, pb::Role::Dataloader, args.local_index),
        &args.job_token,
        ConnectSettings::with_tls_ca(args.tls_ca.clone()),
        RetryPolicy::default(),
    )?;
    let (index, interval) = tokio::select! {
        registered = register(&args, &member, &address, &holdings) => registered?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    tracing::info!(
        index,
        data = %args.data.display(),
        %address,
        "serving batches"
    );

    // The heartbeat loop and the batch server run side by side; the first to fail ends
    // the other.
    let mut loops: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let (placed, placements) = tokio::sync::watch::channel(None);
    loops.spawn(
        heartbeats(
            args.clone(),
            member.clone(),
            address.clone(),
            interval,
            holdings.clone(),
            placed,
            shutdown.clone(),
        )
        .instrument(tracing::Span::current()),
    );
    loops.spawn(
        hold_placed(holdings.clone(), placements, shutdown.clone())
            .instrument(tracing::Span::current()),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::dataloader_server::DataloaderServer<DataloaderService>>()
        .await;
    if let Some(addr) = args.health_listen {
        let health =
            lillm_proto::health::serve_plaintext(addr, health_service.clone(), shutdown.clone());
        loops.spawn(async move { health.await.map_err(anyhow::Error::msg) });
    }
    let server = batch_server(&args, holdings, health_service, listener, &shutdown)?;
    loops.spawn(server);
    let outcome = first_failure(loops, &shutdown).await;
    // Leaving on purpose: the coordinator drops this dataloader now, not after a timeout.
    match member.leave("shut down", false).await {
        Ok(()) => tracing::info!("left the job"),
        Err(e) => {
            tracing::warn!(cause = %e, "could not tell the coordinator this dataloader leaves")
        }
    }
    tracing::info!("dataloader stopped");
    outcome
}
