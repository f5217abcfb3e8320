//! Shard placement as the coordinator's rules apply it: the first dataloader's report fixes
//! the dataset, a dataloader that goes away hands its shards to the survivors, one that
//! comes back takes a share again, and status shows it — on hand-built states and virtual
//! time.

use lillm_coordinator::{
    decide, job_status, DatasetShards, Event, JobConfig, MemberId, Refusal, Role, State,
};

fn job(dataloaders: usize) -> State {
    State::new(JobConfig {
        nodes: 4,
        trainers: 1,
        dataloaders,
        job_token: String::new(),
        heartbeat_timeout_ms: 5_000,
        store_port: 29500,
        min_nodes: None,
        elastic_grace_ms: 30_000,
    })
}

fn loader(node: usize) -> MemberId {
    MemberId {
        node: format!("node-{node}"),
        role: Role::Dataloader,
        local_index: 0,
    }
}

fn dataset(fingerprint: &str) -> DatasetShards {
    DatasetShards {
        fingerprint: fingerprint.into(),
        shard_tokens: (0..12).map(|i| 1_000 + 100 * i).collect(),
    }
}

fn register(id: &MemberId, data: Option<DatasetShards>) -> Event {
    Event::Register {
        id: id.clone(),
        address: format!("10.0.0.{}:7000", id.node.len()),
        config_fingerprint: String::new(),
        generation: None,
        grad_accum: None,
        dataset: data,
    }
}

fn apply(now: u64, state: &State, event: Event) -> State {
    let d = decide(now, state, event);
    assert!(d.refusal.is_none(), "{}", d.reason);
    d.state
}

/// Three dataloaders registered with the same dataset.
fn three_loaders() -> State {
    (0..3).fold(job(3), |s, n| {
        apply(0, &s, register(&loader(n), Some(dataset("data-a"))))
    })
}

/// Shard → holders, for every shard.
fn holders(state: &State) -> Vec<Vec<u32>> {
    let p = state.placement.as_ref().expect("placed");
    (0..p.shards()).map(|s| p.holders(s).to_vec()).collect()
}

#[test]
fn the_first_report_places_every_shard_twice_over_the_jobs_dataloaders() {
    let first = apply(0, &job(3), register(&loader(0), Some(dataset("data-a"))));
    // Placed over the three indices the job expects, before the others arrive.
    let placed = holders(&first);
    assert_eq!(placed.len(), 12);
    assert!(placed.iter().all(|h| h.len() == 2 && h[0] != h[1]));
    assert!((0..3).all(|i| !first.shards_of(i).is_empty()));
    // The others find their shards where they were: registering moves nothing.
    let all = three_loaders();
    assert_eq!(holders(&all), placed);
    assert_eq!(all.placement.as_ref().unwrap().version(), 1);
}

#[test]
fn a_dataloader_with_another_dataset_is_refused_and_changes_nothing() {
    let state = three_loaders();
    let left = apply(1, &state, leave(&loader(2)));
    let d = decide(2, &left, register(&loader(2), Some(dataset("data-b"))));
    assert!(
        matches!(d.refusal, Some(Refusal::DatasetMismatch { .. })),
        "{}",
        d.reason
    );
    assert!(
        d.reason.contains("data-a") && d.reason.contains("--data"),
        "{}",
        d.reason
    );
    assert_eq!(d.state, left);
}

fn leave(id: &MemberId) -> Event {
    Event::Leave {
        id: id.clone(),
        reason: "shut down".into(),
        finished: false,
    }
}

#[test]
fn a_silent_dataloaders_shards_go_to_the_survivors_and_come_back_with_it() {
    let state = three_loaders();
    let before = holders(&state);
    // Dataloader 1 stops heartbeating: after the timeout the tick evicts it.
    let mut alive = state.clone();
    for n in [0, 2] {
        alive = apply(
            4_000,
            &alive,
            Event::Heartbeat {
                id: loader(n),
                generation: 0,
                step: 0,
                loss: None,
                tokens_per_s: None,
                mfu: None,
                epochs: None,
            },
        );
    }
    let d = decide(6_000, &alive, Event::Tick);
    assert!(d.reason.contains("shards move"), "{}", d.reason);
    let after = holders(&d.state);
    for (s, (was, now)) in before.iter().zip(&after).enumerate() {
        assert_eq!(now.len(), 2, "shard {s} keeps two copies");
        assert!(
            !now.contains(&1),
            "shard {s} is not left on the departed dataloader"
        );
        for h in was.iter().filter(|&&h| h != 1) {
            assert!(
                now.contains(h),
                "shard {s}: a survivor's copy stays ({was:?} -> {now:?})"
            );
        }
    }
    assert!(d.state.shards_of(1).is_empty());
    let version = d.state.placement.as_ref().unwrap().version();
    assert_eq!(version, 2);

    // A dataloader registers at the empty index: it takes a share back.
    let back = apply(
        7_000,
        &d.state,
        register(&loader(1), Some(dataset("data-a"))),
    );
    assert!(!back.shards_of(1).is_empty());
    assert_eq!(back.placement.as_ref().unwrap().version(), 3);
    assert!(holders(&back).iter().all(|h| h.len() == 2));
}

#[test]
fn a_dataloader_leaving_on_purpose_hands_its_shards_over_at_once() {
    let state = three_loaders();
    let d = decide(1, &state, leave(&loader(0)));
    assert!(d.reason.contains("shards move"), "{}", d.reason);
    assert!(d.state.shards_of(0).is_empty());
    assert!(holders(&d.state)
        .iter()
        .all(|h| h.len() == 2 && !h.contains(&0)));
}

#[test]
fn status_lists_each_dataloaders_shards_and_tokens() {
    let state = three_loaders();
    let status = job_status(&state, 0, 0);
    assert_eq!(status.placement.len(), 3);
    let tokens: u64 = status.placement.iter().map(|d| d.tokens).sum();
    let total: u64 = dataset("data-a").shard_tokens.iter().sum();
    assert_eq!(tokens, 2 * total, "two copies of every token");
    for d in &status.placement {
        assert!(!d.address.is_empty());
        assert_eq!(d.shards as usize, d.first_shards.len());
        let expected: Vec<u32> = state
            .shards_of(d.dataloader_index as usize)
            .into_iter()
            .map(|s| s as u32)
            .collect();
        assert_eq!(d.first_shards, expected);
    }
}

#[test]
fn placement_survives_a_save_and_load() {
    let state = three_loaders();
    let text = serde_json::to_string(&state).unwrap();
    let loaded: State = serde_json::from_str(&text).unwrap();
    assert_eq!(loaded, state);
}
