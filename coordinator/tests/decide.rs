//! The coordinator's rules on hand-built states and virtual time.

use std::collections::BTreeMap;

use lillm_coordinator::{
    authorize, decide, heartbeat_interval_ms, Action, Event, Group, JobConfig, MemberId, Phase,
    Refusal, Role, State, HEARTBEATS_PER_SECOND,
};

fn job() -> State {
    State::new(JobConfig {
        nodes: 2,
        trainers: 2,
        dataloaders: 1,
        job_token: "s3cret".into(),
        heartbeat_timeout_ms: 5_000,
        store_port: 29500,
        min_nodes: None,
        elastic_grace_ms: 30_000,
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
        config_fingerprint: "cfg-1".into(),
        generation,
        grad_accum: Some(2),
        dataset: None,
    }
}

fn heartbeat(id: &MemberId, generation: u64, step: u64) -> Event {
    Event::Heartbeat {
        id: id.clone(),
        generation,
        step,
        loss: Some(2.5),
        tokens_per_s: Some(1e4),
        mfu: None,
        epochs: None,
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

/// The state after both checkpoint writers of generation 1 (node a's and node b's trainer)
/// committed `step` at `path`.
fn committed_by_both(state: &State, step: u64, path: &str) -> State {
    let mut state = state.clone();
    for node in ["node-a", "node-b"] {
        let d = decide(
            100,
            &state,
            Event::Commit {
                id: id(node, Role::Trainer, 0),
                generation: 1,
                step,
                path: path.into(),
                val_loss: Some(4.0),
            },
        );
        assert!(d.refusal.is_none(), "{}", d.reason);
        state = d.state;
    }
    assert_eq!(state.resume_point(), (step, Some(path)));
    state
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
    assert_eq!(ranks.len(), 2, "ranks are for trainers: {ranks:?}");
    assert_eq!(
        store, "10.0.0.6:7000",
        "the store lives with rank 0, on the port its process serves it"
    );
    assert_eq!(
        lillm_coordinator::store_of("10.0.0.6", 29500),
        ("10.0.0.6".to_string(), 29500),
        "a trainer that sends only its host serves the job's store port"
    );

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
    assert_eq!(authorize(&state.config, "guess"), Err(Refusal::BadToken));
    assert_eq!(authorize(&state.config, "s3cret"), Ok(()));
    assert!(Refusal::BadToken.to_string().contains("--job-token"));

    let mut other_config = register(&id("node-c", Role::Trainer, 0), None);
    if let Event::Register {
        config_fingerprint, ..
    } = &mut other_config
    {
        *config_fingerprint = "cfg-2".into();
    }
    let d = decide(10, &state, other_config);
    assert!(matches!(d.refusal, Some(Refusal::ConfigMismatch { .. })));
    assert!(d.reason.contains("cfg-2") && d.reason.contains("cfg-1"));

    let d = decide(10, &state, register(&id("node-a", Role::Trainer, 1), None));
    assert_eq!(
        d.refusal,
        Some(Refusal::Full {
            role: Role::Trainer,
            expected: 2
        })
    );
    assert!(d.reason.contains("raise the coordinator's --nodes"));
    assert_eq!(d.state, state);

    // A third machine is refused even for a role with room left.
    let (partial, _) = gather(&members()[..1]);
    let (partial, _) = (
        decide(
            5,
            &partial,
            register(&id("node-a", Role::Dataloader, 0), None),
        )
        .state,
        (),
    );
    let d = decide(
        10,
        &partial,
        register(&id("node-c", Role::Trainer, 0), None),
    );
    assert!(
        matches!(d.refusal, Some(Refusal::TooManyNodes { .. })),
        "{}",
        d.reason
    );
    assert_eq!(d.state, partial);
}

#[test]
fn the_first_member_pins_the_config_fingerprint() {
    let state = job();
    assert_eq!(state.config_fingerprint, None);
    let d = decide(
        0,
        &state,
        register(&id("node-a", Role::Dataloader, 0), None),
    );
    assert_eq!(
        d.state.config_fingerprint, None,
        "dataloaders run any config"
    );
    let d = decide(0, &d.state, register(&id("node-a", Role::Trainer, 0), None));
    assert_eq!(d.state.config_fingerprint.as_deref(), Some("cfg-1"));
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
    let commit = |generation, step, path: &str, who: &MemberId| Event::Commit {
        id: who.clone(),
        generation,
        step,
        path: path.into(),
        val_loss: None,
    };
    // Rank 0 and the first rank on the other node each write a copy: the checkpoint is
    // durable when both are reported.
    let d = decide(3_100, &state, commit(1, 200, "ckpt/step-200", &leader));
    assert!(
        d.actions.is_empty(),
        "one copy is not durable: {}",
        d.reason
    );
    assert_eq!(d.state.last_commit, None);
    let d = decide(3_150, &d.state, commit(1, 200, "b/step-200", &follower));
    let [Action::Committed(c)] = &d.actions[..] else {
        panic!("{:?}", d.actions)
    };
    assert_eq!(
        c.copies,
        BTreeMap::from([
            ("node-a".to_string(), "ckpt/step-200".to_string()),
            ("node-b".to_string(), "b/step-200".to_string())
        ])
    );
    state = d.state;
    assert_eq!(state.resume_copy_on("node-b"), Some("b/step-200"));
    assert_eq!(
        state.resume_copy_on("node-c"),
        Some("ckpt/step-200"),
        "a node without a copy looks where rank 0 wrote it (a shared volume)"
    );
    let d = decide(3_200, &state, commit(1, 300, "x", &loader));
    assert_eq!(d.refusal, Some(Refusal::NotLeader(loader.clone())));

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
    let d = decide(8_600, &state, commit(1, 300, "late", &leader));
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

    // A replacement registers; nothing starts until the survivor has registered again.
    let d = decide(9_000, &state, register(&follower, None));
    assert!(d.actions.is_empty());
    state = d.state;
    let d = decide(9_100, &state, register(&leader, Some(1)));
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
    assert_eq!(d.state.failures, 1, "a survivor catching up is no failure");
    // A retry of the last commit (its reply was lost) is accepted and changes nothing.
    let retry = decide(9_150, &d.state, commit(3, 200, "ckpt/step-200", &leader));
    assert!(
        retry.refusal.is_none() && retry.actions.is_empty(),
        "{}",
        retry.reason
    );
    assert_eq!(retry.state, d.state);
    // Otherwise a commit must move forward.
    let d = decide(9_200, &d.state, commit(3, 200, "again", &leader));
    assert_eq!(
        d.refusal,
        Some(Refusal::StepRegress {
            given: 200,
            committed: 200
        })
    );
}

#[test]
fn after_a_full_stop_the_restarted_processes_form_one_new_generation() {
    let (mut state, _) = gather(&members());
    state = committed_by_both(&state, 40, "run/step-00000040");
    // Every process is killed and started again, in any order.
    let mut starts = Vec::new();
    for (t, m) in members().iter().rev().enumerate() {
        let d = decide(1_000 + t as u64, &state, register(m, None));
        assert!(d.refusal.is_none(), "{}", d.reason);
        starts.extend(d.actions);
        state = d.state;
    }
    assert_eq!(starts.len(), 1, "exactly one group forms: {starts:?}");
    let Action::StartGeneration {
        generation,
        resume_step,
        ..
    } = &starts[0]
    else {
        panic!("{starts:?}")
    };
    assert_eq!((*generation, *resume_step), (3, 40));
    assert_eq!(state.resume_point(), (40, Some("run/step-00000040")));
    assert_eq!(state.failures, 3);
}

#[test]
fn a_restarted_dataloader_keeps_its_index_and_the_generation() {
    let (state, _) = gather(&members());
    let loader = id("node-a", Role::Dataloader, 0);
    let d = decide(1_000, &state, register(&loader, None));
    assert!(d.actions.is_empty());
    assert_eq!(d.state.generation, 1);
    assert_eq!(d.state.phase, Phase::Running);
    assert_eq!(d.state.members[&loader].rank, Some(0));
    assert_eq!(d.state.failures, 1);
    // Trainers are paired with the dataloader on their node, else round-robin.
    let trainer_b = &d.state.members[&id("node-b", Role::Trainer, 0)];
    assert_eq!(trainer_b.dataloader, Some(0));
}

#[test]
fn a_restarted_trainer_ends_the_generation_until_all_trainers_register_again() {
    let (state, _) = gather(&members());
    let d = decide(
        1_000,
        &state,
        register(&id("node-b", Role::Trainer, 0), None),
    );
    assert_eq!(d.state.failures, 1);
    assert_eq!(d.state.generation, 2);
    assert_eq!(d.state.phase, Phase::Gathering);
    assert!(d.actions.is_empty());
    let d = decide(
        1_100,
        &d.state,
        register(&id("node-a", Role::Trainer, 0), Some(1)),
    );
    assert_eq!(
        d.state.failures, 1,
        "a survivor rejoining from its process is not a failure"
    );
    assert!(matches!(
        d.actions[..],
        [Action::StartGeneration { generation: 3, .. }]
    ));
}

#[test]
fn the_state_survives_a_save_and_load() {
    let (state, _) = gather(&members());
    let dir = tempfile::tempdir().unwrap();
    let store = lillm_coordinator::StateStore::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap(), None);
    store.save(&state).unwrap();
    drop(store);
    let again = lillm_coordinator::StateStore::open(dir.path()).unwrap();
    assert_eq!(again.load().unwrap(), Some(state));
}

#[test]
fn a_job_restarted_as_a_new_group_accepts_a_changed_config_and_keeps_its_commit() {
    let (mut state, _) = gather(&members());
    state = committed_by_both(&state, 40, "run/step-00000040");
    let fresh = state.without_members();
    assert!(fresh.members.is_empty());
    assert_eq!(fresh.phase, Phase::Gathering);
    assert!(fresh.generation > state.generation);
    let mut other_config = register(&id("node-a", Role::Trainer, 0), None);
    if let Event::Register {
        config_fingerprint, ..
    } = &mut other_config
    {
        *config_fingerprint = "cfg-2".into();
    }
    let d = decide(200, &fresh, other_config);
    assert!(d.refusal.is_none(), "{}", d.reason);
    assert_eq!(d.state.config_fingerprint.as_deref(), Some("cfg-2"));
    assert_eq!(d.state.resume_point(), (40, Some("run/step-00000040")));
}

fn leave(id: &MemberId, finished: bool) -> Event {
    Event::Leave {
        id: id.clone(),
        reason: "test".into(),
        finished,
    }
}

#[test]
fn a_trainer_leaving_on_purpose_ends_the_generation_at_once_without_a_failure() {
    let (state, _) = gather(&members());
    let trainer = id("node-b", Role::Trainer, 0);
    let d = decide(100, &state, leave(&trainer, false));
    assert!(d.refusal.is_none(), "{}", d.reason);
    assert_eq!(d.state.phase, Phase::Gathering);
    assert_eq!(d.state.generation, state.generation + 1);
    assert_eq!(d.state.failures, state.failures, "leaving is not a failure");
    assert!(!d.state.members.contains_key(&trainer));
    // Its peer learns at its next heartbeat that its generation is over.
    let peer = id("node-a", Role::Trainer, 0);
    let beat = decide(200, &d.state, heartbeat(&peer, state.generation, 5));
    assert!(
        matches!(beat.refusal, Some(Refusal::StaleGeneration { .. })),
        "{}",
        beat.reason
    );
}

/// After a regroup a trainer finishes the step it is in before registering again; with
/// steps of several seconds that outlasts the heartbeat timeout. Its heartbeats, refused as
/// stale, still prove it alive: it is not evicted (no failure, no cascade), while a trainer
/// that sends nothing is.
#[test]
fn a_trainer_finishing_a_long_step_after_a_regroup_is_not_evicted() {
    let (state, _) = gather(&members());
    let ended = decide(1_000, &state, leave(&id("node-b", Role::Trainer, 0), false)).state;
    let survivor = id("node-a", Role::Trainer, 0);
    let loader = id("node-a", Role::Dataloader, 0);
    let mut with_beats = ended.clone();
    for t in [3_000, 6_000, 9_000] {
        let d = decide(t, &with_beats, heartbeat(&survivor, state.generation, 7));
        assert!(matches!(d.refusal, Some(Refusal::StaleGeneration { .. })));
        with_beats = decide(t, &d.state, heartbeat(&loader, ended.generation, 0)).state;
    }
    let d = decide(10_000, &with_beats, Event::Tick);
    assert!(d.actions.is_empty(), "{}", d.reason);
    assert_eq!(d.state.failures, state.failures);
    assert!(d.state.members.contains_key(&survivor));
    let registered = decide(
        10_500,
        &d.state,
        register(&survivor, Some(state.generation)),
    );
    assert!(registered.refusal.is_none(), "{}", registered.reason);

    // Silence for longer than the timeout is a failure, as before.
    let mut silent = ended;
    for t in [3_000, 6_000, 9_000] {
        silent = decide(t, &silent, heartbeat(&loader, silent.generation, 0)).state;
    }
    let d = decide(10_000, &silent, Event::Tick);
    assert_eq!(d.actions, vec![Action::Evicted(vec![survivor])]);
}

#[test]
fn a_finished_trainer_stays_listed_and_is_never_evicted() {
    let (state, _) = gather(&members());
    let done = id("node-b", Role::Trainer, 0);
    let d = decide(100, &state, leave(&done, true));
    assert_eq!(
        d.state.phase,
        Phase::Running,
        "the others may still be finishing"
    );
    assert_eq!(d.state.generation, state.generation);
    assert!(d.state.members[&done].finished);
    // Long past the heartbeat timeout, only the silent unfinished members are evicted.
    let tick = decide(60_000, &d.state, Event::Tick);
    assert!(tick.state.members.contains_key(&done), "{}", tick.reason);
    assert!(!tick
        .state
        .members
        .contains_key(&id("node-a", Role::Trainer, 0)));
}

/// A job of two nodes that goes on with one after a grace of 10 s; its trainers on node a
/// and node b, and node a's dataloader.
fn elastic_job(heartbeat_timeout_ms: u64) -> (State, [MemberId; 3]) {
    let mut state = job();
    state.config.min_nodes = Some(1);
    state.config.elastic_grace_ms = 10_000;
    state.config.heartbeat_timeout_ms = heartbeat_timeout_ms;
    let members = [
        id("node-a", Role::Trainer, 0),
        id("node-b", Role::Trainer, 0),
        id("node-a", Role::Dataloader, 0),
    ];
    (state, members)
}

#[test]
fn an_elastic_job_forms_without_a_node_that_stays_away_and_grows_back() {
    let (mut s, [a, b, loader]) = elastic_job(60_000);
    for (t, member) in [(0, &loader), (10, &a)] {
        s = decide(t, &s, register(member, None)).state;
    }
    // Gathering is noticed, then nothing starts before the grace period has passed.
    s = decide(1_000, &s, Event::Tick).state;
    let early = decide(5_000, &s, Event::Tick);
    assert!(early.actions.is_empty());
    let late = decide(11_500, &early.state, Event::Tick);
    assert!(
        matches!(late.actions[..], [Action::StartGeneration { ref ranks, .. }] if ranks.len() == 1),
        "{}",
        late.reason
    );
    assert!(
        late.reason.contains("elastic: 1 of 2 trainers"),
        "{}",
        late.reason
    );
    // The missing node returns: the generation ends and, everyone present, one of 2 forms.
    let back = decide(12_000, &late.state, register(&b, None));
    assert_eq!(back.state.phase, Phase::Gathering);
    let again = decide(
        12_100,
        &back.state,
        register(&a, Some(late.state.generation)),
    );
    assert!(
        matches!(again.actions[..], [Action::StartGeneration { ref ranks, .. }] if ranks.len() == 2),
        "{}",
        again.reason
    );
    // A restarts: B is alive but still finishing its step when the grace has passed. No
    // group forms without it (it holds the job's newest state) until it registers again.
    let restarted = decide(13_000, &again.state, register(&a, None));
    let mut s = decide(13_100, &restarted.state, Event::Tick).state;
    let waiting = decide(30_000, &s, Event::Tick);
    assert!(waiting.actions.is_empty(), "{}", waiting.reason);
    s = waiting.state;
    let both = decide(30_100, &s, register(&b, Some(again.state.generation)));
    assert!(
        matches!(both.actions[..], [Action::StartGeneration { ref ranks, .. }] if ranks.len() == 2),
        "{}",
        both.reason
    );
}

#[test]
fn an_elastic_grace_counts_from_the_first_trainer_not_from_the_coordinators_start() {
    let (mut s, [a, b, loader]) = elastic_job(600_000);
    s = decide(0, &s, register(&loader, None)).state;
    // The coordinator ticks for a minute before any trainer comes (pods pulling images).
    for t in (1_000..=60_000).step_by(1_000) {
        s = decide(t, &s, Event::Tick).state;
    }
    s = decide(60_100, &s, register(&a, None)).state;
    let first_tick = decide(60_500, &s, Event::Tick);
    assert!(first_tick.actions.is_empty(), "{}", first_tick.reason);
    // B arrives within the grace of A's arrival: one generation of both, none of A alone.
    let both = decide(65_000, &first_tick.state, register(&b, None));
    assert!(
        matches!(both.actions[..], [Action::StartGeneration { ref ranks, .. }] if ranks.len() == 2),
        "{}",
        both.reason
    );
    assert_eq!(both.state.generation, 1);
}

#[test]
fn an_elastic_job_never_forms_a_group_that_cannot_divide_the_step() {
    let mut state = job();
    state.config.trainers = 4;
    state.config.nodes = 4;
    state.config.min_nodes = Some(1);
    state.config.elastic_grace_ms = 0;
    state.config.heartbeat_timeout_ms = 60_000;
    let loader = id("node-a", Role::Dataloader, 0);
    let nodes = ["node-a", "node-b", "node-c", "node-d"];
    let mut s = decide(0, &state, register(&loader, None)).state;
    for node in nodes {
        s = decide(1, &s, register(&id(node, Role::Trainer, 0), None)).state;
    }
    assert_eq!(s.phase, Phase::Running);
    let leave = |node: &str| Event::Leave {
        id: id(node, Role::Trainer, 0),
        reason: "gone".into(),
        finished: false,
    };
    // Three left of four: 3 ranks cannot share grad_accum 2, so no group forms, and the
    // reason names the sizes that can.
    s = decide(2, &s, leave("node-d")).state;
    for node in &nodes[..3] {
        s = decide(3, &s, register(&id(node, Role::Trainer, 0), Some(1))).state;
    }
    s = decide(4, &s, Event::Tick).state;
    let d = decide(5, &s, Event::Tick);
    assert!(d.actions.is_empty(), "{}", d.reason);
    let why = s.elastic_start(5).unwrap_err();
    assert!(
        why.contains("3 trainers cannot divide grad_accum 2; possible sizes: [1, 2]"),
        "{why}"
    );
    // Down to two: they form a group.
    s = decide(6, &d.state, leave("node-c")).state;
    let d = decide(7, &s, Event::Tick);
    assert!(
        matches!(d.actions[..], [Action::StartGeneration { ref ranks, .. }] if ranks.len() == 2),
        "{}",
        d.reason
    );
}

/// A job whose trainers read their data themselves (SFT, DPO) has no dataloader: its first
/// generation starts once the trainers are there, and no trainer is paired with a loader.
#[test]
fn a_job_without_dataloaders_starts_with_its_trainers() {
    let mut state = job();
    state.config.dataloaders = 0;
    let trainers = [
        id("node-a", Role::Trainer, 0),
        id("node-b", Role::Trainer, 0),
    ];
    for (t, m) in trainers.iter().enumerate() {
        let d = decide(t as u64, &state, register(m, None));
        assert!(d.refusal.is_none(), "{}", d.reason);
        state = d.state;
    }
    assert_eq!(state.phase, Phase::Running);
    assert_eq!(state.generation, 1);
    for m in &trainers {
        let member = &state.members[m];
        assert!(
            member.rank.is_some() && member.dataloader.is_none(),
            "{member:?}"
        );
    }
}

/// A coordinator frozen (or its host stalled) for longer than the heartbeat timeout finds
/// every member silent when it wakes: its first tick gives them a full timeout again
/// instead of ending the generation; a member still silent a timeout later is evicted.
#[test]
fn a_coordinator_that_was_away_evicts_nobody_for_its_own_absence() {
    let (state, _) = gather(&members());
    let mut s = decide(1_000, &state, Event::Tick).state;
    // Ticks every 500 ms; then nothing for 20 s (timeout 5 s).
    s = decide(1_500, &s, Event::Tick).state;
    let woke = decide(21_500, &s, Event::Tick);
    assert!(woke.actions.is_empty(), "{}", woke.reason);
    assert!(woke.reason.contains("away for 20000 ms"), "{}", woke.reason);
    assert_eq!(woke.state.generation, state.generation);
    assert_eq!(woke.state.phase, Phase::Running);
    assert_eq!(woke.state.failures, 0);
    // Two members heartbeat after the wake-up; node-b's trainer stays silent.
    let mut s = woke.state;
    for t in (22_000..=27_000).step_by(500) {
        for m in [
            id("node-a", Role::Trainer, 0),
            id("node-a", Role::Dataloader, 0),
        ] {
            s = decide(t, &s, heartbeat(&m, state.generation, 1)).state;
        }
        let d = decide(t, &s, Event::Tick);
        if t <= 26_500 {
            assert!(d.actions.is_empty(), "at {t}: {}", d.reason);
        } else {
            assert_eq!(
                d.actions,
                vec![Action::Evicted(vec![id("node-b", Role::Trainer, 0)])]
            );
        }
        s = d.state;
    }
}

/// Every trainer's assignment from the group's shared facts: its rank and the world size,
/// the store rank 0 serves, the node's copy of the checkpoint for the first rank on each
/// node only, the two checkpoint writers, and its dataloader.
#[test]
fn assignments_name_the_node_readers_writers_and_dataloaders() {
    let mut state = job();
    state.config.trainers = 4;
    let trainers = [
        id("node-a", Role::Trainer, 0),
        id("node-a", Role::Trainer, 1),
        id("node-b", Role::Trainer, 0),
        id("node-b", Role::Trainer, 1),
    ];
    let loader = id("node-a", Role::Dataloader, 0);
    state = decide(0, &state, register(&loader, None)).state;
    // A checkpoint committed earlier, with a copy on each node.
    state.last_commit = Some(lillm_coordinator::Commit {
        step: 40,
        path: "/a/step-40".into(),
        generation: 0,
        val_loss: None,
        copies: BTreeMap::from([
            ("node-a".into(), "/a/step-40".into()),
            ("node-b".into(), "/b/step-40".into()),
        ]),
    });
    for t in &trainers {
        state = decide(1, &state, register(t, None)).state;
    }
    assert_eq!(state.phase, Phase::Running);
    let group = Group::of(&state).unwrap();
    let a: Vec<_> = trainers
        .iter()
        .map(|t| group.assignment(&state, t).unwrap())
        .collect();
    assert_eq!(
        a.iter().map(|a| a.rank).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(a.iter().all(|a| a.world_size == 4 && a.resume_step == 40));
    assert_eq!(
        (a[0].store_host.as_str(), a[0].store_port),
        ("10.0.0.6", 7000),
        "rank 0's address names the store"
    );
    assert_eq!(
        a.iter()
            .map(|a| a.resume_path.as_deref())
            .collect::<Vec<_>>(),
        vec![Some("/a/step-40"), None, Some("/b/step-40"), None]
    );
    assert_eq!(
        a.iter().map(|a| a.writes_checkpoints).collect::<Vec<_>>(),
        vec![true, false, true, false]
    );
    assert!(a
        .iter()
        .all(|a| a.dataloader == Some((0, "10.0.0.6:7000".into()))));
    // A dataloader is not a trainer, and a group that ended assigns nothing.
    assert_eq!(group.assignment(&state, &loader), None);
    let ended = decide(2, &state, leave(&trainers[3], false)).state;
    assert_eq!(group.assignment(&ended, &trainers[0]), None);
    assert!(Group::of(&ended).is_none());
}

/// Eight heartbeats per timeout in a small job; in a job of thousands the interval grows
/// so that the whole job sends at most HEARTBEATS_PER_SECOND, but never fewer than three
/// per timeout (a lost heartbeat must not look like a death).
#[test]
fn heartbeats_are_spread_out_in_a_large_job() {
    let mut config = job().config;
    assert_eq!(heartbeat_interval_ms(&config), 625);
    config.heartbeat_timeout_ms = 2_000;
    assert_eq!(heartbeat_interval_ms(&config), 250);
    config.trainers = 4_096;
    config.dataloaders = 512;
    config.heartbeat_timeout_ms = 10_000;
    let interval = heartbeat_interval_ms(&config);
    let rate = (4_096 + 512) as f64 * 1_000.0 / interval as f64;
    assert!(rate <= HEARTBEATS_PER_SECOND as f64, "{rate} per second");
    assert!(interval > 1_000, "{interval} ms");
    // A short timeout keeps three heartbeats in it, whatever the budget.
    config.heartbeat_timeout_ms = 2_000;
    assert_eq!(heartbeat_interval_ms(&config), 666);
}

#[test]
fn a_checkpoint_in_object_storage_commits_with_one_copy_and_every_node_reads_it() {
    let (mut state, _) = gather(&members());
    let leader = id("node-a", Role::Trainer, 0);
    let follower = id("node-b", Role::Trainer, 0);
    let commit = |step, path: &str, who: &MemberId| Event::Commit {
        id: who.clone(),
        generation: 1,
        step,
        path: path.into(),
        val_loss: None,
    };
    // A local copy still waits for the second node's.
    let d = decide(100, &state, commit(100, "/a/step-100", &leader));
    assert!(d.actions.is_empty(), "{}", d.reason);
    // Rank 0's upload to the bucket is durable by itself.
    let url = "s3://lillm/runs/a/checkpoints/step-00000200";
    let d = decide(200, &d.state, commit(200, url, &leader));
    let [Action::Committed(c)] = &d.actions[..] else {
        panic!("{:?}: {}", d.actions, d.reason)
    };
    assert_eq!((c.step, c.path.as_str()), (200, url));
    state = d.state;
    // The other writer's local copy arrives late and is kept as that node's copy.
    let d = decide(210, &state, commit(200, "/b/step-200", &follower));
    assert!(d.refusal.is_none(), "{}", d.reason);
    state = d.state;
    assert_eq!(state.resume_point(), (200, Some(url)));
    assert_eq!(state.resume_copy_on("node-b"), Some("/b/step-200"));
    assert_eq!(
        state.resume_copy_on("node-c"),
        Some(url),
        "a new node reads the bucket's copy"
    );
}

#[test]
fn copies_that_never_come_keep_only_the_latest_steps_waiting() {
    let (mut state, _) = gather(&members());
    // Node b's writer is gone: only rank 0's copies come, and no step is durable.
    for step in 1..=10 {
        let d = decide(
            100 + step,
            &state,
            Event::Commit {
                id: id("node-a", Role::Trainer, 0),
                generation: 1,
                step: step * 100,
                path: format!("ckpt/step-{step}"),
                val_loss: None,
            },
        );
        assert!(d.actions.is_empty() && d.refusal.is_none(), "{}", d.reason);
        state = d.state;
    }
    let waiting: Vec<u64> = state.pending_commits.iter().map(|c| c.step).collect();
    assert_eq!(waiting, [700, 800, 900, 1000]);
    // The second copy of a step still waiting commits it and drops the older ones.
    let d = decide(
        200,
        &state,
        Event::Commit {
            id: id("node-b", Role::Trainer, 0),
            generation: 1,
            step: 900,
            path: "b/step-9".into(),
            val_loss: None,
        },
    );
    assert!(matches!(&d.actions[..], [Action::Committed(c)] if c.step == 900));
    let waiting: Vec<u64> = d.state.pending_commits.iter().map(|c| c.step).collect();
    assert_eq!(waiting, [1000]);
}
