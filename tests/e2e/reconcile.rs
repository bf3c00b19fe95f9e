//! The reconciler against a real kube-apiserver + etcd and moto: create, update, drift, loss,
//! conflicts, deletion, pause, claims, quiet convergence and secrecy.

use crate::support;
use std::time::Duration;

use aws_sdk_iam::types::StatusType;
use iam_key_operator::crd::{KeyPhase, KeyStatus};
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

#[tokio::test]
async fn create_publishes_a_working_key_and_claims_the_user() {
    let f = Fixture::new("create").await;
    let op = f.operator(&[("IKO_LAST_USED_REFRESH", "3s")]);
    f.create("app", json!({"secret": {"name": "app-aws", "labels": {"team": "billing"}}})).await;
    let obj = f.wait_ready("app").await;
    let status = obj.status.clone().unwrap();
    let id = status.access_key_id.clone().unwrap();
    assert_eq!(status.key_status, Some(KeyStatus::Active));
    assert_eq!(status.secret_name.as_deref(), Some("app-aws"));
    assert!(obj.metadata.finalizers.unwrap_or_default().contains(&"iam.keyop.dev/cleanup".to_string()));

    let (secret_id, secret) = f.secret_creds("app-aws").await.expect("Secret");
    assert_eq!(secret_id, id);
    assert!(f.authenticates(&id, &secret).await, "published key authenticates as the user");
    let meta = f.secrets().get("app-aws").await.unwrap().metadata;
    assert_eq!(meta.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"], "iam-key-operator");
    assert_eq!(meta.labels.as_ref().unwrap()["team"], "billing");
    assert_eq!(meta.annotations.unwrap()["iam.keyop.dev/access-key-id"], id);
    assert_eq!(meta.owner_references.unwrap()[0].uid, obj.metadata.uid.unwrap());

    let tags = f.user_tags().await;
    assert_eq!(tags["iam.keyop.dev/owner"], format!("{CLUSTER}/{}/app", f.ns));
    assert_eq!(tags[&id], format!("iam-key-operator:{CLUSTER}/{}/app", f.ns));
    // Last use is read one refresh after the create (the verification call signed a request
    // with the key, so there is a use to report).
    let obj = f
        .wait_for("app", Duration::from_secs(30), "lastUsed", |o| {
            o.status.as_ref().is_some_and(|s| s.last_used.as_ref().is_some_and(|u| u.date.is_some()))
        })
        .await;
    assert_eq!(obj.status.unwrap().last_used.unwrap().service_name.as_deref(), Some("sts"));
    f.assert_consistent("app", &[]).await;
    op.assert_log_free_of(&secret);
}

#[tokio::test]
async fn credentials_file_format_holds_a_profile() {
    let f = Fixture::new("credfile").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"secret": {"format": "CredentialsFile", "profile": "uploader"}})).await;
    let obj = f.wait_ready("app").await;
    let id = obj.status.unwrap().access_key_id.unwrap();
    let s = f.secrets().get("app").await.unwrap();
    let file = String::from_utf8(s.data.unwrap()["credentials"].0.clone()).unwrap();
    assert!(
        file.starts_with(&format!("[uploader]\naws_access_key_id = {id}\naws_secret_access_key = ")),
        "{}",
        file.lines().next().unwrap_or("")
    );
}

#[tokio::test]
async fn key_status_follows_the_spec_in_iam() {
    let f = Fixture::new("toggle").await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    for (want, iam) in [("Inactive", "Inactive"), ("Active", "Active")] {
        let patch = json!({"spec": {"keyStatus": want}});
        f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        f.wait_for("app", Duration::from_secs(30), want, |o| {
            o.status.as_ref().is_some_and(|s| {
                s.key_status.map(|k| k.as_str()) == Some(want) && s.observed_generation == o.metadata.generation
            })
        })
        .await;
        assert_eq!(f.iam_keys().await[&id], iam);
    }
}

