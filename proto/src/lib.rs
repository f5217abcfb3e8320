//! The lillm gRPC protocol, generated from `proto/lillm/v1/*.proto`.
//!
//! Layout: [`v1`] holds the messages and the client/server stubs of the `Coordinator`,
//! `Status` and `Dataloader` services; [`FILE_DESCRIPTOR_SET`] is what reflection serves.

pub mod v1 {
    tonic::include_proto!("lillm.v1");
}

/// Encoded descriptors of every lillm.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lillm_v1_descriptor");

/// Client-side helpers shared by every member of a job.
pub mod client {
    use super::v1 as pb;

    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    pub type CoordinatorClient = pb::coordinator_client::CoordinatorClient<Channel>;

    /// Environment variable naming the CA certificate (PEM) that signed the servers' TLS
    /// certificates; when set, every connection uses TLS.
    pub const TLS_CA_ENV: &str = "LILLM_TLS_CA";

    /// A connection to `address` (`host:port` or a URI): TLS when `LILLM_TLS_CA` is set.
    pub async fn channel(address: &str) -> Result<Channel, String> {
        let ca = std::env::var_os(TLS_CA_ENV);
        let uri = match (address.contains("://"), ca.is_some()) {
            (true, _) => address.to_string(),
            (false, true) => format!("https://{address}"),
            (false, false) => format!("http://{address}"),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| format!("`{address}` is not a host:port address: {e}"))?;
        if let Some(path) = ca {
            let pem = std::fs::read(&path).map_err(|e| {
                format!("{TLS_CA_ENV}={}: cannot read: {e}", path.to_string_lossy())
            })?;
            endpoint = endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .map_err(|e| format!("TLS configuration: {e}"))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot reach {address}: {}", error_chain(&e)))
    }

    /// An error and its causes on one line ("transport error: … : invalid peer certificate").
    fn error_chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// Server-side TLS from PEM files: the certificate (chain) and its private key.
    pub fn server_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<tonic::transport::ServerTlsConfig, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
        };
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
    }

    /// Connects to the coordinator at `address`.
    pub async fn coordinator(address: &str) -> Result<CoordinatorClient, String> {
        channel(address)
            .await
            .map(pb::coordinator_client::CoordinatorClient::new)
            .map_err(|e| format!("the coordinator: {e}"))
    }

    /// This machine's name: the default node id of its members.
    pub fn hostname() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "localhost".into())
    }

    pub fn member_id(node: &str, role: pb::Role, local_index: u32) -> pb::MemberId {
        pb::MemberId {
            node: node.to_string(),
            role: role as i32,
            local_index,
        }
    }
}
