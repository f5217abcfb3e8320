//! The plaintext health port: `grpc.health.v1` alone on its own address, so that probes
//! which cannot speak TLS (the kubelet's gRPC probe) can ask a server whose main port
//! requires TLS. It reports what the main server's health reporter reports.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_server::{Health, HealthServer};

/// Serves `health` (from `tonic_health::server::health_reporter`) over plaintext on
/// `listen` until `shutdown`.
pub async fn serve_plaintext<S: Health>(
    listen: SocketAddr,
    health: HealthServer<S>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot serve health checks on {listen}: {e}"))?;
    tracing::info!(%listen, "plaintext gRPC health checks");
    tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
        .map_err(|e| format!("the health server on {listen} failed: {e}"))
}
