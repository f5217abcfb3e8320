//! A running generation as its trainers see it: what their assignments share ([`Group`]),
//! each trainer's place in it ([`Assignment`]) and where its c10d store is served.

use std::collections::BTreeMap;

use crate::state::{MemberId, Phase, Role, State};

/// What every trainer's assignment in a running generation shares, computed once per
/// change of the state (a scan of the members) so that each of thousands of assignments
/// costs a lookup, not another scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub generation: u64,
    pub world_size: usize,
    /// The c10d store rank 0 serves.
    pub store_host: String,
    pub store_port: u16,
    pub writers: Vec<usize>,
    /// The lowest rank on each node: the one that reads the node's copy of the checkpoint.
    pub first_rank_on_node: BTreeMap<String, usize>,
    /// Dataloader index → address.
    pub dataloaders: BTreeMap<usize, String>,
}

/// A trainer's place in a running generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub generation: u64,
    pub rank: usize,
    pub world_size: usize,
    pub store_host: String,
    pub store_port: u16,
    pub store_prefix: String,
    /// Step to resume from (0: start fresh) and the copy this trainer reads, if it is the
    /// first rank on its node.
    pub resume_step: u64,
    pub resume_path: Option<String>,
    /// The dataloader it streams from: index and address (`None`: it reads its own data).
    pub dataloader: Option<(usize, String)>,
    pub writes_checkpoints: bool,
}

impl Group {
    /// The running generation's shared facts; `None` while gathering.
    pub fn of(state: &State) -> Option<Group> {
        if state.phase != Phase::Running {
            return None;
        }
        let leader = state.trainer_with_rank(0)?;
        let (store_host, store_port) = store_of(&leader.address, state.config.store_port);
        let mut first_rank_on_node = BTreeMap::<String, usize>::new();
        let mut dataloaders = BTreeMap::new();
        let mut world_size = 0;
        for m in state.members.values() {
            match (m.id.role, m.rank) {
                (Role::Trainer, Some(rank)) => {
                    world_size += 1;
                    let first = first_rank_on_node.entry(m.id.node.clone()).or_insert(rank);
                    *first = (*first).min(rank);
                }
                (Role::Dataloader, Some(index)) => {
                    dataloaders.insert(index, m.address.clone());
                }
                _ => {}
            }
        }
        Some(Group {
            generation: state.generation,
            world_size,
            store_host,
            store_port,
            writers: state.checkpoint_writers(),
            first_rank_on_node,
            dataloaders,
        })
    }

    /// Trainer `id`'s assignment, once it holds a rank in this group: one reader per node of
    /// the node's checkpoint copy (its first rank), the checkpoint writers, its dataloader.
    pub fn assignment(&self, state: &State, id: &MemberId) -> Option<Assignment> {
        let member = state.members.get(id)?;
        if state.generation != self.generation || !member.ready {
            return None;
        }
        let rank = member.rank?;
        // A job whose trainers read their data themselves (SFT, DPO) has no dataloader.
        let dataloader = match member.dataloader {
            Some(index) => Some((index, self.dataloaders.get(&index)?.clone())),
            None if state.config.dataloaders == 0 => None,
            None => return None,
        };
        let first_on_node = self.first_rank_on_node.get(&id.node) == Some(&rank);
        Some(Assignment {
            generation: self.generation,
            rank,
            // The generation's ranks: fewer than the job's trainers after an elastic start.
            world_size: self.world_size,
            store_host: self.store_host.clone(),
            store_port: self.store_port,
            store_prefix: format!("lillm/gen{}", self.generation),
            resume_step: state.resume_point().0,
            resume_path: first_on_node
                .then(|| state.resume_copy_on(&id.node).map(str::to_string))
                .flatten(),
            dataloader,
            writes_checkpoints: self.writers.contains(&rank),
        })
    }
}

/// Where rank 0 serves the c10d store: a trainer registers `host:port` with the port of
/// the store its process serves for its whole life (so a group it gave up never blocks the
/// next one's port); a trainer that sends only a host serves it on the job's `store_port`.
pub fn store_of(trainer_address: &str, store_port: u16) -> (String, u16) {
    match trainer_address.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(port) => (host.to_string(), port),
            Err(_) => (trainer_address.to_string(), store_port),
        },
        None => (trainer_address.to_string(), store_port),
    }
}

/// The host part of `host:port` (or the whole string when it has no port).
pub fn host_of(address: &str) -> String {
    match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host.to_string(),
        _ => address.to_string(),
    }
}
