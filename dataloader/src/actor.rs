//! The dataloader actor's process: memory-maps a prepared dataset, registers with the
//! coordinator, heartbeats, and streams batches to the trainers it is paired with. Shared by
//! the `dataloader` binary and `lillm dataloader`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::service::DataloaderService;
use crate::shards::Dataset;
use clap::Parser;
use lillm_proto::client;
use lillm_proto::v1 as pb;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A lillm dataloader actor: streams training batches over gRPC"
)]
pub struct Args {
    /// Coordinator address (host:port).
    #[arg(long, env = "LILLM_COORDINATOR")]
    coordinator: String,
    /// Prepared dataset directory (`lillm data prepare --out`).
    #[arg(long, env = "LILLM_DATA")]
    data: PathBuf,
    /// Address to serve batches on (loopback unless you mean otherwise; port 0 = any).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
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
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
}

/// Registers (retrying while the coordinator is unreachable); refusals are fatal.
async fn register(args: &Args, id: &pb::MemberId, address: &str) -> anyhow::Result<u32> {
    loop {
        let attempt = async {
            let mut c = client::coordinator(&args.coordinator).await?;
            c.register(pb::RegisterRequest {
                id: Some(id.clone()),
                address: address.to_string(),
                job_token: args.job_token.clone(),
                config_fingerprint: String::new(),
            })
            .await
            .map_err(|s| format!("{}: {}", args.coordinator, s.message()))
            .map(|r| r.into_inner())
        };
        match attempt.await {
            Ok(reply) => {
                tracing::info!("{}", reply.message);
                return Ok(reply.dataloader_index.unwrap_or_default());
            }
            Err(e) if e.contains("cannot reach") => {
                tracing::warn!("{e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("registration refused: {e}"),
        }
    }
}

/// Serves until Ctrl-C / SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let data = Arc::new(Dataset::open(&args.data)?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let bound = listener.local_addr()?;
    let address = args.advertise.clone().unwrap_or_else(|| bound.to_string());
    let node = args.node.clone().unwrap_or_else(client::hostname);
    let id = client::member_id(&node, pb::Role::Dataloader, args.local_index);
    let index = register(&args, &id, &address).await?;
    tracing::info!(
        "dataloader {index} serves {} on {address}",
        args.data.display()
    );

    let heartbeat = {
        let (args, id, address) = (args.clone(), id.clone(), address.clone());
        async move {
            let every = Duration::from_millis(args.heartbeat_ms);
            loop {
                tokio::time::sleep(every).await;
                let beat = async {
                    let mut c = client::coordinator(&args.coordinator).await?;
                    c.heartbeat(pb::HeartbeatRequest {
                        id: Some(id.clone()),
                        job_token: args.job_token.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| (s.code(), s.message().to_string()))
                    .map_err(|(code, m)| format!("{code:?}: {m}"))
                };
                match beat.await {
                    Ok(_) => {}
                    // Evicted while unreachable (paused, partitioned): join again.
                    Err(e) if e.starts_with("NotFound") => {
                        tracing::warn!(
                            "the coordinator no longer lists this dataloader; registering again"
                        );
                        if let Err(e) = register(&args, &id, &address).await {
                            tracing::error!("{e}");
                        }
                    }
                    Err(e) => tracing::warn!("heartbeat: {e}"),
                }
            }
        }
    };
    tokio::spawn(heartbeat);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::dataloader_server::DataloaderServer<DataloaderService>>()
        .await;
    let mut builder = tonic::transport::Server::builder();
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.tls_config(client::server_tls(cert, key).map_err(anyhow::Error::msg)?)?;
    }
    builder
        .add_service(health_service)
        .add_service(pb::dataloader_server::DataloaderServer::new(
            DataloaderService::new(data),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("install a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            },
        )
        .await?;
    Ok(())
}
