//! Tenancy: IamAccessKeyPolicy decides which namespace may manage which IAM user (default deny),
//! and its limits (maxKeyAge, deactivateUnusedAfter, minRotationInterval) apply. Real API
//! server + moto.

use crate::{etcd, support};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use iam_key_operator::crd::{GrantRecord, IamAccessKeyPolicy, OnRevoke};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{DeleteParams, PostParams, WatchEvent, WatchParams},
};
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
    assert!(!message.contains("revoked"), "never allowed, so nothing was revoked: {message}");
    // The first refusal and one retry past its backoff.
    op.wait_reconciles(Some("NotAuthorized"), 2).await;
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
    let op = Operator::start(f.env, &f.ns, &[], &["--last-used-refresh", "1s"]);
    f.create("app", json!({})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    let obj = f.wait_reason("app", "DeactivatedUnused").await;
    assert!(ready(&obj).unwrap().2.contains("rotate"), "the message says how to get a working key");
    assert_eq!(f.iam_keys().await[&id], "Inactive");
    // Not fought back: it stays Inactive although the spec says Active, a retry later too.
    op.wait_reconciles(Some("DeactivatedUnused"), 2).await;
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
    assert_eq!(op.iam_calls(&["TagUser"]).await, 1, "one TagUser (claim and key tag) for the inside user only");
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
    op.wait_reconciles(Some("PolicyViolation"), 2).await;
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
    // Its status says so, and writing that status is no new version to report again.
    let dynamic = kube::api::ApiResource::erase::<IamAccessKeyPolicy>(&());
    let raw: Api<kube::api::DynamicObject> = Api::all_with(f.client.clone(), &dynamic);
    for name in [&before, &after] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = raw.get(name).await.unwrap();
            let conditions = p.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
            if conditions.iter().any(|c| {
                c["type"] == "Ready"
                    && c["status"] == "False"
                    && c["reason"] == "Unreadable"
                    && c["message"].as_str().is_some_and(|m| m.contains("allows nothing"))
            }) {
                break;
            }
            assert!(Instant::now() < deadline, "no Ready=False Unreadable on {name}: {:?}", p.data["status"]);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every operator running in this environment reports it; this one did once.
    let reported = format!("the stored IamAccessKeyPolicy \"{before}\" cannot be read");
    assert_eq!(op.log().lines().filter(|l| l.contains(&reported)).count(), 1, "one report per unreadable version");
    for name in [before, after] {
        let out = f.env.kubectl(["delete", "iamaccesskeypolicy", &name]);
        assert!(out.status.success(), "an unreadable policy can be deleted: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `(status, reason, message, observedGeneration)` of a policy's condition.
fn policy_condition(p: &IamAccessKeyPolicy, type_: &str) -> Option<(String, String, String, Option<i64>)> {
    let c = p.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation))
}

async fn wait_policy(
    f: &Fixture,
    name: &str,
    what: &str,
    check: impl Fn(&IamAccessKeyPolicy) -> bool,
) -> IamAccessKeyPolicy {
    let api: Api<IamAccessKeyPolicy> = Api::all(f.client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = api.get(name).await.expect("get policy");
        if check(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what} on policy {name}; last: {:#?}", p.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn policy_status_names_namespaces_whose_grants_overlap_until_the_patterns_are_disjoint() {
    let f = Fixture::without_policy("overlap").await;
    let (data, ingest) = (f.ns.clone(), format!("{}-ingest", f.ns));
    let policy = format!("overlap-{}", f.ns);
    // The pattern the example policy once recommended: namespace X may manage users "X-*".
    f.allow(&policy, json!({"namespaces": [data, ingest], "userNames": ["{namespace}-*"]})).await;
    let _op = f.operator(&[]);
    // Only one of the two namespaces exists: nothing overlaps yet.
    let own_pair =
        format!(r#"namespaces "{data}" (rules[0]) and "{ingest}" (rules[0]) can both manage IAM user "{ingest}-""#);
    let p = wait_policy(&f, &policy, "Ready", |p| {
        policy_condition(p, "Ready").is_some_and(|(s, _, m, _)| s == "True" && m.contains("allow 1 existing namespace"))
    })
    .await;
    let overlap = policy_condition(&p, "GrantsOverlap").expect("GrantsOverlap condition");
    assert!(!overlap.2.contains(&own_pair), "{overlap:?}");
    assert_eq!(p.status.as_ref().unwrap().observed_generation, p.metadata.generation);

    // The second namespace appears: the warning names both, the rule, and a user both could take.
    let namespaces: Api<Namespace> = Api::all(f.client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ingest}})).unwrap();
    namespaces.create(&PostParams::default(), &ns).await.expect("create namespace");
    let p = wait_policy(&f, &policy, "GrantsOverlap naming the pair", |p| {
        policy_condition(p, "GrantsOverlap")
            .is_some_and(|(s, r, m, _)| s == "True" && r == "OverlappingGrants" && m.contains(&own_pair))
    })
    .await;
    let columns = f.env.kubectl(["get", "iamaccesskeypolicy", &policy]);
    let table = String::from_utf8_lossy(&columns.stdout);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    let column = rows[0].iter().position(|h| *h == "OVERLAP").unwrap_or_else(|| panic!("no OVERLAP column:\n{table}"));
    assert_eq!(rows[1][column], "True", "{table}");
    let wide = f.env.kubectl(["get", "iamaccesskeypolicy", &policy, "-o", "wide"]);
    let wide = String::from_utf8_lossy(&wide.stdout);
    assert_eq!(column_of(&wide, "RULES"), "1", "the wide table counts the rules:\n{wide}");

    // Made disjoint with a separator no namespace name contains: the warning goes.
    f.allow(&policy, json!({"namespaces": [data, ingest], "userNames": ["{namespace}.*"]})).await;
    let fixed = wait_policy(&f, &policy, "the pair no longer named", |fixed| {
        fixed.metadata.generation > p.metadata.generation
            && policy_condition(fixed, "GrantsOverlap").is_some_and(|(_, _, m, generation)| {
                !m.contains(&format!(r#""{data}" (rules[0]) and "{ingest}" (rules[0])"#))
                    && generation == fixed.metadata.generation
            })
    })
    .await;
    // observedGeneration caught up: the status was rewritten for the new spec (by this operator
    // or by another test's: every operator writes the same policy status, only on change).
    assert_eq!(fixed.status.as_ref().unwrap().observed_generation, fixed.metadata.generation);

    // No write without a change: every write of this policy for 3 s changes its status. (Other
    // tests' policies may overlap this one's and come and go meanwhile, so its status may change
    // and change back; what must not happen is a write that changes nothing.)
    let api: Api<IamAccessKeyPolicy> = Api::all(f.client.clone());
    let params = WatchParams::default().fields(&format!("metadata.name={policy}")).timeout(3);
    let version = fixed.metadata.resource_version.clone().unwrap();
    let mut writes = api.watch(&params, &version).await.expect("watch the policy").boxed();
    let mut before = fixed.status.clone();
    while let Some(event) = writes.try_next().await.expect("watch event") {
        if let WatchEvent::Modified(p) = event {
            assert_ne!(
                p.status, before,
                "no write without a change (resourceVersion {:?})",
                p.metadata.resource_version
            );
            before = p.status;
        }
    }
    api.delete(&policy, &DeleteParams::default()).await.unwrap();
    namespaces.delete(&ingest, &DeleteParams::default()).await.unwrap();
}

/// A resource allowed by a rule with `on_revoke`, Ready with a key; then the rule's policy is
/// deleted. Returns the fixture, the operator, the key id and the policy's name.
async fn revoke(prefix: &str, on_revoke: &str) -> (Fixture, Operator, String, String) {
    let f = Fixture::without_policy(prefix).await;
    let policy = format!("grant-{}", f.ns);
    f.allow(&policy, json!({"namespaces": [f.ns], "userNames": [f.user], "onRevoke": on_revoke})).await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    let obj = f.wait_ready("app").await;
    let status = obj.status.unwrap();
    let expected: OnRevoke = serde_json::from_value(json!(on_revoke)).unwrap();
    assert_eq!(
        status.grant,
        Some(GrantRecord { policy: policy.clone(), rule: 0, on_revoke: expected, revoked_at: None }),
        "status records the grant"
    );
    let id = status.access_key_id.unwrap();
    let api: Api<IamAccessKeyPolicy> = Api::all(f.client.clone());
    api.delete(&policy, &DeleteParams::default()).await.expect("delete policy");
    (f, op, id, policy)
}

fn assert_says_revoked(obj: &iam_key_operator::crd::IamAccessKey, policy: &str, on_revoke: &str) {
    let (_, _, message) = ready(obj).unwrap();
    assert!(
        message.contains(&format!(r#"the grant of IamAccessKeyPolicy "{policy}" (rules[0]) was revoked"#))
            && message.contains(&format!("onRevoke {on_revoke}")),
        "{message}"
    );
    let grant = obj.status.as_ref().unwrap().grant.as_ref().expect("the grant stays recorded");
    assert!(grant.revoked_at.is_some() && grant.policy == policy, "{grant:?}");
}

#[tokio::test]
async fn a_revoked_grant_with_on_revoke_keep_leaves_the_keys_working() {
    let (f, op, id, policy) = revoke("rvkeep", "Keep").await;
    let obj = f.wait_reason("app", "NotAuthorized").await;
    assert_says_revoked(&obj, &policy, "Keep");
    op.wait_reconciles(Some("NotAuthorized"), 2).await;
    assert_eq!(f.iam_keys().await, [(id.clone(), "Active".to_string())].into());
    let (held, secret) = f.secret_creds("app").await.expect("the Secret stays");
    assert_eq!(held, id);
    assert!(f.authenticates(&held, &secret).await);
    assert_eq!(op.iam_calls(&["UpdateAccessKey", "DeleteAccessKey"]).await, 0);
}

#[tokio::test]
async fn a_revoked_grant_with_on_revoke_deactivate_deactivates_the_keys_until_allowed_again() {
    let (f, _op, id, policy) = revoke("rvdeact", "Deactivate").await;
    let obj = f.wait_reason("app", "NotAuthorized").await;
    assert_says_revoked(&obj, &policy, "Deactivate");
    assert_eq!(f.iam_keys().await, [(id.clone(), "Inactive".to_string())].into(), "deactivated, not deleted");
    assert!(f.secret_creds("app").await.is_some(), "the Secret stays");
    assert_eq!(obj.status.unwrap().key_status.map(|s| s.as_str()), Some("Inactive"));

    // Someone reactivates the key in IAM while no rule allows the resource: set Inactive again.
    f.env
        .iam_client()
        .update_access_key()
        .user_name(&f.user)
        .access_key_id(&id)
        .status("Active".into())
        .send()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.iam_keys().await[&id] != "Inactive" {
        assert!(Instant::now() < deadline, "the revoked key stayed Active");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Allowed again: the same key follows the spec again.
    f.allow(&format!("regrant-{}", f.ns), json!({"namespaces": [f.ns], "userNames": [f.user]})).await;
    let obj = f.wait_ready("app").await;
    assert_eq!(obj.status.as_ref().unwrap().access_key_id.as_ref(), Some(&id));
    assert_eq!(f.iam_keys().await, [(id.clone(), "Active".to_string())].into());
    assert!(obj.status.unwrap().grant.is_some_and(|g| g.revoked_at.is_none() && g.on_revoke == OnRevoke::Keep));
}

#[tokio::test]
async fn a_revoked_grant_with_on_revoke_delete_deletes_keys_secret_and_claim_like_deletion() {
    let (f, _op, id, policy) = revoke("rvdel", "Delete").await;
    let foreign = f.foreign_key().await;
    let obj = f.wait_reason("app", "NotAuthorized").await;
    assert_says_revoked(&obj, &policy, "Delete");
    let left: Vec<String> = f.iam_keys().await.into_keys().collect();
    assert!(left == std::slice::from_ref(&foreign), "ours deleted, not the foreign one: {left:?}");
    assert!(f.secrets().get_opt("app").await.unwrap().is_none(), "the Secret is deleted");
    assert!(f.user_tags().await.is_empty(), "claim and key tags removed: {:?}", f.user_tags().await);
    let status = obj.status.unwrap();
    assert!(status.keys.is_empty() && status.access_key_id.is_none(), "{status:?}");
    assert!(!f.iam_keys().await.contains_key(&id));

    // Allowed again: a new key and Secret.
    f.allow(&format!("regrant-{}", f.ns), json!({"namespaces": [f.ns], "userNames": [f.user]})).await;
    f.wait_ready("app").await;
    f.assert_consistent("app", &[foreign]).await;
}

/// The value of a column in the first row of a `kubectl get` table.
fn column_of(table: &str, header: &str) -> String {
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    let i = rows[0].iter().position(|h| *h == header).unwrap_or_else(|| panic!("no {header} column:\n{table}"));
    rows[1][i].to_string()
}
