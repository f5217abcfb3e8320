//! What the coordinator knows about the job.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::placement::Placement;

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
    /// Port of the c10d store that rank 0 serves on its own address, when its registered
    /// address has none (see `decide::store_of`).
    pub store_port: u16,
    /// Elastic jobs: a generation may form on as few as this many nodes once the missing
    /// ones have stayed away for `elastic_grace_ms` (`None`: only with every node).
    #[serde(default)]
    pub min_nodes: Option<usize>,
    #[serde(default = "default_elastic_grace_ms")]
    pub elastic_grace_ms: u64,
}

fn default_elastic_grace_ms() -> u64 {
    30_000
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
    /// Trainers with the exactly-once data order: epochs done.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Trainers: completed the job and left; kept for status, exempt from liveness.
    #[serde(default)]
    pub finished: bool,
}

impl Member {
    /// A member as it registers at `now_ms`: `rank` is a dataloader's index (a trainer gets
    /// its rank when a generation starts) and `step` the job's last committed step; a
    /// trainer is ready for the next group at once.
    pub fn registered(
        id: MemberId,
        address: String,
        now_ms: u64,
        rank: Option<usize>,
        step: u64,
    ) -> Self {
        Self {
            ready: id.role == Role::Trainer,
            id,
            address,
            last_heartbeat_ms: now_ms,
            rank,
            dataloader: None,
            step,
            loss: None,
            tokens_per_s: None,
            mfu: None,
            epochs: None,
            finished: false,
        }
    }
}

/// A checkpoint the job committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub step: u64,
    /// Where rank 0 wrote it (the first copy reported).
    pub path: String,
    pub generation: u64,
    pub val_loss: Option<f64>,
    /// Every copy: node → directory on that node's disk. A commit is durable once
    /// [`State::copies_needed`] nodes hold it.
    #[serde(default)]
    pub copies: BTreeMap<String, String>,
}

impl Commit {
    /// The checkpoint at `url` (`…/checkpoints/step-N`, in a run's bucket) as the commit a
    /// new coordinator resumes the job from: a copy in object storage needs no other.
    pub fn in_bucket(url: &str) -> Result<Self, String> {
        let step = url
            .trim_end_matches('/')
            .rsplit_once("/checkpoints/step-")
            .filter(|(_, _)| url.contains("://"))
            .and_then(|(_, step)| step.parse::<u64>().ok())
            .ok_or_else(|| {
                format!("{url}: not a checkpoint in a bucket (s3://…/checkpoints/step-N)")
            })?;
        Ok(Self {
            step,
            path: url.trim_end_matches('/').to_string(),
            generation: 0,
            val_loss: None,
            copies: BTreeMap::new(),
        })
    }
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
    /// The latest durable checkpoint: the one a (re)started group resumes from.
    pub last_commit: Option<Commit>,
    /// Newer checkpoints reported by fewer nodes than needed (oldest first, a few at most).
    #[serde(default)]
    pub pending_commits: Vec<Commit>,
    pub last_eval: Option<EvalResult>,
    /// Members lost to heartbeat timeouts or restarts, over the job's life.
    pub failures: u64,
    /// When the current gathering had its first ready trainer (ms; 0 before, and while
    /// running), for the elastic grace.
    #[serde(default)]
    pub gathering_since_ms: u64,
    /// Micro-batches per step, pinned by the first trainer: a group's size must divide it.
    #[serde(default)]
    pub grad_accum: Option<u64>,
    /// The latest changes of the group (newest last, at most [`CHANGES_KEPT`]): when its
    /// generation moved, to what size, and why — for `lillm status`.
    #[serde(default)]
    pub changes: Vec<String>,
    /// When the liveness tick last ran (ms; 0 before the first): a long gap means the
    /// coordinator itself was away (see `decide`).
    #[serde(default)]
    pub last_tick_ms: u64,
    /// The train shards the dataloaders serve, as the first to register reported them.
    #[serde(default)]
    pub dataset: Option<DatasetShards>,
    /// Which dataloader index serves which train shard (once the dataset is known).
    #[serde(default)]
    pub placement: Option<Placement>,
}

/// A prepared dataset's train shards, as its dataloaders report them when they register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetShards {
    /// Names the dataset (a hash of its manifest's shard checksums): every dataloader of a
    /// job must serve the same one.
    pub fingerprint: String,
    /// Tokens of each train shard, in the manifest's order.
    pub shard_tokens: Vec<u64>,
}

/// How many group changes the state remembers.
pub const CHANGES_KEPT: usize = 8;

impl State {
    pub fn new(config: JobConfig) -> Self {
        Self {
            config,
            generation: 0,
            phase: Phase::Gathering,
            config_fingerprint: None,
            members: BTreeMap::new(),
            last_commit: None,
            pending_commits: Vec::new(),
            last_eval: None,
            failures: 0,
            gathering_since_ms: 0,
            grad_accum: None,
            changes: Vec::new(),
            last_tick_ms: 0,
            dataset: None,
            placement: None,
        }
    }

    /// A new job that resumes from `commit`: a run whose checkpoints are in a bucket, started
    /// again where no coordinator state survived (a fresh node).
    pub fn resuming(config: JobConfig, commit: Commit) -> Self {
        Self {
            last_commit: Some(commit),
            ..Self::new(config)
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
        self.ready_trainers().count() == self.config.trainers
            && self.count(Role::Dataloader) == self.config.dataloaders
    }

    /// Trainers holding a rank in the running generation: its world size.
    pub fn ranked_trainers(&self) -> usize {
        self.members
            .values()
            .filter(|m| m.id.role == Role::Trainer && m.rank.is_some())
            .count()
    }

    /// Trainers registered since the last membership change.
    pub fn ready_trainers(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.id.role == Role::Trainer && m.ready)
    }

