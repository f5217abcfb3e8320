//! Prometheus `/metrics`: the job's state rendered in the text exposition format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

use crate::service::now_ms;
use crate::{Phase, Role, State};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberLabels {
    node: String,
    role: String,
    index: u64,
}

type FloatGauge = Gauge<f64, AtomicU64>;

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    let g = FloatGauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn member_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    state: &State,
    value: impl Fn(&crate::Member) -> Option<f64>,
) {
    let family = Family::<MemberLabels, FloatGauge>::default();
    for m in state.members.values() {
        if let Some(v) = value(m) {
            let labels = MemberLabels {
                node: m.id.node.clone(),
                role: m.id.role.name().into(),
                index: m.id.local_index as u64,
            };
            family.get_or_create(&labels).set(v);
        }
    }
    registry.register(name, help, family);
}

/// The text a Prometheus scrape of the coordinator receives.
pub fn render(state: &State, saves: u64) -> String {
    let mut r = Registry::with_prefix("lillm");
    let now = now_ms();
    let counter = Counter::<u64>::default();
    counter.inc_by(saves);
    r.register(
        "coordinator_state_saves",
        "Writes of the coordinator's state to its store since it started",
        counter,
    );
    gauge(
        &mut r,
        "generation",
        "Current membership generation",
        state.generation as f64,
    );
    gauge(
        &mut r,
        "running",
        "1 while a generation trains, 0 while members gather",
        (state.phase == Phase::Running) as u8 as f64,
    );
    gauge(
        &mut r,
        "restarts",
        "Members lost to restarts or heartbeat timeouts over the job's life",
        state.failures as f64,
    );
    for (role, name) in [
        (Role::Trainer, "trainers"),
        (Role::Dataloader, "dataloaders"),
    ] {
        gauge(
            &mut r,
            &format!("{name}_registered"),
            &format!("Registered {name}"),
            state.count(role) as f64,
        );
        gauge(
            &mut r,
            &format!("{name}_expected"),
            &format!("{name} the job runs with"),
            state.expected(role) as f64,
        );
    }
    if let Some(c) = &state.last_commit {
        gauge(
            &mut r,
            "checkpoint_step",
            "Step of the last committed checkpoint",
            c.step as f64,
        );
    }
    if let Some(e) = &state.last_eval {
        gauge(
            &mut r,
            "eval_val_loss",
            "Validation loss of the last scored checkpoint (nats/token)",
            e.val_loss,
        );
    }
    member_family(
        &mut r,
        "member_step",
        "Optimizer steps a member reported",
        state,
        |m| Some(m.step as f64),
    );
    member_family(
        &mut r,
        "member_loss",
        "Training loss a trainer reported (nats/token)",
        state,
        |m| m.loss,
    );
    member_family(
        &mut r,
        "member_tokens_per_second",
        "Trainer throughput",
        state,
        |m| m.tokens_per_s,
    );
    member_family(
        &mut r,
        "member_mfu_ratio",
        "Model FLOPs utilisation, 0..1",
        state,
        |m| m.mfu,
    );
    member_family(
        &mut r,
        "member_heartbeat_age_seconds",
        "Seconds since the member's last heartbeat",
        state,
        |m| Some(now.saturating_sub(m.last_heartbeat_ms) as f64 / 1e3),
    );
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}
