//! A tenant (edit rights in one namespace, none on policies) cannot opt out of the platform
//! team's rules: a pause or `deletionPolicy: Retain` that no policy allows is ignored (and the
//! resource says so) while `maxKeyAge` and `deactivateUnusedAfter` still apply; removing the
//! finalizer or forging status never makes the operator delete a key it cannot prove is its own;
//! a resource that was never allowed is deleted at once without IAM calls; and a refused
//! resource learns nothing about which IAM users exist. Real API server + moto.

use crate::support;
use std::time::Duration;

use iam_key_operator::crd::IamAccessKey;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;

const PAUSED: &str = "iam.keyop.dev/paused";

async fn create_paused(f: &Fixture, name: &str, spec: serde_json::Value) {
    let mut spec = spec;
    spec["userName"] = f.user.clone().into();
    let obj: IamAccessKey = serde_json::from_value(json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
        "metadata": {"name": name, "annotations": {PAUSED: "true"}},
        "spec": spec,
    }))
    .unwrap();
    f.keys_api().create(&PostParams::default(), &obj).await.expect("create paused IamAccessKey");
}

fn override_message(obj: &IamAccessKey, expected_reason: &str) -> String {
    let (status, reason, message) = condition(obj, "PolicyOverride").expect("a PolicyOverride condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", expected_reason));
    message
}

#[tokio::test]
async fn a_pause_no_rule_allows_is_ignored_and_max_key_age_still_rotates() {
    let f = Fixture::without_policy("pause-age").await;
    let policy = format!("age-{}", f.ns);
    f.allow(&policy, json!({"namespaces": [f.ns], "userNames": [f.user], "maxKeyAge": "6s"})).await;
    let _op = f.operator(&[]);
    create_paused(&f, "app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    // Not paused: the key is made, and the resource says why its annotation is ignored.
    let obj = f.wait_ready("app").await;
    let message = override_message(&obj, "PauseNotAllowed");
    assert!(message.contains(PAUSED) && message.contains(&policy) && message.contains("allowPause"), "{message}");
    let first = obj.status.unwrap().access_key_id.unwrap();
    let obj = f
        .wait_for("app", Duration::from_secs(40), "rotation by maxKeyAge", |o| {
            o.status.as_ref().and_then(|s| s.access_key_id.clone()).is_some_and(|id| id != first)
        })
        .await;
    assert_eq!(obj.status.unwrap().rotation.unwrap().last_reason.as_deref(), Some("MaxKeyAge"));
    assert!(!f.wait_events("app", "PolicyOverride", |n| !n.is_empty()).await.is_empty(), "a Warning event said so too");
}

#[tokio::test]
async fn a_pause_no_rule_allows_does_not_hold_deactivate_unused_after() {
    let f = Fixture::without_policy("pause-unused").await;
    let rule = json!({"namespaces": [f.ns], "userNames": [f.user], "deactivateUnusedAfter": "5s"});
    f.allow(&format!("unused-{}", f.ns), rule).await;
    let _op = Operator::start(f.env, &f.ns, &[], &["--last-used-refresh", "1s"]);
    f.create("app", json!({})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    // Paused after the fact, to keep the idle key Active: it is deactivated anyway.
    let pause = json!({"metadata": {"annotations": {PAUSED: "true"}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    let obj = f.wait_reason("app", "DeactivatedUnused").await;
    assert!(override_message(&obj, "PauseNotAllowed").contains(PAUSED));
    assert_eq!(f.iam_keys().await[&id], "Inactive");
}

#[tokio::test]
async fn a_pause_no_rule_allows_does_not_hold_the_deletion() {
    let f = Fixture::new("pause-delete").await;
    let _op = f.operator(&[]);
    create_paused(&f, "app", json!({})).await;
    f.wait_ready("app").await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty(), "its key is deleted");
    assert!(!f.wait_events("app", "PauseIgnored", |n| !n.is_empty()).await.is_empty());
}

#[tokio::test]
async fn retain_no_rule_allows_deletes_the_keys_and_says_so_beforehand() {
    let f = Fixture::new("retain-refused").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"deletionPolicy": "Retain"})).await;
    let obj = f.wait_ready("app").await;
    let message = override_message(&obj, "RetainNotAllowed");
    assert!(message.contains("Retain") && message.contains("allowRetain") && message.contains(&f.ns), "{message}");
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty(), "deleted, not retained");
    assert!(f.user_tags().await.is_empty(), "no retained tag, no claim: {:?}", f.user_tags().await);
    assert!(!f.wait_events("app", "RetainNotAllowed", |n| !n.is_empty()).await.is_empty());
}

#[tokio::test]
async fn a_never_allowed_resource_is_deleted_at_once_without_iam_calls() {
    let f = Fixture::without_policy("never").await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    f.wait_reason("app", "NotAuthorized").await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(10)).await;
    assert_eq!(op.iam_calls(IAM_ALL).await, 0, "no IAM call at all, in life or in deletion");
}

#[tokio::test]
async fn a_user_outside_the_operators_path_is_deleted_at_once_without_iam_writes() {
    let f = Fixture::without_policy("outside").await;
    let outside = f.env.fresh_iam_user_with_path("out", "/admins/").await.unwrap();
    f.allow(&format!("any-{}", f.ns), json!({"namespaces": [f.ns], "userNames": ["*"]})).await;
    let op = Operator::start(f.env, &f.ns, &[], &["--iam-user-path-prefix", "/k8s/"]);
    f.create("app", json!({"userName": outside})).await;
    f.wait_reason("app", "NotAuthorized").await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(10)).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0);
    // Only the read that found the user outside the path; nothing on its keys.
    assert_eq!(op.iam_calls(&["ListAccessKeys", "GetAccessKeyLastUsed"]).await, 0);
}