    /// Group sizes the job's step can be divided over: divisors of `grad_accum` up to the
    /// job's trainers.
    pub fn possible_sizes(&self) -> Vec<usize> {
        (1..=self.config.trainers)
            .filter(|&k| self.grad_accum.is_none_or(|g| g % k as u64 == 0))
            .collect()
    }

    /// Whether an elastic generation may form now with the ready trainers, or why not.
    pub fn elastic_start(&self, now_ms: u64) -> Result<(), String> {
        let Some(min_nodes) = self.config.min_nodes else {
            return Err("not elastic".into());
        };
        let waited = now_ms.saturating_sub(self.gathering_since_ms);
        if self.gathering_since_ms == 0 || waited < self.config.elastic_grace_ms {
            return Err(format!(
                "waiting {} ms for missing members before an elastic start",
                self.config.elastic_grace_ms
            ));
        }
        // A trainer still listed but not registered again is alive (the silent are evicted)
        // and between generations, finishing its step: a group formed without it would
        // start from an older state than the job has.
        let between = self
            .members
            .values()
            .filter(|m| m.id.role == Role::Trainer && !m.ready && !m.finished)
            .count();
        if between > 0 {
            return Err(format!(
                "{between} live trainer(s) have yet to register again for the next generation"
            ));
        }
        let ready: Vec<&Member> = self.ready_trainers().collect();
        let nodes: BTreeSet<&str> = ready.iter().map(|m| m.id.node.as_str()).collect();
        if nodes.len() < min_nodes || ready.is_empty() {
            return Err(format!(
                "{} node(s) ready, the job needs at least {min_nodes}",
                nodes.len()
            ));
        }
        if self.config.dataloaders > 0 && self.count(Role::Dataloader) == 0 {
            return Err("no dataloader".into());
        }
        if !self.possible_sizes().contains(&ready.len()) {
            return Err(format!(
                "{} trainers cannot divide grad_accum {}; possible sizes: {:?}",
                ready.len(),
                self.grad_accum.unwrap_or(0),
                self.possible_sizes()
            ));
        }
        Ok(())
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
            // The dataloaders register anew, perhaps with another dataset.
            dataset: None,
            placement: None,
            ..self.clone()
        }
    }

    /// This node's saved state, or — when the run's bucket holds a newer commit than it
    /// recorded (the job went on elsewhere, e.g. on another node after this one's pod was
    /// moved) — a new group resuming from that commit: the saved members and placement are
    /// of the older job. Returns whether the bucket's commit was taken.
    pub fn caught_up_with(self, bucket: Commit) -> (State, bool) {
        let recorded = self.last_commit.as_ref().map_or(0, |c| c.step);
        if bucket.step <= recorded {
            return (self, false);
        }
        let mut state = self.without_members();
        state.last_commit = Some(bucket);
        (state, true)
    }

    /// The train shards dataloader `index` serves (none before the dataset is known).
    pub fn shards_of(&self, index: usize) -> Vec<usize> {
        self.placement
            .as_ref()
            .map(|p| p.shards_of(index as u32))
            .unwrap_or_default()
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

    /// Where `node` may find the resume checkpoint: its own copy, else rank 0's path (there
    /// when the nodes share a volume). A trainer that finds no valid checkpoint there takes
    /// the state from a rank that has one.
    pub fn resume_copy_on(&self, node: &str) -> Option<&str> {
        let c = self.last_commit.as_ref()?;
        Some(c.copies.get(node).unwrap_or(&c.path))
    }

    /// The ranks that write checkpoints in the running generation: rank 0, and the lowest
    /// rank on another node than rank 0's (when the group spans nodes), so that every
    /// checkpoint exists on two nodes' disks. All ranks hold the same state, so the second
    /// copy costs the network nothing.
    pub fn checkpoint_writers(&self) -> Vec<usize> {
        let Some(leader) = self.trainer_with_rank(0) else {
            return Vec::new();
        };
        let second = self
            .members
            .values()
            .filter(|m| m.id.role == Role::Trainer && m.id.node != leader.id.node)
            .filter_map(|m| m.rank)
            .min();
        std::iter::once(0).chain(second).collect()
    }

    /// How many nodes must hold a checkpoint before it is durable: two, or one when the
    /// group runs on a single node.
    pub fn copies_needed(&self) -> usize {
        self.checkpoint_writers().len()
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

#[cfg(test)]
mod commit_tests {
    use super::*;

    #[test]
    fn a_bucket_checkpoint_is_the_commit_a_new_job_resumes_from() {
        let url = "s3://b/runs/demo/checkpoints/step-00000120/";
        let commit = Commit::in_bucket(url).unwrap();
        assert_eq!(commit.step, 120);
        assert_eq!(commit.path, "s3://b/runs/demo/checkpoints/step-00000120");
        let job = JobConfig {
            nodes: 2,
            trainers: 2,
            dataloaders: 2,
            job_token: String::new(),
            heartbeat_timeout_ms: 2_000,
            store_port: 29500,
            min_nodes: None,
            elastic_grace_ms: 30_000,
        };
        let state = State::resuming(job, commit);
        assert_eq!(
            state.resume_point(),
            (120, Some("s3://b/runs/demo/checkpoints/step-00000120"))
        );
        // Every node reads the bucket's copy.
        assert_eq!(
            state.resume_copy_on("any-node"),
            Some("s3://b/runs/demo/checkpoints/step-00000120")
        );
    }

    #[test]
    fn anything_but_a_bucket_checkpoint_is_refused_by_name() {
        for bad in [
            "runs/demo/checkpoints/step-00000120",
            "s3://b/runs/demo",
            "s3://b/runs/demo/checkpoints/step-x",
        ] {
            let err = Commit::in_bucket(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
