//! Crash safety: the operator aborts right after each step of a create (and during a delete),
//! is restarted, and must end with exactly the keys status names, a Secret whose key works,
//! no orphan, and a Ready resource. Needs the `failpoints` feature (`make test` enables it).

use crate::support;
use std::time::Duration;

use serde_json::json;
use support::*;

async fn crash_during_create_then_recover(point: &str) {
    let f = Fixture::new(&format!("crash-{}", point.replace('-', ""))).await;
    // A foreign key on the user must survive whatever recovery does.
    let foreign = f.foreign_key().await;
    let mut op = f.operator(&[("IKO_FAILPOINT", point)]);
    f.create("app", json!({})).await;
    let status = op.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the operator should have aborted at {point}");
    assert!(op.log().contains(&format!("failpoint {point}")), "stopped at {point}");

    op.restart(&[]);
    f.wait_ready("app").await;
    let obj = f.keys_api().get("app").await.unwrap();
    assert_eq!(obj.status.as_ref().unwrap().keys.len(), 1, "exactly one key of ours");
    f.assert_consistent("app", std::slice::from_ref(&foreign)).await;
    assert_eq!(f.iam_keys().await[&foreign], "Active", "foreign key untouched");
    let (_, secret) = f.secret_creds("app").await.unwrap();
    op.assert_log_free_of(&secret);
}

#[tokio::test]
async fn crash_after_create_access_key() {
    crash_during_create_then_recover("after-create-key").await;
}

#[tokio::test]
async fn crash_after_tagging_the_key() {
    crash_during_create_then_recover("after-tag").await;
}

#[tokio::test]
async fn crash_after_writing_the_secret() {
    crash_during_create_then_recover("after-secret").await;
}

#[tokio::test]
async fn crash_before_the_status_write() {
    crash_during_create_then_recover("before-status").await;
}

#[tokio::test]
async fn crash_during_delete() {
    let f = Fixture::new("crash-delete").await;
    let foreign = f.foreign_key().await;
    let mut op = f.operator(&[]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
    op.restart(&[("IKO_FAILPOINT", "during-delete")]);
    f.delete("app").await;
    op.wait_exit(Duration::from_secs(60)).await;
    assert!(f.keys_api().get_opt("app").await.unwrap().is_some(), "finalizer still holds the resource");

    op.restart(&[]);
    f.wait_gone("app", Duration::from_secs(60)).await;
    assert_eq!(f.iam_keys().await.into_keys().collect::<Vec<_>>(), vec![foreign], "only the foreign key remains");
    assert!(f.user_tags().await.is_empty(), "claim and key tags removed");
    assert!(f.secrets().get_opt("app").await.unwrap().is_none());
}
