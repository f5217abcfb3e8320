//! How a launcher tells a hung trainer from a slow one. A process that still runs but that
//! the coordinator evicted for silence (a stuck collective, a wedged driver call, SIGSTOP)
//! holds up a fixed-size job forever: the launcher asks the coordinator which of its
//! trainers it still lists, and kills one that stayed unlisted for a grace period, so that
//! the normal restart path replaces it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lillm_proto::net::{self, ConnectSettings};
use lillm_proto::v1 as pb;

/// What the launcher learnt about one trainer process from the coordinator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Listing {
    /// The coordinator listed this process as a member at least once since it started (a
    /// trainer still loading its data has not registered yet and is never judged).
    seen: bool,
    /// Since when the coordinator no longer lists it.
    missing_since: Option<Instant>,
}

impl Listing {
    /// Takes one answer of the coordinator (`listed`: it counts this trainer as a member) at
    /// `now`; true when the process has been unlisted for longer than `grace`: it is hung.
    pub fn hung(&mut self, listed: bool, now: Instant, grace: Duration) -> bool {
        if listed {
            *self = Listing {
                seen: true,
                missing_since: None,
            };
            return false;
        }
        if !self.seen {
            return false;
        }
        let since = *self.missing_since.get_or_insert(now);
        now.duration_since(since) > grace
    }
}

/// Asks the coordinator which of this node's trainers (local ranks) it lists; `None` when
/// it cannot be asked (then nobody is judged).
pub type ListedTrainers = Box<dyn FnMut() -> Option<BTreeSet<u32>>>;

/// [`ListedTrainers`] over gRPC: one node's members (a lookup at the coordinator, whatever
/// the job's size; status is read-only and needs no job token).
pub fn ask_coordinator(
    coordinator: String,
    node: String,
    connect: ConnectSettings,
) -> ListedTrainers {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok();
    let mut client = None;
    Box::new(move || {
        let rt = rt.as_ref()?;
        rt.block_on(async {
            if client.is_none() {
                let channel = net::channel(&coordinator, &connect).ok()?;
                client = Some(pb::status_client::StatusClient::new(channel));
            }
            let request = pb::StatusRequest {
                member_limit: 0,
                node: node.clone(),
            };
            let mut c = client.clone()?;
            let job = net::call("the coordinator", &connect, c.get_status(request))
                .await
                .ok()?;
            Some(
                job.members
                    .iter()
                    .filter_map(|m| m.id.as_ref())
                    .filter(|id| id.role == pb::Role::Trainer as i32 && id.node == node)
                    .map(|id| id.local_index)
                    .collect(),
            )
        })
    })
}

/// How often a launcher asks.
pub const POLL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_trainer_unlisted_past_the_grace_is_hung() {
        let t0 = Instant::now();
        let mut l = Listing::default();
        assert!(!l.hung(true, at(t0, 0), GRACE));
        assert!(!l.hung(false, at(t0, 1), GRACE), "evicted at 1 s");
        assert!(!l.hung(false, at(t0, 11), GRACE), "exactly the grace");
        assert!(l.hung(false, at(t0, 12), GRACE));
    }

    #[test]
    fn a_trainer_that_registers_again_is_not_hung() {
        let t0 = Instant::now();
        let mut l = Listing::default();
        l.hung(true, at(t0, 0), GRACE);
        l.hung(false, at(t0, 1), GRACE);
        // Woken, it was refused, registered again: listed, the clock starts over.
        assert!(!l.hung(true, at(t0, 5), GRACE));
        assert!(!l.hung(false, at(t0, 6), GRACE));
        assert!(!l.hung(false, at(t0, 15), GRACE));
        assert!(l.hung(false, at(t0, 17), GRACE));
    }

    #[test]
    fn a_trainer_never_registered_is_never_judged() {
        let t0 = Instant::now();
        let mut l = Listing::default();
        for s in [0, 30, 600] {
            assert!(!l.hung(false, at(t0, s), GRACE), "still loading at {s} s");
        }
    }
}
