//! What the coordinator knows about the job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Fixed facts of a job, from the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Trainer processes (one per GPU) the job runs with.
    pub trainers: usize,
    /// Dataloader processes the job runs with.
    pub dataloaders: usize,
    /// Members must present this token (empty = no token required).
    pub job_token: String,
    /// Hash of the training config; members built from another config are refused.
    pub config_fingerprint: String,
    /// A member silent for longer than this is considered dead.
    pub heartbeat_timeout_ms: u64,
    /// Host:port of the c10d store handed to trainers (rank 0's address).
    pub store_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    Trainer,
    Dataloader,
}

/// `(node, role, local index)`: stable across restarts of the same process slot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId {
    pub node: String,
    pub role: Role,
    pub local_index: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: MemberId,
    /// Address the member serves on (dataloaders) or binds c10d on (trainers).
    pub address: String,
    pub last_heartbeat_ms: u64,
    /// Global rank (trainers) or dataloader index, once assigned.
    pub rank: Option<usize>,
    pub step: u64,
    pub loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
}

/// A checkpoint the job committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub step: u64,
    pub path: String,
    pub generation: u64,
    pub val_loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Waiting for every expected member to register.
    Gathering,
    /// Ranks are assigned; training runs in this generation.
    Running,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub config: JobConfig,
    /// Bumped on every membership change; requests from older generations are refused.
    pub generation: u64,
    pub phase: Phase,
    pub members: BTreeMap<MemberId, Member>,
    pub last_commit: Option<Commit>,
    /// Members lost to heartbeat timeouts or restarts, over the job's life.
    pub failures: u64,
}

impl State {
    pub fn new(config: JobConfig) -> Self {
        Self {
            config,
            generation: 0,
            phase: Phase::Gathering,
            members: BTreeMap::new(),
            last_commit: None,
            failures: 0,
        }
    }

    pub fn count(&self, role: Role) -> usize {
        self.members.keys().filter(|id| id.role == role).count()
    }

    pub fn expected(&self, role: Role) -> usize {
        match role {
            Role::Trainer => self.config.trainers,
            Role::Dataloader => self.config.dataloaders,
        }
    }

    /// Every expected member is present.
    pub fn is_complete(&self) -> bool {
        [Role::Trainer, Role::Dataloader]
            .into_iter()
            .all(|r| self.count(r) == self.expected(r))
    }

    /// The trainer holding `rank`, if assigned.
    pub fn trainer_with_rank(&self, rank: usize) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.id.role == Role::Trainer && m.rank == Some(rank))
    }
}
