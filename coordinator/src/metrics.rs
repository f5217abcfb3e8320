//! Prometheus `/metrics`: the job's state rendered in the text exposition format.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

use crate::service::now_ms;
use crate::{Member, Phase, Role, State};

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

/// One figure per member: its name, help and value at a time in ms (`None`: the member has
/// not reported it).
type MemberFigure = (&'static str, &'static str, fn(&Member, u64) -> Option<f64>);

const MEMBER_FIGURES: [MemberFigure; 5] = [
    (
        "member_step",
        "Optimizer steps a member reported",
        |m, _| Some(m.step as f64),
    ),
    (
        "member_loss",
        "Training loss a trainer reported (nats/token)",
        |m, _| m.loss,
    ),
    ("member_tokens_per_second", "Trainer throughput", |m, _| {
        m.tokens_per_s
    }),
    (
        "member_mfu_ratio",
        "Model FLOPs utilisation, 0..1",
        |m, _| m.mfu,
    ),
    (
        "member_heartbeat_age_seconds",
        "Seconds since the member's last heartbeat",
        |m, now| Some(now.saturating_sub(m.last_heartbeat_ms) as f64 / 1e3),
    ),
];

fn member_family(registry: &mut Registry, figure: &MemberFigure, state: &State, now: u64) {
    let (name, help, value) = figure;
    let family = Family::<MemberLabels, FloatGauge>::default();
    for m in state.members.values() {
        if let Some(v) = value(m, now) {
            let labels = MemberLabels {
                node: m.id.node.clone(),
                role: m.id.role.name().into(),
                index: m.id.local_index as u64,
            };
            family.get_or_create(&labels).set(v);
        }
    }
    registry.register(*name, *help, family);
}

/// The job's own gauges as (name, help, value): its generation, phase, failures and
/// members, and the last commit's step and evaluation's loss once there are some.
fn job_gauges(state: &State) -> Vec<(String, String, f64)> {
    let mut gauges = vec![
        (
            "generation".into(),
            "Current membership generation".into(),
            state.generation as f64,
        ),
        (
            "running".into(),
            "1 while a generation trains, 0 while members gather".into(),
            (state.phase == Phase::Running) as u8 as f64,
        ),
        (
            "restarts".into(),
            "Members lost to restarts or heartbeat timeouts over the job's life".into(),
            state.failures as f64,
        ),
    ];
    for (role, name) in [
        (Role::Trainer, "trainers"),
        (Role::Dataloader, "dataloaders"),
    ] {
        gauges.push((
            format!("{name}_registered"),
            format!("Registered {name}"),
            state.count(role) as f64,
        ));
        gauges.push((
            format!("{name}_expected"),
            format!("{name} the job runs with"),
            state.expected(role) as f64,
        ));
    }
    if let Some(c) = &state.last_commit {
        gauges.push((
            "checkpoint_step".into(),
            "Step of the last committed checkpoint".into(),
            c.step as f64,
        ));
    }
    if let Some(e) = &state.last_eval {
        gauges.push((
            "eval_val_loss".into(),
            "Validation loss of the last scored checkpoint (nats/token)".into(),
            e.val_loss,
        ));
    }
    gauges
}

/// The text a Prometheus scrape of the coordinator receives.
pub fn render(state: &State, saves: u64) -> String {
    let mut r = Registry::with_prefix("lillm");
    let counter = Counter::<u64>::default();
    counter.inc_by(saves);
    r.register(
        "coordinator_state_saves",
        "Writes of the coordinator's state to its store since it started",
        counter,
    );
    for (name, help, value) in job_gauges(state) {
        gauge(&mut r, &name, &help, value);
    }
    let now = now_ms();
    for figure in &MEMBER_FIGURES {
        member_family(&mut r, figure, state, now);
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Commit, JobConfig, MemberId};

    fn job() -> State {
        State::new(JobConfig {
            nodes: 1,
            trainers: 2,
            dataloaders: 1,
            job_token: String::new(),
            heartbeat_timeout_ms: 5_000,
            store_port: 29500,
            min_nodes: None,
            elastic_grace_ms: 30_000,
        })
    }

    #[test]
    fn a_scrape_shows_the_job_and_each_member_with_what_it_reported() {
        let mut state = job();
        let id = MemberId {
            node: "gpu-7".into(),
            role: Role::Trainer,
            local_index: 1,
        };
        let mut member = Member::registered(id.clone(), "10.0.0.7:1".into(), now_ms(), None, 40);
        member.loss = Some(3.5);
        state.members.insert(id, member);
        let text = render(&state, 3);
        for line in [
            "lillm_coordinator_state_saves_total 3",
            "lillm_trainers_registered 1.0",
            "lillm_trainers_expected 2.0",
            "lillm_running 0.0",
            r#"lillm_member_step{node="gpu-7",role="trainer",index="1"} 40.0"#,
            r#"lillm_member_loss{node="gpu-7",role="trainer",index="1"} 3.5"#,
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // Nothing committed, scored or reported yet: no figure rather than a made-up zero.
        for absent in [
            "lillm_checkpoint_step ",
            "lillm_eval_val_loss ",
            "lillm_member_tokens_per_second{",
        ] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
        state.last_commit = Some(Commit::in_bucket("s3://b/r/checkpoints/step-120").unwrap());
        assert!(render(&state, 3)
            .lines()
            .any(|l| l == "lillm_checkpoint_step 120.0"));
    }
}
