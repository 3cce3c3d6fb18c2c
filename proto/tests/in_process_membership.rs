//! `InProcessMembership` keeps the membership contract; a dropped registration leaves at once
//! (unlisted, its `Left` event sent, when the drop returns).

mod common;

use longtake_proto::membership::InProcessMembership;

#[tokio::test]
async fn in_process_membership_keeps_the_contract() {
    let membership = InProcessMembership::new();
    common::membership_contract(&membership, common::Gone::AtOnce).await;
}
