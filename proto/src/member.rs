//! The one membership client every role uses — trainers, dataloaders, and launchers
//! speaking for a dead child: register (retried while the coordinator is unreachable, with
//! the heartbeat interval the coordinator sends back), heartbeat, and leave.

use std::time::Duration;

use crate::client::{member_id, CoordinatorClient};
use crate::net::{self, Action, ConnectSettings, NetError, RetryPolicy};
use crate::v1 as pb;

const COORDINATOR: &str = "the coordinator";

/// One member of a job as the coordinator knows it: its identity, token and connection.
#[derive(Clone)]
pub struct MemberClient {
    client: CoordinatorClient,
    id: pb::MemberId,
    job_token: String,
    connect: ConnectSettings,
    policy: RetryPolicy,
}

/// What a registration says.
#[derive(Debug, Clone)]
pub struct Registered {
    pub reply: pb::RegisterReply,
    /// How often to heartbeat: the coordinator's word, or the member's default.
    pub heartbeat: Duration,
}

/// What a member registers with.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    /// Where it serves (dataloaders), or the host and store port it binds (trainers).
    pub address: String,
    /// Trainers: the hash of the job's training config.
    pub config_fingerprint: String,
    /// Trainers joining again from the same process: the generation they were in.
    pub rejoining_from: u64,
    /// Trainers: micro-batches per step.
    pub grad_accum: u64,
    /// Dataloaders: the dataset's fingerprint and the tokens of its train shards.
    pub dataset_fingerprint: String,
    pub train_shard_tokens: Vec<u64>,
}

impl MemberClient {
    /// A member `(node, role, local_index)` of the job at `coordinator` (the connection is
    /// made at the first call and re-dialled when it breaks).
    pub fn new(
        coordinator: &str,
        id: (&str, pb::Role, u32),
        job_token: &str,
        connect: ConnectSettings,
        policy: RetryPolicy,
    ) -> Result<Self, NetError> {
        Ok(Self {
            client: CoordinatorClient::new(net::channel(coordinator, &connect)?),
            id: member_id(id.0, id.1, id.2),
            job_token: job_token.to_string(),
            connect,
            policy,
        })
    }

    pub fn id(&self) -> &pb::MemberId {
        &self.id
    }

    /// The coordinator's client, for the calls of one role (assignments, commits, where a
    /// dataloader is).
    pub fn coordinator(&self) -> CoordinatorClient {
        self.client.clone()
    }

    /// Registers, retrying an unreachable coordinator for the policy's patience; a refusal
    /// is returned at once. `default_heartbeat` applies when the coordinator names no
    /// interval.
    pub async fn register(
        &self,
        registration: &Registration,
        default_heartbeat: Duration,
    ) -> Result<Registered, NetError> {
        let request = pb::RegisterRequest {
            id: Some(self.id.clone()),
            address: registration.address.clone(),
            job_token: self.job_token.clone(),
            config_fingerprint: registration.config_fingerprint.clone(),
            rejoining_from: registration.rejoining_from,
            grad_accum: registration.grad_accum,
            dataset_fingerprint: registration.dataset_fingerprint.clone(),
            train_shard_tokens: registration.train_shard_tokens.clone(),
        };
        let reply = self
            .policy
            .run("register with the coordinator", || {
                let mut c = self.client.clone();
                let request = request.clone();
                async move { net::call(COORDINATOR, &self.connect, c.register(request)).await }
            })
            .await?;
        tracing::info!(coordinator_said = %reply.message, "registered");
        let heartbeat = match reply.heartbeat_interval_ms {
            0 => default_heartbeat,
            ms => Duration::from_millis(ms),
        };
        Ok(Registered { reply, heartbeat })
    }

    /// One heartbeat carrying `progress` (its id and token are this member's), not retried:
    /// the next one is on its way.
    pub async fn heartbeat(
        &self,
        progress: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatReply, NetError> {
        let request = pb::HeartbeatRequest {
            id: Some(self.id.clone()),
            job_token: self.job_token.clone(),
            ..progress
        };
        let mut c = self.client.clone();
        net::call(COORDINATOR, &self.connect, c.heartbeat(request)).await
    }

    /// Tells the coordinator this member leaves on purpose (`finished`: a trainer that
    /// completed the job), so its generation ends now rather than after a heartbeat
    /// timeout. A coordinator that no longer lists it has nothing to be told: that is fine.
    pub async fn leave(&self, reason: &str, finished: bool) -> Result<(), NetError> {
        let request = pb::LeaveRequest {
            id: Some(self.id.clone()),
            job_token: self.job_token.clone(),
            reason: reason.to_string(),
            finished,
        };
        let mut c = self.client.clone();
        match net::call(COORDINATOR, &self.connect, c.leave(request)).await {
            Ok(_) => Ok(()),
            Err(e) if e.action() == Action::Register => Ok(()),
            Err(e) => Err(e),
        }
    }
}
