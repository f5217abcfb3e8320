//! The coordinator's rules on hand-built states and virtual time.

use lillm_coordinator::{decide, Action, Event, JobConfig, MemberId, Phase, Refusal, Role, State};

fn job() -> State {
    State::new(JobConfig {
        trainers: 2,
        dataloaders: 1,
        job_token: "s3cret".into(),
        config_fingerprint: "cfg-1".into(),
        heartbeat_timeout_ms: 5_000,
        store_port: 29500,
    })
}

fn id(node: &str, role: Role, local_index: usize) -> MemberId {
    MemberId {
        node: node.into(),
        role,
        local_index,
    }
}

fn register(id: &MemberId, generation: Option<u64>) -> Event {
    Event::Register {
        id: id.clone(),
        address: format!("10.0.0.{}:7000", id.node.len()),
        job_token: "s3cret".into(),
        config_fingerprint: "cfg-1".into(),
        generation,
    }
}

fn heartbeat(id: &MemberId, generation: u64, step: u64) -> Event {
    Event::Heartbeat {
        id: id.clone(),
        generation,
        step,
        loss: Some(2.5),
        tokens_per_s: Some(1e4),
    }
}

/// Registers the members in order and returns the state and the last decision's actions.
fn gather(ids: &[MemberId]) -> (State, Vec<Action>) {
    let mut state = job();
    let mut actions = Vec::new();
    for (t, m) in ids.iter().enumerate() {
        let d = decide(t as u64, &state, register(m, None));
        assert!(d.refusal.is_none(), "{}", d.reason);
        state = d.state;
        actions = d.actions;
    }
    (state, actions)
}

fn members() -> Vec<MemberId> {
    vec![
        id("node-b", Role::Trainer, 0),
        id("node-a", Role::Dataloader, 0),
        id("node-a", Role::Trainer, 0),
    ]
}

#[test]
fn ranks_are_assigned_once_everyone_is_present_whatever_the_order() {
    let (state, actions) = gather(&members());
    assert_eq!(state.phase, Phase::Running);
    assert_eq!(state.generation, 1);
    let Action::StartGeneration {
        generation,
        ranks,
        store,
        prefix,
        resume_step,
    } = &actions[0]
    else {
        panic!("{actions:?}")
    };
    assert_eq!(*generation, 1);
    assert_eq!(prefix, "lillm/gen1");
    assert_eq!(*resume_step, 0);
    assert!(ranks.contains(&(id("node-a", Role::Trainer, 0), 0)));
    assert!(ranks.contains(&(id("node-b", Role::Trainer, 0), 1)));
    assert!(ranks.contains(&(id("node-a", Role::Dataloader, 0), 0)));
    assert_eq!(store, "10.0.0.6:29500", "the store lives with rank 0");

    let ranks_of = |s: &State| -> Vec<(MemberId, Option<usize>)> {
        s.members.values().map(|m| (m.id.clone(), m.rank)).collect()
    };
    let mut reversed = members();
    reversed.reverse();
    let (again, _) = gather(&reversed);
    assert_eq!(
        ranks_of(&again),
        ranks_of(&state),
        "registration order does not matter"
    );

    // Before the last member arrives nothing starts.
    let (partial, actions) = gather(&members()[..2]);
    assert_eq!(partial.phase, Phase::Gathering);
    assert!(actions.is_empty());
}

#[test]
fn bad_registrations_are_refused_and_change_nothing() {
    let (state, _) = gather(&members());
    let mut bad_token = register(&id("node-c", Role::Trainer, 0), None);
    if let Event::Register { job_token, .. } = &mut bad_token {
        *job_token = "guess".into();
    }
    let d = decide(10, &state, bad_token);
    assert_eq!(d.refusal, Some(Refusal::BadToken));
    assert_eq!(d.state, state);

    let mut other_config = register(&id("node-c", Role::Trainer, 0), None);
    if let Event::Register {
        config_fingerprint, ..
    } = &mut other_config
    {
        *config_fingerprint = "cfg-2".into();
    }
    let d = decide(10, &state, other_config);
    assert!(matches!(d.refusal, Some(Refusal::ConfigMismatch { .. })));
    assert!(d.reason.contains("cfg-2"));

    let d = decide(10, &state, register(&id("node-c", Role::Trainer, 0), None));
    assert_eq!(
        d.refusal,
        Some(Refusal::Full {
            role: Role::Trainer,
            expected: 2
        })
    );
    assert!(d.reason.contains("raise --nodes"));
    assert_eq!(d.state, state);
}

