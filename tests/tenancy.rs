//! Tenancy: IamAccessKeyPolicy decides which namespace may manage which IAM user (default deny),
//! and its limits (maxKeyAge, deactivateUnusedAfter) apply. Real API server + moto.

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