#[tokio::test]
async fn a_refused_user_gets_the_same_message_whether_it_exists_or_not() {
    let f = Fixture::without_policy("probe").await;
    // A rule on the IAM path: deciding needs the user read from IAM. The fixture's user (under
    // `/`) matches it not, nor the operator's own path; `ghost` does not exist.
    let rule = json!({"namespaces": [f.ns], "userPathPrefix": "/k8s/{namespace}/"});
    f.allow(&format!("path-{}", f.ns), rule).await;
    let op = Operator::start(f.env, &f.ns, &[], &["--iam-user-path-prefix", "/k8s/"]);
    let ghost = format!("ghost-{}", f.ns);
    f.create("real", json!({})).await;
    f.create("ghost", json!({"userName": ghost, "secret": {"name": "ghost"}})).await;
    let real = ready(&f.wait_reason("real", "NotAuthorized").await).unwrap().2;
    let missing = ready(&f.wait_reason("ghost", "NotAuthorized").await).unwrap().2;
    assert_eq!(real.replace(&f.user, "USER"), missing.replace(&ghost, "USER"), "the messages tell the two apart");
    assert!(!real.contains("--iam-user-path-prefix") && !real.contains("\"/\""), "no IAM path in the message: {real}");
    let events = |name| f.wait_events(name, "NotAuthorized", |n| !n.is_empty());
    let (real_events, ghost_events) = (events("real").await, events("ghost").await);
    assert_eq!(
        real_events.iter().map(|e| e.replace(&f.user, "USER")).collect::<Vec<_>>(),
        ghost_events.iter().map(|e| e.replace(&ghost, "USER")).collect::<Vec<_>>()
    );
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0);
}

/// The resource's status, patched as someone other than the operator would (here: admin).
async fn forge_status(f: &Fixture, name: &str, status: serde_json::Value) {
    let patch = json!({"status": status});
    f.keys_api().patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch status");
}

fn listing(obj: &IamAccessKey, extra: serde_json::Value) -> serde_json::Value {
    let mut keys = serde_json::to_value(&obj.status.as_ref().unwrap().keys).unwrap();
    keys.as_array_mut().unwrap().push(extra);
    keys
}

#[tokio::test]
async fn forged_status_never_aims_the_operator_at_a_key_it_does_not_own() {
    let f = Fixture::new("forge").await;
    // A person's untagged key on the user, made minutes before the forgery.
    let person = f.foreign_key().await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    let obj = f.wait_ready("app").await;
    let ours = obj.status.as_ref().unwrap().access_key_id.clone().unwrap();

    // Status claims the person's key as a retired key of ours past its rollback window, and a
    // create pending since yesterday with no keys before it.
    let yesterday = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24);
    let retired = json!({"accessKeyId": person, "phase": "Inactive", "createDate": "2020-01-01T00:00:00Z", "deleteAt": "2020-01-02T00:00:00Z"});
    let pending = json!({"since": yesterday.to_string(), "existingKeyIds": []});
    forge_status(&f, "app", json!({"keys": listing(&obj, retired), "pendingCreate": pending})).await;
    f.wait_for("app", Duration::from_secs(30), "the forged key disowned, the forged create cleared", |o| {
        let s = o.status.as_ref().unwrap();
        !s.keys.iter().any(|k| k.access_key_id == person) && s.pending_create.is_none()
    })
    .await;
    assert!(
        !f.wait_events("app", "KeyNotOwned", |n| !n.is_empty()).await.is_empty(),
        "a Warning event names the disowned key"
    );
    assert_eq!(f.iam_keys().await.get(&person).map(String::as_str), Some("Active"), "the person's key is untouched");

    // Forged again, then deleted: the cleanup deletes our key only.
    let obj = f.keys_api().get("app").await.unwrap();
    let current = json!({"accessKeyId": person, "phase": "Draining", "createDate": "2020-01-01T00:00:00Z", "deactivateAt": "2020-01-02T00:00:00Z"});
    let pending = json!({"since": yesterday.to_string(), "existingKeyIds": []});
    forge_status(&f, "app", json!({"keys": listing(&obj, current), "pendingCreate": pending})).await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    let left = f.iam_keys().await;
    assert!(!left.contains_key(&ours), "our key is deleted");
    assert_eq!(left.get(&person).map(String::as_str), Some("Active"), "the person's key is untouched: {left:?}");
}

#[tokio::test]
async fn removing_the_finalizer_never_makes_the_operator_delete_another_key() {
    let f = Fixture::new("finalizer").await;
    let person = f.foreign_key().await;
    let mut op = f.operator(&[]);
    f.create("app", json!({})).await;
    let ours = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    let drop_finalizers = json!({"metadata": {"finalizers": null}});

    // Removed from a live resource: the operator puts it back.
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&drop_finalizers)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "the finalizer back", |o| {
        o.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == "iam.keyop.dev/cleanup"))
    })
    .await;

    // Removed during a deletion the operator does not see (it is down): the resource goes
    // without cleanup, and its key stays in IAM, tagged as this resource's.
    op.kill();
    f.delete("app").await;
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&drop_finalizers)).await.unwrap();
    f.wait_gone("app", Duration::from_secs(10)).await;
    assert_eq!(f.iam_keys().await.len(), 2, "both keys still there");

    // A resource of the same name deletes that leftover key of its own, never the person's.
    op.restart(&[]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
    let left = f.iam_keys().await;
    assert!(!left.contains_key(&ours), "the abandoned key of this name is deleted: {left:?}");
    assert_eq!(left.get(&person).map(String::as_str), Some("Active"), "the person's key is untouched: {left:?}");
    assert_eq!(left.len(), 2, "the person's and the new one: {left:?}");
    f.assert_consistent("app", &[person]).await;
}