#[test]
fn a_silent_member_is_evicted_and_its_old_generation_is_fenced_off() {
    let (mut state, _) = gather(&members());
    let leader = id("node-a", Role::Trainer, 0);
    let follower = id("node-b", Role::Trainer, 0);
    let loader = id("node-a", Role::Dataloader, 0);
    // Heartbeats keep everyone alive; rank 0 commits step 200.
    for m in [&leader, &follower, &loader] {
        state = decide(3_000, &state, heartbeat(m, 1, 200)).state;
    }
    let d = decide(
        3_100,
        &state,
        Event::Commit {
            id: leader.clone(),
            generation: 1,
            step: 200,
            path: "ckpt/step-200".into(),
            val_loss: Some(3.0),
        },
    );
    assert!(matches!(d.actions[..], [Action::Committed(_)]));
    state = d.state;
    let d = decide(
        3_200,
        &state,
        Event::Commit {
            id: follower.clone(),
            generation: 1,
            step: 300,
            path: "x".into(),
            val_loss: None,
        },
    );
    assert_eq!(d.refusal, Some(Refusal::NotLeader(follower.clone())));

    // The follower goes silent; at 8.5 s (5 s after its last heartbeat) it is evicted.
    state = decide(6_000, &state, heartbeat(&leader, 1, 250)).state;
    state = decide(6_000, &state, heartbeat(&loader, 1, 250)).state;
    assert!(decide(7_000, &state, Event::Tick).actions.is_empty());
    let d = decide(8_500, &state, Event::Tick);
    assert_eq!(d.actions, vec![Action::Evicted(vec![follower.clone()])]);
    state = d.state;
    assert_eq!(
        (state.generation, state.phase.clone(), state.failures),
        (2, Phase::Gathering, 1)
    );

    // The old group can no longer commit or heartbeat: its generation is over.
    let d = decide(
        8_600,
        &state,
        Event::Commit {
            id: leader.clone(),
            generation: 1,
            step: 300,
            path: "late".into(),
            val_loss: None,
        },
    );
    assert_eq!(
        d.refusal,
        Some(Refusal::StaleGeneration {
            given: 1,
            current: 2
        })
    );
    assert_eq!(state.last_commit.as_ref().unwrap().step, 200);
    assert!(matches!(
        decide(8_600, &state, heartbeat(&leader, 1, 300)).refusal,
        Some(Refusal::StaleGeneration { .. })
    ));

    // A replacement registers; the new generation resumes from the last commit.
    let d = decide(9_000, &state, register(&follower, None));
    let Action::StartGeneration {
        generation,
        resume_step,
        prefix,
        ..
    } = &d.actions[0]
    else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(
        (*generation, *resume_step, prefix.as_str()),
        (3, 200, "lillm/gen3")
    );
    state = d.state;
    // A survivor re-registering with its old generation just catches up: no new group.
    let d = decide(9_100, &state, register(&leader, Some(2)));
    assert!(d.actions.is_empty());
    assert_eq!(d.state.generation, 3);
    // A commit must move forward.
    let d = decide(
        9_200,
        &d.state,
        Event::Commit {
            id: leader.clone(),
            generation: 3,
            step: 200,
            path: "again".into(),
            val_loss: None,
        },
    );
    assert_eq!(
        d.refusal,
        Some(Refusal::StepRegress {
            given: 200,
            committed: 200
        })
    );
}

#[test]
fn a_restarted_process_makes_the_group_reform() {
    let (state, _) = gather(&members());
    let d = decide(
        1_000,
        &state,
        register(&id("node-b", Role::Trainer, 0), None),
    );
    assert_eq!(d.state.failures, 1);
    assert_eq!(d.state.generation, 2);
    assert!(matches!(
        d.actions[..],
        [Action::StartGeneration { generation: 2, .. }]
    ));
}
