//! The lillm gRPC protocol, generated from `proto/lillm/v1/*.proto`.
//!
//! Layout: [`v1`] holds the messages and the client/server stubs of the `Coordinator`,
//! `Status` and `Dataloader` services; [`FILE_DESCRIPTOR_SET`] is what reflection serves;
//! [`net`] is the one way to dial a member (connect, typed errors, retry policy);
//! [`member`] is the membership client of every role (register, heartbeat, leave);
//! [`client`] holds member identities and server TLS; [`process`] turns signals into the
//! shutdown token every `main` passes to its role.

pub mod v1 {
    tonic::include_proto!("lillm.v1");
}

/// Encoded descriptors of every lillm.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lillm_v1_descriptor");

pub mod health;
pub mod member;
pub mod net;
pub mod process;

/// Identities and server-side TLS shared by every member of a job (dialing is [`net`]).
pub mod client {
    use super::v1 as pb;

    use tonic::transport::Channel;

    pub type CoordinatorClient = pb::coordinator_client::CoordinatorClient<Channel>;

    /// Server-side TLS from PEM files: the certificate (chain) and its private key.
    pub fn server_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
    ) -> Result<tonic::transport::ServerTlsConfig, String> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
        };
        // tonic's server asks rustls for the process's crypto provider; with object_store
        // linking aws-lc-rs beside tonic's ring there are two, and rustls refuses to guess
        // (it panics in the accept task). Name ring, as tonic's client already does.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        Ok(tonic::transport::ServerTlsConfig::new().identity(identity))
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
