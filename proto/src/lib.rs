//! The lillm gRPC protocol, generated from `proto/lillm/v1/*.proto`.
//!
//! Layout: [`v1`] holds the messages and the client/server stubs of the `Coordinator`,
//! `Status` and `Dataloader` services; [`FILE_DESCRIPTOR_SET`] is what reflection serves.

pub mod v1 {
    tonic::include_proto!("lillm.v1");
}

/// Encoded descriptors of every lillm.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lillm_v1_descriptor");
