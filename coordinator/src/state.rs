//! What the coordinator knows about the job.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Fixed facts of a job, from the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobConfig {
    /// Distinct nodes (machines) the job spans at most.
    pub nodes: usize,
    /// Trainer processes (one per GPU) the job runs with, over all nodes.
    pub trainers: usize,
    /// Dataloader processes the job runs with, over all nodes.
    pub dataloaders: usize,
    /// Members must present this token (empty = no token required).
    pub job_token: String,
    /// A member silent for longer than this is considered dead.
    pub heartbeat_timeout_ms: u64,
    /// Port of the c10d store that rank 0 serves on its own address.
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
    /// Global rank (trainers, once a generation starts) or dataloader index.
    pub rank: Option<usize>,
    /// Trainers: registered since the last membership change, so part of the next group.
    pub ready: bool,
    /// Trainers: index of the dataloader they stream from.
    pub dataloader: Option<usize>,
    pub step: u64,
    pub loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub mfu: Option<f64>,
    /// Trainers: completed the job and left; kept for status, exempt from liveness.
    #[serde(default)]
    pub finished: bool,
}

/// A checkpoint the job committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub step: u64,
    pub path: String,
    pub generation: u64,
    pub val_loss: Option<f64>,
}

/// The evaluation actor's latest score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    pub step: u64,
    pub val_loss: f64,
    pub sample: String,
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
    /// The training-config hash every trainer must share; pinned by the first to register
    /// (again after [`State::without_members`]).
    pub config_fingerprint: Option<String>,
    #[serde(with = "members_as_list")]
    pub members: BTreeMap<MemberId, Member>,
    pub last_commit: Option<Commit>,
    pub last_eval: Option<EvalResult>,
    /// Members lost to heartbeat timeouts or restarts, over the job's life.
    pub failures: u64,
}

impl State {
    pub fn new(config: JobConfig) -> Self {
        Self {
            config,
            generation: 0,
            phase: Phase::Gathering,
            config_fingerprint: None,
            members: BTreeMap::new(),
            last_commit: None,
            last_eval: None,
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

    /// Every expected trainer has (re-)registered since the last change and every
    /// dataloader is present: a group can form.
    pub fn can_start(&self) -> bool {
        let ready = self
            .members
            .values()
            .filter(|m| m.id.role == Role::Trainer && m.ready)
            .count();
        ready == self.config.trainers && self.count(Role::Dataloader) == self.config.dataloaders
    }

    /// Nodes that hold at least one member.
    pub fn nodes(&self) -> BTreeSet<&str> {
        self.members.keys().map(|id| id.node.as_str()).collect()
    }

    /// The trainer holding `rank`, if assigned.
    pub fn trainer_with_rank(&self, rank: usize) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.id.role == Role::Trainer && m.rank == Some(rank))
    }

    /// The same job with no members: a new group must form (every member registers anew,
    /// the first trainer pins the config again), resuming from the last commit. For a job
    /// whose processes were all stopped, e.g. to change its training config.
    pub fn without_members(&self) -> State {
        State {
            generation: self.generation + 1,
            phase: Phase::Gathering,
            config_fingerprint: None,
            members: BTreeMap::new(),
            ..self.clone()
        }
    }

    /// The dataloader with index `index`, if present.
    pub fn dataloader(&self, index: usize) -> Option<&Member> {
        self.members
            .values()
            .find(|m| m.id.role == Role::Dataloader && m.rank == Some(index))
    }

    /// Which step a (re)started group resumes from, and the checkpoint holding it.
    pub fn resume_point(&self) -> (u64, Option<&str>) {
        match &self.last_commit {
            Some(c) => (c.step, Some(c.path.as_str())),
            None => (0, None),
        }
    }
}

/// JSON object keys must be strings: members are stored as a list (each carries its id).
mod members_as_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{Member, MemberId};

    pub fn serialize<S: Serializer>(
        members: &BTreeMap<MemberId, Member>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        members.values().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<MemberId, Member>, D::Error> {
        let list = Vec::<Member>::deserialize(d)?;
        Ok(list.into_iter().map(|m| (m.id.clone(), m)).collect())
    }
}
