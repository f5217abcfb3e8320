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

    pub type CoordinatorClient =
        pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>;

    /// `host:port` → a URI tonic accepts (an explicit scheme is kept).
    pub fn uri(address: &str) -> String {
        match address.contains("://") {
            true => address.to_string(),
            false => format!("http://{address}"),
        }
    }

    /// Connects to the coordinator at `address` (`host:port` or a URI).
    pub async fn coordinator(address: &str) -> Result<CoordinatorClient, String> {
        pb::coordinator_client::CoordinatorClient::connect(uri(address))
            .await
            .map_err(|e| format!("cannot reach the coordinator at {address}: {e}"))
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