#[tokio::test]
async fn console_deactivation_and_deletion_are_corrected() {
    let f = Fixture::new("drift").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();

    // Someone deactivates the key in the console: set back to Active at the next resync.
    let iam = f.env.iam_client();
    iam.update_access_key().user_name(&f.user).access_key_id(&id).status(StatusType::Inactive).send().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while f.iam_keys().await[&id] != "Active" {
        assert!(std::time::Instant::now() < deadline, "drift not corrected");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Someone deletes it: a new key is issued and published.
    iam.delete_access_key().user_name(&f.user).access_key_id(&id).send().await.unwrap();
    let obj = f
        .wait_for("app", Duration::from_secs(30), "a new key", |o| {
            o.status.as_ref().and_then(|s| s.access_key_id.as_ref()).is_some_and(|new| *new != id)
        })
        .await;
    f.wait_ready("app").await;
    assert!(obj.status.unwrap().keys.iter().all(|k| k.access_key_id != id), "deleted key forgotten");
    f.assert_consistent("app", &[]).await;
}

#[tokio::test]
async fn deleted_secret_gets_a_new_key_and_the_lost_one_is_retired() {
    let f = Fixture::new("lost").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "2s", "retainInactive": "2s"}})).await;
    let old = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    f.secrets().delete("app", &Default::default()).await.unwrap();

    let obj = f
        .wait_for("app", Duration::from_secs(30), "new key", |o| {
            o.status.as_ref().and_then(|s| s.access_key_id.as_ref()).is_some_and(|id| *id != old)
        })
        .await;
    let status = obj.status.unwrap();
    let draining = status.keys.iter().find(|k| k.access_key_id == old).expect("old key still tracked");
    assert_eq!(draining.phase, KeyPhase::Draining);
    assert_eq!(f.iam_keys().await[&old], "Active", "old key stays Active during the grace period");
    assert_eq!(status.rotation.unwrap().last_reason.as_deref(), Some("SecretLost"));

    // Grace (2s) then rollback window (2s): the old key is deactivated, then deleted.
    f.wait_for("app", Duration::from_secs(30), "old key deleted", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1)
    })
    .await;
    assert!(!f.iam_keys().await.contains_key(&old));
    f.assert_consistent("app", &[]).await;
}

#[tokio::test]
async fn a_secret_the_resource_does_not_own_is_never_overwritten() {
    let f = Fixture::new("conflict").await;
    let _op = f.operator(&[]);
    let theirs: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "taken"}, "stringData": {"keep": "me"}
    }))
    .unwrap();
    f.secrets().create(&Default::default(), &theirs).await.unwrap();
    f.create("app", json!({"secret": {"name": "taken"}})).await;
    let obj = f.wait_reason("app", "SecretConflict").await;
    assert!(ready(&obj).unwrap().2.contains("taken"), "message names the Secret");
    // `kubectl get iak` shows why, without -o yaml.
    let table = f.env.kubectl(["get", "iak", "app", "-n", &f.ns]);
    let table = String::from_utf8_lossy(&table.stdout);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert!(header.contains(&"REASON") && table.contains("SecretConflict"), "{table}");
    assert!(f.iam_keys().await.is_empty(), "no IAM key created");
    let s = f.secrets().get("taken").await.unwrap();
    assert_eq!(s.data.unwrap()["keep"].0, b"me");
    // Once the Secret is gone, the resource proceeds on its own.
    f.secrets().delete("taken", &Default::default()).await.unwrap();
    f.wait_ready("app").await;
}

#[tokio::test]
async fn missing_user_waits_then_becomes_ready_when_the_user_appears() {
    let f = Fixture::new("nouser").await;
    let _op = f.operator(&[]);
    let user = format!("{}-later", f.user);
    f.create("app", json!({"userName": user})).await;
    let obj = f.wait_reason("app", "UserNotFound").await;
    assert!(ready(&obj).unwrap().2.contains(&user));
    f.env.iam_client().create_user().user_name(&user).send().await.unwrap();
    let obj = f.wait_ready("app").await;
    let keys = iam_keys(f.env, &user).await;
    assert_eq!(keys.keys().next(), obj.status.unwrap().access_key_id.as_ref());
}

#[tokio::test]
async fn two_foreign_keys_block_with_key_limit_exceeded_and_stay_untouched() {
    let f = Fixture::new("limit").await;
    let foreign = vec![f.foreign_key().await, f.foreign_key().await];
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    let obj = f.wait_reason("app", "KeyLimitExceeded").await;
    let message = ready(&obj).unwrap().2;
    assert!(foreign.iter().all(|id| message.contains(id)), "message names the blocking keys: {message}");
    // The first blocked reconcile and one retry past its backoff: still nothing touched.
    op.wait_reconciles(Some("KeyLimitExceeded"), 2).await;
    let keys = f.iam_keys().await;
    assert_eq!(keys.keys().cloned().collect::<Vec<_>>(), {
        let mut v = foreign.clone();
        v.sort();
        v
    });
    assert!(keys.values().all(|s| s == "Active"), "foreign keys untouched");

    // Freeing one slot lets it proceed, still leaving the other foreign key alone.
    f.env.iam_client().delete_access_key().user_name(&f.user).access_key_id(&foreign[0]).send().await.unwrap();
    let obj = f.wait_ready("app").await;
    assert_eq!(obj.status.as_ref().unwrap().foreign_keys, 1);
    assert!(ready(&obj).unwrap().2.contains("not managed by this resource"));
    f.assert_consistent("app", &foreign[1..]).await;
}

