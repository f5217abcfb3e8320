//! The online dataloader: the actor process that serves a prepared dataset's batches over
//! gRPC, and the trainer's side of that stream.
//!
//! Layout:
//! - `service`: the batch stream (bounded prefetch, ends on shutdown).
//! - `actor`: the dataloader process (register, heartbeat, serve, leave).
//! - `holdings`: the shards it holds (all of a directory; of a bucket, those placed on it).
//! - `remote`: the trainer's side of the stream, reconnecting without losing its place.

pub mod actor;
mod error;
pub mod holdings;
pub mod placed;
pub mod remote;
pub mod service;

pub use error::{Error, Result};
