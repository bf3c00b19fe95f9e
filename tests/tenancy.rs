//! Tenancy: IamAccessKeyPolicy decides which namespace may manage which IAM user (default deny),
//! and its limits (maxKeyAge, deactivateUnusedAfter, minRotationInterval) apply. Real API
//! server + moto.

mod etcd;
mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

#[tokio::test]
async fn without_a_policy_nothing_is_written_to_iam_and_the_condition_says_why() {
    let f = Fixture::without_policy("deny").await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    let obj = f.wait_reason("app", "NotAuthorized").await;
    let message = ready(&obj).unwrap().2;
    assert!(message.contains(&f.ns) && message.contains(&f.user), "names namespace and user: {message}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0, "no IAM write for a denied resource");
    assert!(f.iam_keys().await.is_empty());
    assert!(f.user_tags().await.is_empty(), "user not even claimed");

    // A platform admin adds a rule: the resource becomes Ready without being touched.
    let generation = obj.metadata.generation;
    f.allow(&format!("late-{}", f.ns), json!({"namespaces": [f.ns], "userNames": [f.user]})).await;
    let obj = f.wait_ready("app").await;
    assert_eq!(obj.metadata.generation, generation);
}

#[tokio::test]
async fn user_name_glob_with_the_namespace_placeholder() {
    let f = Fixture::without_policy("glob").await;
    let user = format!("{}-uploader", f.ns);
    f.env.iam_client().create_user().user_name(&user).send().await.unwrap();
    f.allow(&format!("glob-{}", f.ns), json!({"namespaces": [f.ns], "userNames": ["{namespace}-*"]})).await;
    let _op = f.operator(&[]);
    f.create("mine", json!({"userName": user})).await;
    f.create("theirs", json!({"secret": {"name": "theirs"}})).await; // f.user does not match
    f.wait_ready("mine").await;
    f.wait_reason("theirs", "NotAuthorized").await;
}

#[tokio::test]
async fn iam_path_prefix_with_the_namespace_placeholder() {
    let f = Fixture::without_policy("path").await;
    let inside = f.env.fresh_iam_user_with_path("in", &format!("/k8s/{}/", f.ns)).await.unwrap();
    let outside = f.env.fresh_iam_user_with_path("out", "/k8s/someone-else/").await.unwrap();
    f.allow(&format!("path-{}", f.ns), json!({"namespaces": [f.ns], "userPathPrefix": "/k8s/{namespace}/"})).await;
    let op = f.operator(&[]);
    f.create("inside", json!({"userName": inside})).await;
    f.create("outside", json!({"userName": outside, "secret": {"name": "outside"}})).await;
    f.wait_ready("inside").await;
    f.wait_reason("outside", "NotAuthorized").await;
    assert!(iam_keys(f.env, &outside).await.is_empty());
    assert_eq!(op.iam_calls(&["CreateAccessKey"]).await, 1, "only the allowed user got a key");
}

#[tokio::test]
async fn user_tag_with_the_namespace_placeholder() {
    let f = Fixture::without_policy("tag").await;
    let tag = aws_sdk_iam::types::Tag::builder().key("k8s-namespace").value(&f.ns).build().unwrap();
    f.env.iam_client().tag_user().user_name(&f.user).tags(tag).send().await.unwrap();
    let rule = json!({"namespaces": [f.ns], "userTag": {"key": "k8s-namespace", "value": "{namespace}"}});
    f.allow(&format!("tag-{}", f.ns), rule).await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
}

#[tokio::test]
async fn max_key_age_forces_a_rotation() {
    let f = Fixture::without_policy("maxage").await;
    let rule = json!({"namespaces": [f.ns], "userNames": [f.user], "maxKeyAge": "6s"});
    f.allow(&format!("age-{}", f.ns), rule).await;
    let _op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let obj = f.wait_ready("app").await;
    let first = obj.status.as_ref().unwrap().access_key_id.clone().unwrap();
    assert!(obj.status.unwrap().next_rotation_at.is_some(), "nextRotationAt reflects maxKeyAge");
    let obj = f
        .wait_for("app", Duration::from_secs(40), "rotation by maxKeyAge", |o| {
            o.status.as_ref().and_then(|s| s.access_key_id.clone()).is_some_and(|id| id != first)
        })
        .await;
    assert_eq!(obj.status.unwrap().rotation.unwrap().last_reason.as_deref(), Some("MaxKeyAge"));
}

#[tokio::test]
async fn deactivate_unused_after_deactivates_an_idle_key_and_reports_it() {
    let f = Fixture::without_policy("unused").await;
    let rule = json!({"namespaces": [f.ns], "userNames": [f.user], "deactivateUnusedAfter": "5s"});
    f.allow(&format!("unused-{}", f.ns), rule).await;
    let _op = Operator::start(f.env, &f.ns, &[], &["--last-used-refresh", "1s"]);
    f.create("app", json!({})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    let obj = f.wait_reason("app", "DeactivatedUnused").await;
    assert!(ready(&obj).unwrap().2.contains("rotate"), "the message says how to get a working key");
    assert_eq!(f.iam_keys().await[&id], "Inactive");
    // Not fought back: it stays Inactive although the spec says Active.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(f.iam_keys().await[&id], "Inactive");
}

#[tokio::test]
async fn users_outside_the_operators_path_prefix_are_refused_before_any_write() {
    let f = Fixture::without_policy("prefix").await;
    let inside = f.env.fresh_iam_user_with_path("in", "/k8s/").await.unwrap();
    let outside = f.env.fresh_iam_user_with_path("out", "/admins/").await.unwrap();
    f.allow(&format!("prefix-{}", f.ns), json!({"namespaces": [f.ns], "userNames": ["*"]})).await;
    let op = Operator::start(f.env, &f.ns, &[], &["--iam-user-path-prefix", "/k8s/"]);
    f.create("outside", json!({"userName": outside, "secret": {"name": "outside"}})).await;
    f.create("inside", json!({"userName": inside})).await;
    f.wait_ready("inside").await;
    let obj = f.wait_reason("outside", "NotAuthorized").await;
    assert!(ready(&obj).unwrap().2.contains("--iam-user-path-prefix"));
    assert_eq!(op.iam_calls(&["TagUser"]).await, 2, "claim + key tag for the inside user only");
}

#[tokio::test]
async fn a_policy_minimum_rotation_interval_refuses_a_shorter_one_naming_the_policy() {
    let f = Fixture::without_policy("minrot").await;
    let policy = format!("minrot-{}", f.ns);
    f.allow(&policy, json!({"namespaces": [f.ns], "userNames": [f.user], "minRotationInterval": "24h"})).await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"interval": "1h"}})).await;
    let obj = f.wait_reason("app", "PolicyViolation").await;
    let message = ready(&obj).unwrap().2;
    assert!(message.contains(&policy) && message.contains("spec.rotation.interval 1h"), "{message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0, "no IAM write for a refused resource");
    assert!(f.iam_keys().await.is_empty());

    // Lengthened to the policy's minimum: allowed.
    let patch = json!({"spec": {"rotation": {"interval": "24h"}}});
    f.keys_api().patch("app", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await.unwrap();
    f.wait_ready("app").await;
}

#[tokio::test]
async fn an_unreadable_policy_is_reported_allows_nothing_and_does_not_stop_the_policy_watch() {
    let f = Fixture::without_policy("badpolicy").await;
    // Stored under an older, looser schema: a maxKeyAge the operator cannot read. The API server
    // would refuse it now, so it goes straight into etcd.
    let unreadable = |name: &str| {
        json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
            "metadata": etcd::metadata(name, None),
            "spec": {"rules": [{"namespaces": [f.ns], "userNames": [f.user], "maxKeyAge": "99999999999999999999d"}]},
        })
    };
    let before = format!("unreadable-{}", f.ns);
    etcd::put(f.env, &etcd::key("iamaccesskeypolicies", None, &before), &unreadable(&before)).await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    // The operator started although its first list of policies held an unreadable one, and that
    // one allows nothing.
    f.wait_reason("app", "NotAuthorized").await;

    // Later changes still arrive: another unreadable one, then a readable one.
    let after = format!("unreadable-later-{}", f.ns);
    etcd::put(f.env, &etcd::key("iamaccesskeypolicies", None, &after), &unreadable(&after)).await;
    f.allow(&format!("good-{}", f.ns), json!({"namespaces": [f.ns], "userNames": [f.user]})).await;
    f.wait_ready("app").await;

    // Each is reported: a Warning event on the policy, and the log.
    let events: kube::Api<k8s_openapi::api::events::v1::Event> = kube::Api::namespaced(f.client.clone(), "default");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = events.list(&Default::default()).await.unwrap();
        let reported = |name: &str| {
            list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.reason.as_deref() == Some("InvalidPolicy")
                    && e.note.as_deref().is_some_and(|n| n.contains("cannot be read") && n.contains("allows nothing"))
            })
        };
        if reported(&before) && reported(&after) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no Warning event on each unreadable policy");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = op.log();
    assert!(log.contains(&before) && log.contains(&after), "the log names both:\n{}", tail(&log, 30));
    for name in [before, after] {
        let out = f.env.kubectl(["delete", "iamaccesskeypolicy", &name]);
        assert!(out.status.success(), "an unreadable policy can be deleted: {}", String::from_utf8_lossy(&out.stderr));
    }
}
