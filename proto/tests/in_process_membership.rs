//! `InProcessMembership` keeps the membership contract; a dropped registration leaves at once.

mod common;

use std::time::Duration;

use longtake_proto::membership::InProcessMembership;

#[tokio::test]
async fn in_process_membership_keeps_the_contract() {
    let membership = InProcessMembership::new();
    let gone = common::membership_contract(&membership, Duration::from_millis(100)).await;
    assert!(gone < Duration::from_millis(100), "{gone:?}");
}