#[tokio::test]
async fn delete_policy_removes_keys_tags_and_secret() {
    let f = Fixture::new("del").await;
    let foreign = f.foreign_key().await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert_eq!(f.iam_keys().await.into_keys().collect::<Vec<_>>(), vec![foreign], "only the foreign key is left");
    let tags = f.user_tags().await;
    assert!(tags.is_empty(), "claim and key tags removed: {tags:?}");
    assert!(f.secrets().get_opt("app").await.unwrap().is_none(), "Secret deleted");
}

#[tokio::test]
async fn retain_policy_keeps_the_key_marked_as_retained() {
    let f = Fixture::new("retain").await;
    f.allow_own_user(json!({"allowRetain": true})).await;
    let _op = f.operator(&[]);
    f.create("app", json!({"deletionPolicy": "Retain"})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert_eq!(f.iam_keys().await[&id], "Active", "key kept in IAM");
    let tags = f.user_tags().await;
    assert!(!tags.contains_key("iam.keyop.dev/owner"), "claim released");
    assert!(tags[&id].contains("retained"), "key marked as retained: {tags:?}");

    // A new resource for the same user neither adopts nor deletes the retained key.
    f.create("again", json!({})).await;
    let obj = f.wait_ready("again").await;
    assert_eq!(obj.status.as_ref().unwrap().foreign_keys, 1);
    assert_eq!(f.iam_keys().await[&id], "Active");
}

#[tokio::test]
async fn paused_resource_gets_no_writes_until_unpaused() {
    let f = Fixture::new("pause").await;
    f.allow_own_user(json!({"allowPause": true})).await;
    let op = f.operator(&[]);
    let obj: iam_key_operator::crd::IamAccessKey = serde_json::from_value(json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
        "metadata": {"name": "app", "annotations": {"iam.keyop.dev/paused": "true"}},
        "spec": {"userName": f.user},
    }))
    .unwrap();
    f.keys_api().create(&Default::default(), &obj).await.unwrap();
    let obj = f.wait_reason("app", "Paused").await;
    assert!(ready(&obj).unwrap().2.contains(&format!("allow-{}", f.ns)), "names the policy that allows it");
    assert!(condition(&obj, "PolicyOverride").is_none(), "an allowed pause overrules nothing");
    assert!(f.iam_keys().await.is_empty());
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0);
    let unpause = json!({"metadata": {"annotations": {"iam.keyop.dev/paused": null}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&unpause)).await.unwrap();
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();

    // An allowed pause holds the deletion too, until it is lifted.
    let pause = json!({"metadata": {"annotations": {"iam.keyop.dev/paused": "true"}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&pause)).await.unwrap();
    f.wait_reason("app", "Paused").await;
    let paused = op.reconciles(Some("Paused")).await;
    f.delete("app").await;
    // The deletion's reconcile and one retry past its backoff, both held by the pause.
    op.wait_reconciles(Some("Paused"), paused + 2).await;
    assert!(f.keys_api().get_opt("app").await.unwrap().is_some(), "a paused deletion waits");
    assert_eq!(f.iam_keys().await.get(&id).map(String::as_str), Some("Active"));
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&unpause)).await.unwrap();
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty(), "deleted once unpaused");
}

#[tokio::test]
async fn second_resource_naming_a_claimed_user_gets_user_claimed() {
    let f = Fixture::new("claim").await;
    let _op = f.operator(&[]);
    f.create("first", json!({})).await;
    f.wait_ready("first").await;
    f.create("second", json!({"secret": {"name": "second"}})).await;
    let obj = f.wait_reason("second", "UserClaimed").await;
    assert!(ready(&obj).unwrap().2.contains(&format!("{CLUSTER}/{}/first", f.ns)));
    assert_eq!(f.iam_keys().await.len(), 1, "no key created for the second resource");
}

