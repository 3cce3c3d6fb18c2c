//! `EtcdMembership` against a real etcd (`EtcdServer`, Debian's etcd on loopback ports): the
//! shared contract, lease expiry of a dropped registration, connect failures, re-registration
//! after a lost lease, and records that are not workers.

mod common;

use std::time::Duration;

use common::{next_event, worker};
use longtake_proto::membership::testing::EtcdServer;
use longtake_proto::membership::{
    EtcdConfig, EtcdMembership, Membership, MembershipError, MembershipEvent,
};
use longtake_proto::WorkerState;

fn config(server: &EtcdServer, ttl_s: i64) -> EtcdConfig {
    EtcdConfig {
        lease_ttl_s: ttl_s,
        ..EtcdConfig::new(vec![server.url().to_string()])
    }
}

#[tokio::test]
async fn etcd_membership_keeps_the_contract_and_expires_dropped_registrations() {
    let server = EtcdServer::start();
    // etcd raises a lease below its minimum (about 2 s with default timings) to that minimum.
    let ttl_s = 2;
    let membership = EtcdMembership::connect(config(&server, ttl_s))
        .await
        .unwrap();
    // The dropped registration's `Left` comes through the watch when its lease expires.
    common::membership_contract(&membership, common::Gone::ThroughTheWatch).await;
}

#[tokio::test]
async fn connecting_where_nothing_listens_fails_fast_naming_the_url() {
    let port = longtake_proto::membership::testing::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let connect = EtcdMembership::connect(EtcdConfig::new(vec![url.clone()]));
    let error = match tokio::time::timeout(common::HANG_GUARD, connect).await {
        Err(_) => panic!(
            "hang guard ({:?}): connect never returned",
            common::HANG_GUARD
        ),
        Ok(Ok(_)) => panic!("connected to a port where nothing listens"),
        Ok(Err(e)) => e,
    };
    assert!(matches!(error, MembershipError::Etcd { .. }), "{error:?}");
    assert!(error.to_string().contains(&url), "{error}");
}

#[tokio::test]
async fn a_registration_whose_lease_is_revoked_registers_again() {
    let server = EtcdServer::start();
    let config = EtcdConfig {
        prefix: "/farm-a/".into(),
        ..config(&server, 2)
    };
    let membership = EtcdMembership::connect(config).await.unwrap();
    let registration = membership.register(worker("w1")).await.unwrap();
    let mut sub = membership.subscribe().await.unwrap();

    // Behind the registration's back, as an operator or an etcd that lost the lease would.
    let mut etcd = etcd_client::Client::connect([server.url()], None)
        .await
        .unwrap();
    let key = "/farm-a/workers/w1";
    let found = etcd.get(key, None).await.unwrap();
    let lease = found
        .kvs()
        .first()
        .expect("record under the configured prefix")
        .lease();
    assert_ne!(lease, 0, "the record is bound to a lease");
    etcd.lease_revoke(lease).await.unwrap();

    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Left("w1".into())
    );
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(worker("w1"))
    );
    let found = etcd.get(key, None).await.unwrap();
    let renewed = found.kvs().first().expect("record is back").lease();
    assert!(
        renewed != 0 && renewed != lease,
        "new lease {renewed}, old {lease}"
    );

    // The new lease is kept alive and used by updates.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = longtake_proto::Worker {
        state: WorkerState::Busy as i32,
        ..worker("w1")
    };
    registration.update(busy.clone()).await.unwrap();
    assert_eq!(membership.list().await.unwrap(), vec![busy]);
    registration.leave().await.unwrap();
    assert!(membership.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn keep_alive_and_watch_outlive_the_request_timeout() {
    // Both are streams on a client whose unary requests time out after 5 s: they must not. 11 s
    // also spans an HTTP/2 keep-alive ping (every 10 s), which etcd must not answer with GOAWAY.
    let server = EtcdServer::start();
    let membership = EtcdMembership::connect(config(&server, 2)).await.unwrap();
    let registration = membership.register(worker("w1")).await.unwrap();
    let mut sub = membership.subscribe().await.unwrap();
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(sub.events.try_recv().is_err(), "no change while kept alive");
    assert_eq!(membership.list().await.unwrap(), vec![worker("w1")]);
    let busy = longtake_proto::Worker {
        state: WorkerState::Busy as i32,
        ..worker("w1")
    };
    registration.update(busy.clone()).await.unwrap();
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(busy)
    );
}

#[tokio::test]
async fn a_record_that_is_not_a_worker_is_skipped_not_fatal() {
    let server = EtcdServer::start();
    let membership = EtcdMembership::connect(config(&server, 10)).await.unwrap();
    let _w1 = membership.register(worker("w1")).await.unwrap();
    let mut sub = membership.subscribe().await.unwrap();
    let mut etcd = etcd_client::Client::connect([server.url()], None)
        .await
        .unwrap();
    etcd.put("/longtake/workers/broken", "not json {", None)
        .await
        .unwrap();
    let _w2 = membership.register(worker("w2")).await.unwrap();

    assert_eq!(
        membership.list().await.unwrap(),
        vec![worker("w1"), worker("w2")]
    );
    // The bad put is skipped in the stream too: the next event is w2's.
    assert_eq!(
        next_event(&mut sub.events).await,
        MembershipEvent::Put(worker("w2"))
    );
    let late = membership.subscribe().await.unwrap();
    assert_eq!(late.workers, vec![worker("w1"), worker("w2")]);
}

#[tokio::test]
async fn a_subscription_closes_when_etcd_goes_away() {
    let server = EtcdServer::start();
    let membership = EtcdMembership::connect(config(&server, 10)).await.unwrap();
    let mut sub = membership.subscribe().await.unwrap();
    drop(server);
    let closed = tokio::time::timeout(common::HANG_GUARD, sub.events.recv())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "hang guard ({:?}): the subscription stays open after etcd died",
                common::HANG_GUARD
            )
        });
    assert_eq!(closed, None);
}
