//! The coordinator of a distributed lillm job.
//!
//! Layout:
//! - `state`: [`State`], [`Member`], [`JobConfig`] — everything the coordinator knows.
//! - `decide`: [`decide_in_place`], the single transition function `(now, &mut State, Event)
//!   → Outcome` ([`decide`] is its copying form), and the rules read from a state: each
//!   trainer's [`Assignment`] in its [`Group`], the heartbeat interval.
//! - `store`: [`StateStore`], the durable copy of the state (redb).
//! - `service`: [`Coordinator`], the gRPC `Coordinator` and `Status` services.
//! - `metrics`: Prometheus text for `/metrics`.
//! - `server`: [`serve`], which runs all of it (plus health and reflection) on sockets.
//! - `cli`: the command line of the `coordinator` binary and `lillm coordinator`.
//!
//! The network layer and the durable store only translate requests into [`Event`]s and
//! persist the resulting [`State`]; every rule lives in `decide`, tested with hand-built
//! states and virtual time.

pub mod cli;
mod decide;
pub mod metrics;
pub mod placement;
mod server;
mod service;
mod state;
mod store;

pub use decide::{
    authorize, decide, decide_in_place, heartbeat_interval_ms, host_of, store_of, Action,
    Assignment, Decision, Event, Group, Outcome, Refusal, HEARTBEATS_PER_SECOND,
};
pub use server::{serve, ServerConfig};
pub use service::{job_status, node_status, now_ms, refusal_status, Coordinator};
pub use state::{
    Commit, DatasetShards, EvalResult, JobConfig, Member, MemberId, Phase, Role, State,
};
pub use store::{StateStore, StoreError};