#[tokio::test]
async fn converged_resource_makes_no_writes_over_several_resyncs() {
    // Counting: alone in its environment, so no other test's policy change wakes the operator.
    let f = Fixture::private("quiet").await;
    // Both timers at 3s: the resync and the last-use read (whose first reading is written once).
    let op = f.operator(&[("IKO_LAST_USED_REFRESH", "3s")]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
    f.wait_for("app", Duration::from_secs(20), "lastUsed", |o| {
        o.status.as_ref().is_some_and(|s| s.last_used.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let iam_writes = op.iam_calls(IAM_WRITES).await;
    let kube_writes = op.kube_writes().await;
    let lists = op.iam_calls(&["ListAccessKeys"]).await;
    let last_use_reads = op.iam_calls(&["GetAccessKeyLastUsed"]).await;
    let rv = f.keys_api().get("app").await.unwrap().metadata.resource_version;
    // This spans three periods of both timers (3s ± 10%).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let lists = op.iam_calls(&["ListAccessKeys"]).await - lists;
    let last_use_reads = op.iam_calls(&["GetAccessKeyLastUsed"]).await - last_use_reads;
    assert!(lists >= 2, "resyncs happened (drift checks): {lists}");
    // One reconcile per period, each with one read of each kind: no hot loop, and the two timers
    // share their reconciles.
    assert!(lists <= 4, "{lists} ListAccessKeys in 10 s: more reconciles than resyncs");
    assert!((2..=4).contains(&last_use_reads), "{last_use_reads} last-use reads in 10 s at a 3 s refresh");
    assert_eq!(op.iam_calls(IAM_WRITES).await, iam_writes, "no IAM writes once converged");
    // Last use is read every period and written only when it changes (it does not here).
    assert_eq!(op.kube_writes().await, kube_writes, "no Kubernetes writes once converged");
    assert_eq!(f.keys_api().get("app").await.unwrap().metadata.resource_version, rv, "resource untouched");
}

#[tokio::test]
async fn changing_the_secret_layout_rewrites_the_secret_with_the_same_key() {
    let f = Fixture::new("layout").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"secret": {"labels": {"team": "a"}}})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    let (_, secret) = f.secret_creds("app").await.unwrap();
    let patch = json!({"spec": {"secret": {"format": "CredentialsFile", "profile": "p", "labels": {"team": "b"}}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = f.secrets().get("app").await.unwrap();
        if s.data.as_ref().is_some_and(|d| d.contains_key("credentials")) {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "Secret not rewritten");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let data = s.data.unwrap();
    assert_eq!(data.len(), 1, "only the credentials file is left");
    let file = String::from_utf8(data["credentials"].0.clone()).unwrap();
    assert_eq!(file, format!("[p]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n"));
    assert_eq!(s.metadata.labels.unwrap()["team"], "b");
    assert_eq!(f.iam_keys().await.len(), 1, "same key, no rotation");
    f.wait_ready("app").await;
}

/// Pairs of resources (each with its own IAM user) race for the same Secret name: one of each
/// pair publishes; the other's key, verified but never published, is deleted before the
/// resource settles on SecretConflict. No key exists that no Secret holds.
#[tokio::test]
async fn pairs_racing_for_one_secret_name_leave_exactly_one_key_per_published_secret() {
    const PAIRS: usize = 50;
    let f = Fixture::new("race").await;
    let iam = f.env.iam_client();
    let users: Vec<String> = (0..PAIRS * 2).map(|i| format!("{}-{i}", f.user)).collect();
    for user in &users {
        iam.create_user().user_name(user).send().await.expect("CreateUser");
    }
    // No client-side rate limit: the race, not the default 10 calls/s, decides the pace.
    let op = Operator::start(f.env, &f.ns, &[], &["--iam-rate", "0"]);
    let creates = (0..PAIRS).flat_map(|pair| {
        let f = &f;
        let users = &users;
        [0, 1].map(move |side| async move {
            let spec = json!({"userName": users[pair * 2 + side], "secret": {"name": format!("shared-{pair}")}});
            f.create(&format!("r{pair}-{side}"), spec).await;
        })
    });
    futures::future::join_all(creates).await;

    let names: Vec<String> = (0..PAIRS).flat_map(|p| [format!("r{p}-0"), format!("r{p}-1")]).collect();
    let mut conflicts = 0;
    for name in &names {
        let obj = f
            .wait_for(name, Duration::from_secs(120), "Ready or SecretConflict", |o| {
                ready(o).is_some_and(|(s, r, _)| s == "True" || r == "SecretConflict")
            })
            .await;
        if ready(&obj).is_some_and(|(_, r, _)| r == "SecretConflict") {
            conflicts += 1;
            assert!(obj.status.as_ref().is_none_or(|s| s.keys.is_empty()), "{name} holds no key: {:?}", obj.status);
        }
    }
    assert_eq!(conflicts, PAIRS, "one resource of each pair publishes, the other is refused");

    let mut keys_in_iam = Vec::new();
    for user in &users {
        keys_in_iam.extend(iam_keys(f.env, user).await.into_keys());
    }
    let mut published = Vec::new();
    for pair in 0..PAIRS {
        let (id, secret) = f.secret_creds(&format!("shared-{pair}")).await.expect("published Secret");
        assert!(keys_in_iam.contains(&id), "the Secret's key {id} exists in IAM");
        assert!(f.env.sts_client(&id, &secret).get_caller_identity().send().await.is_ok(), "shared-{pair} works");
        published.push(id);
    }
    keys_in_iam.sort();
    published.sort();
    assert_eq!(keys_in_iam, published, "the keys in IAM are exactly the published ones");
    let refused = op.log().matches("already exists").count();
    println!(
        "{PAIRS} pairs: {} keys, {conflicts} conflicts, {refused} Secret creates refused as taken",
        published.len()
    );
}
