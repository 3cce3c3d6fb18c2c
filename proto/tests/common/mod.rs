//! The membership contract every implementation keeps, as one test body run against each
//! (`InProcessMembership` in `in_process_membership.rs`, etcd in `etcd_membership.rs`).

#![allow(dead_code)] // each test binary uses part of it

use std::collections::HashMap;
use std::time::Duration;

use longtake_proto::membership::{Membership, MembershipError, MembershipEvent};
use longtake_proto::{DeviceInfo, ModelInfo, Worker, WorkerState};
use tokio::sync::mpsc::Receiver;

/// A record with every field set, so that a field lost on the way shows.
pub fn worker(id: &str) -> Worker {
    Worker {
        id: id.into(),
        address: format!("10.0.0.7:{}", 7000 + id.len()),
        devices: vec![DeviceInfo {
            name: "cuda:0".into(),
            description: "NVIDIA H100 80GB HBM3".into(),
            memory_bytes: 80 << 30,
        }],
        memory_bytes: 512 << 30,
        labels: HashMap::from([
            ("zone".to_string(), "eu-1".to_string()),
            ("node".to_string(), format!("node-{id}")),
        ]),
        state: WorkerState::Idle as i32,
        job_id: String::new(),
        models: vec![ModelInfo {
            name: "tiny".into(),
            default_width: 64,
            default_height: 64,
            default_steps: 3,
            attention_heads: 2,
            ffn_dim: 64,
            max_prompt_tokens: 64,
            ..Default::default()
        }],
        started_at_ms: 1_700_000_000_123,
    }
}

/// Hang guard for every wait on an event: far beyond what any event here takes (the etcd lease
/// expiry included), it only turns a hang into a failure. No test asserts on how long
/// something took.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// The next event, failing the test if none comes within the [`HANG_GUARD`].
pub async fn next_event(events: &mut Receiver<MembershipEvent>) -> MembershipEvent {
    tokio::time::timeout(HANG_GUARD, events.recv())
        .await
        .unwrap_or_else(|_| panic!("hang guard ({HANG_GUARD:?}): no membership event"))
        .expect("the subscription closed")
}

/// How a registration dropped without leaving disappears.
pub enum Gone {
    /// Removed by the drop itself: unlisted and its `Left` event already sent when `drop`
    /// returns.
    AtOnce,
    /// Removed later (a lease expiring): its `Left` event comes through the watch.
    ThroughTheWatch,
}

/// Runs the contract against `membership` (which must start empty).
pub async fn membership_contract(membership: &dyn Membership, gone: Gone) {
    let mut sub = membership.subscribe().await.expect("subscribe");
    assert!(sub.workers.is_empty(), "starts empty: {:?}", sub.workers);

    // Registered out of order: listed sorted by id, every field intact.
    let w2 = membership
        .register(worker("w2"))
        .await
        .expect("register w2");
    assert_eq!(membership.list().await.unwrap(), vec![worker("w2")]);
    let w1 = membership
        .register(worker("w1"))
        .await
        .expect("register w1");
    assert_eq!(
        membership.list().await.unwrap(),
        vec![worker("w1"), worker("w2")]
    );
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(worker("w2"))
    );
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(worker("w1"))
    );

    // A live id is refused, and the live record is untouched by the attempt.
    let mut impostor = worker("w1");
    impostor.address = "10.9.9.9:1".into();
    match membership.register(impostor).await {
        Err(MembershipError::DuplicateId(id)) => assert_eq!(id, "w1"),
        Err(e) => panic!("duplicate id gave {e}"),
        Ok(_) => panic!("a duplicate id was accepted"),
    }
    assert_eq!(membership.list().await.unwrap()[0], worker("w1"));

    // An update replaces the record (the id stays the registration's own).
    let busy = Worker {
        id: "ignored".into(),
        state: WorkerState::Busy as i32,
        job_id: "j-42".into(),
        ..worker("w2")
    };
    w2.update(busy.clone()).await.expect("update");
    let busy = Worker {
        id: "w2".into(),
        ..busy
    };
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(busy.clone())
    );
    assert_eq!(membership.list().await.unwrap()[1], busy);

    // A late subscriber starts from the current records.
    let late = membership.subscribe().await.expect("second subscribe");
    assert_eq!(late.workers, vec![worker("w1"), busy.clone()]);

    // Leaving removes the record at once.
    w1.leave().await.expect("leave");
    assert_eq!(membership.list().await.unwrap(), vec![busy]);
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Left("w1".into())
    );

    // The id is free again once left.
    let again = membership
        .register(worker("w1"))
        .await
        .expect("re-register w1");
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(worker("w1"))
    );
    again.leave().await.unwrap();
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Left("w1".into())
    );

    // Dropped without leaving (what a killed worker looks like): gone, as the implementation
    // says it goes.
    drop(w2);
    match gone {
        Gone::AtOnce => {
            assert!(membership.list().await.unwrap().is_empty());
            assert_eq!(
                sub.events.try_recv().ok(),
                Some(MembershipEvent::Left("w2".into())),
                "the drop sent no `Left` event"
            );
        }
        Gone::ThroughTheWatch => {
            assert_eq!(
                next_event(&mut sub.events).await,
                MembershipEvent::Left("w2".into())
            );
            assert!(membership.list().await.unwrap().is_empty());
        }
    }
}
