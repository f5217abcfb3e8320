//! The coordinator of a distributed lillm job, as a pure state machine.
//!
//! Layout:
//! - `state`: [`State`], [`Member`], [`JobConfig`] — everything the coordinator knows.
//! - `decide`: [`decide`], the single transition function `(now, &State, Event) → Decision`.
//!
//! The network layer (gRPC) and the durable store only translate requests into [`Event`]s
//! and persist the resulting [`State`]; every rule lives here, tested with hand-built states
//! and virtual time.

mod decide;
mod state;

pub use decide::{decide, Action, Decision, Event, Refusal};
pub use state::{Commit, JobConfig, Member, MemberId, Phase, Role, State};
