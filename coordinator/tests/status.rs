//! `lillm status` at the size of a large job: a summary of every member whatever the page
//! of members listed, and one node's members alone.

use lillm_coordinator::{decide, job_status, node_status, Event, JobConfig, MemberId, Role, State};

/// A running job of `nodes` nodes of four trainers and one dataloader each.
fn running_job(nodes: usize) -> State {
    let mut state = State::new(JobConfig {
        nodes,
        trainers: 4 * nodes,
        dataloaders: nodes,
        job_token: String::new(),
        heartbeat_timeout_ms: 2_000,
        store_port: 29500,
        min_nodes: None,
        elastic_grace_ms: 30_000,
    });
    for n in 0..nodes {
        let node = format!("node-{n:03}");
        let members = (0..4)
            .map(|i| (Role::Trainer, i))
            .chain([(Role::Dataloader, 0)]);
        for (role, local_index) in members {
            let event = Event::Register {
                id: MemberId {
                    node: node.clone(),
                    role,
                    local_index,
                },
                address: format!("10.0.{n}.{local_index}:7000"),
                config_fingerprint: "cfg".into(),
                generation: None,
                grad_accum: None,
                dataset: None,
            };
            let d = decide(1_000, &state, event);
            assert!(d.refusal.is_none(), "{}", d.reason);
            state = d.state;
        }
    }
    state
}

#[test]
fn the_summary_counts_every_member_and_a_page_lists_some() {
    let state = running_job(40);
    let status = job_status(&state, 1_500, 64);
    assert_eq!(status.members.len(), 64);
    let summary = status.summary.unwrap();
    assert_eq!(
        (summary.members, summary.members_listed),
        (200, 64),
        "{summary:?}"
    );
    assert_eq!(
        (
            summary.trainers,
            summary.ranked_trainers,
            summary.dataloaders,
            summary.nodes
        ),
        (160, 160, 40, 40)
    );
    assert_eq!(summary.oldest_heartbeat_ms, 500);
    assert_eq!(job_status(&state, 1_500, 0).members.len(), 200, "0: all");
}

#[test]
fn one_nodes_members_alone() {
    let state = running_job(40);
    let status = node_status(&state, 1_500, "node-017");
    let names: Vec<(String, i32, u32)> = status
        .members
        .iter()
        .map(|m| {
            let id = m.id.clone().unwrap();
            (id.node, id.role, id.local_index)
        })
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.iter().all(|(node, _, _)| node == "node-017"));
    assert!(status.summary.is_none());
    assert!(node_status(&state, 1_500, "node-999").members.is_empty());
}
