//! Rotation end to end against the real API server and moto, with short durations: schedule,
//! serial, annotation (and the `rotate` subcommand), slots, restart targets, rollback window,
//! usage-gated retirement, and crashes in the middle of a rotation.

use crate::support;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aws_sdk_iam::types::StatusType;
use iam_key_operator::crd::{IamAccessKey, KeyPhase};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use support::*;

fn current(o: &IamAccessKey) -> Option<String> {
    o.status.as_ref()?.access_key_id.clone()
}

fn phase_of(o: &IamAccessKey, id: &str) -> Option<KeyPhase> {
    o.status.as_ref()?.keys.iter().find(|k| k.access_key_id == id).map(|k| k.phase)
}

async fn wait_new_key(f: &Fixture, old: &str) -> IamAccessKey {
    f.wait_for("app", Duration::from_secs(60), "a new current key", |o| current(o).is_some_and(|id| id != old)).await
}

async fn wait_iam_status(f: &Fixture, id: &str, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let keys = f.iam_keys().await;
        if keys.get(id).map(String::as_str) == want {
            return;
        }
        assert!(Instant::now() < deadline, "key {id}: wanted {want:?} in IAM, have {keys:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn bump_serial(f: &Fixture, serial: i64) {
    let patch = json!({"spec": {"rotation": {"serial": serial}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test]
async fn scheduled_rotation_overlaps_then_retires_the_old_key() {
    let f = Fixture::new("sched").await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"interval": "8s", "gracePeriod": "3s", "retainInactive": "3s"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    let next = f.keys_api().get("app").await.unwrap().status.unwrap().next_rotation_at.expect("nextRotationAt");
    assert!(next.0 > jiff::Timestamp::now(), "next rotation is in the future");

    let obj = wait_new_key(&f, &first).await;
    let second = current(&obj).unwrap();
    assert_eq!(phase_of(&obj, &first), Some(KeyPhase::Draining));
    assert_eq!(f.iam_keys().await[&first], "Active", "old key Active during the grace period");
    let (id, secret) = f.secret_creds("app").await.unwrap();
    assert_eq!(id, second);
    assert!(f.authenticates(&id, &secret).await, "new key works");
    assert_eq!(obj.status.as_ref().unwrap().rotation.as_ref().unwrap().last_reason.as_deref(), Some("Schedule"));

    wait_iam_status(&f, &first, Some("Inactive")).await;
    wait_iam_status(&f, &first, None).await;
    f.wait_ready("app").await;
    op.assert_log_free_of(&secret);
}

#[tokio::test]
async fn serial_bump_rotates_once() {
    let f = Fixture::new("serial").await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1h"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    bump_serial(&f, 1).await;
    let obj = wait_new_key(&f, &first).await;
    let second = current(&obj).unwrap();
    assert_eq!(obj.status.as_ref().unwrap().rotation.as_ref().unwrap().serial, 1);
    op.wait_more_reconciles(Some("ok"), 2).await;
    assert_eq!(current(&f.keys_api().get("app").await.unwrap()).unwrap(), second, "one rotation per bump");
    f.assert_consistent("app", &[]).await;
}

#[tokio::test]
async fn rotate_subcommand_sets_the_annotation_and_rotates() {
    let f = Fixture::new("annot").await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    let out =
        f.env.command(env!("CARGO_BIN_EXE_iam-key-operator")).args(["rotate", "-n", &f.ns, "app"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let obj = wait_new_key(&f, &first).await;
    let status = obj.status.unwrap();
    assert_eq!(status.rotation.as_ref().unwrap().last_reason.as_deref(), Some("Requested"));
    let requested = obj.metadata.annotations.unwrap()["iam.keyop.dev/rotate-requested-at"].clone();
    assert_eq!(status.rotation.unwrap().requested_at, Some(requested));
}

#[tokio::test]
async fn rotation_makes_room_by_deleting_our_retired_key_but_never_a_foreign_one() {
    let f = Fixture::new("slots").await;
    let _op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1h"}})).await;
    let a = current(&f.wait_ready("app").await).unwrap();
    bump_serial(&f, 1).await;
    let b = current(&wait_new_key(&f, &a).await).unwrap();
    wait_iam_status(&f, &a, Some("Inactive")).await;
    // Two keys: our current B and our retired A. The next rotation deletes A early to make room.
    bump_serial(&f, 2).await;
    let c = current(&wait_new_key(&f, &b).await).unwrap();
    assert!(!f.iam_keys().await.contains_key(&a), "retired key deleted to make room");
    assert_ne!(c, a);
    f.wait_ready("app").await;

    // With a foreign key in the other slot there is no room: wait, touch nothing.
    let g = Fixture::new("slots-foreign").await;
    let foreign = g.foreign_key().await;
    let _op2 = g.operator(&[]);
    g.create("app", json!({"rotation": {"gracePeriod": "1s"}})).await;
    let mine = current(&g.wait_ready("app").await).unwrap();
    bump_serial(&g, 1).await;
    let obj = g.wait_reason("app", "KeyLimitExceeded").await;
    assert!(ready(&obj).unwrap().2.contains(&foreign));
    let keys = g.iam_keys().await;
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[&foreign], "Active");
    assert_eq!(keys[&mine], "Active", "current key kept while waiting");
    // Once the foreign key is gone, the rotation goes through.
    g.env.iam_client().delete_access_key().user_name(&g.user).access_key_id(&foreign).send().await.unwrap();
    g.wait_for("app", Duration::from_secs(60), "rotated", |o| current(o).is_some_and(|id| id != mine)).await;
}

#[tokio::test]
async fn restart_targets_are_patched_once_per_key() {
    let f = Fixture::new("restart").await;
    let deployments: Api<Deployment> = Api::namespaced(f.client.clone(), &f.ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        }
    }))
    .unwrap();
    deployments.create(&Default::default(), &deployment).await.unwrap();
    let op = f.operator(&[]);
    let targets = json!([{"kind": "Deployment", "name": "web"}, {"kind": "StatefulSet", "name": "missing"}]);
    f.create("app", json!({"restartTargets": targets, "rotation": {"gracePeriod": "1s"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    let annotation = |d: &Deployment| {
        d.spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get("iam.keyop.dev/restarted-for").cloned())
    };
    let d = deployments.get("web").await.unwrap();
    assert_eq!(annotation(&d).as_deref(), Some(first.as_str()));
    let generation = d.metadata.generation;
    op.wait_more_reconciles(Some("ok"), 2).await;
    assert_eq!(deployments.get("web").await.unwrap().metadata.generation, generation, "no restart loop");

    bump_serial(&f, 1).await;
    let second = current(&wait_new_key(&f, &first).await).unwrap();
    f.wait_for("app", Duration::from_secs(30), "restartedFor", |o| {
        o.status.as_ref().and_then(|s| s.restarted_for.clone()) == Some(second.clone())
    })
    .await;
    assert_eq!(annotation(&deployments.get("web").await.unwrap()).as_deref(), Some(second.as_str()));
}

#[tokio::test]
async fn admin_reactivating_the_old_key_during_the_rollback_window_is_not_fought() {
    let f = Fixture::new("rollback").await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1h"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    bump_serial(&f, 1).await;
    wait_new_key(&f, &first).await;
    wait_iam_status(&f, &first, Some("Inactive")).await;
    f.env
        .iam_client()
        .update_access_key()
        .user_name(&f.user)
        .access_key_id(&first)
        .status(StatusType::Active)
        .send()
        .await
        .unwrap();
    op.wait_more_reconciles(Some("ok"), 2).await;
    assert_eq!(f.iam_keys().await[&first], "Active", "the admin's rollback stands");
    assert_eq!(phase_of(&f.keys_api().get("app").await.unwrap(), &first), Some(KeyPhase::Inactive));
}

#[tokio::test]
async fn wait_for_unused_keeps_the_old_key_while_a_client_uses_it() {
    let f = Fixture::new("unused").await;
    let op = f.operator(&[]);
    let rotation = json!({"gracePeriod": "1s", "retainInactive": "1h", "waitForUnused": true, "usageCheckInterval": "5s", "maxWait": "5m"});
    f.create("app", json!({"rotation": rotation})).await;
    f.wait_ready("app").await;
    let (old, old_secret) = f.secret_creds("app").await.unwrap();

    // A client that keeps signing requests with the old key; it notes its longest pause between
    // answered requests (under load, moto may answer slowly: a 5 s pause is no longer "in use").
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, sts) = (stop.clone(), f.env.sts_client(&old, &old_secret));
        tokio::spawn(async move {
            let (mut last, mut longest) = (std::time::Instant::now(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                if sts.get_caller_identity().send().await.is_ok() {
                    longest = longest.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            longest
        })
    };
    bump_serial(&f, 1).await;
    wait_new_key(&f, &old).await;
    // Past the grace period and two usage checks (5 s apart), each finding the old key in use.
    tokio::time::sleep(Duration::from_secs(1)).await;
    op.wait_more_reconciles(Some("ok"), 3).await;
    let obj = f.keys_api().get("app").await.unwrap();
    let phase = phase_of(&obj, &old);
    if phase != Some(KeyPhase::Draining) {
        stop.store(true, Ordering::Relaxed);
        let longest = client.await.unwrap();
        panic!("held while in use: {phase:?}; the client's longest pause between answers: {longest:?}");
    }
    assert_eq!(f.iam_keys().await[&old], "Active");

    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    wait_iam_status(&f, &old, Some("Inactive")).await;
    op.assert_log_free_of(&old_secret);
}

async fn crash_during_rotation(point: &str) {
    let f = Fixture::new(&format!("rot-{}", point.replace('-', ""))).await;
    let mut op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "2s", "retainInactive": "2s"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    op.restart(&[("IKO_FAILPOINT", point)]);
    bump_serial(&f, 1).await;
    op.wait_exit(Duration::from_secs(60)).await;
    // Until recovery, the old key is still published and works.
    let (id, secret) = f.secret_creds("app").await.unwrap();
    assert!(f.authenticates(&id, &secret).await, "the published key works right after the crash");

    op.restart(&[]);
    let obj = wait_new_key(&f, &first).await;
    assert_eq!(obj.status.as_ref().unwrap().keys.len(), 2, "new current + draining old");
    // The old key retires and goes (grace 2s, retain 2s); compare IAM and status once both settled.
    f.wait_for("app", Duration::from_secs(60), "the old key gone from status", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1) && ready(o).is_some_and(|r| r.0 == "True")
    })
    .await;
    wait_iam_status(&f, &first, None).await;
    f.assert_consistent("app", &[]).await;
}

#[tokio::test]
async fn crash_during_rotation_after_create() {
    crash_during_rotation("after-create-key").await;
}

#[tokio::test]
async fn crash_during_rotation_after_tag() {
    crash_during_rotation("after-tag").await;
}

#[tokio::test]
async fn crash_during_rotation_after_secret() {
    crash_during_rotation("after-secret").await;
}

#[tokio::test]
async fn crash_during_rotation_before_status() {
    crash_during_rotation("before-status").await;
}

/// The kustomize base (`deploy/`) installs its own RBAC: a first key, a rotation (the Secret is
/// replaced), a layout change, leader election and deletion all work under it. The operator's
/// Drop fails the test if the API server refused any call.
#[tokio::test]
async fn rotation_and_deletion_work_under_the_kustomize_rbac() {
    let f = Fixture::new("kustomize").await;
    let lease = format!("lease-{}", f.ns);
    let _op = Operator::start_as(
        identity::kustomize(f.env),
        f.env,
        &f.ns,
        &[("POD_NAME", "kustomize-0")],
        &["--leader-elect", "--lease-name", &lease],
    );
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    bump_serial(&f, 1).await;
    let rotated = wait_new_key(&f, &first).await;
    let second = current(&rotated).unwrap();
    wait_iam_status(&f, &first, None).await;
    let relayout = json!({"spec": {"secret": {"format": "CredentialsFile"}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&relayout)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = f.secrets().get("app").await.unwrap().data.unwrap_or_default();
        if let Some(file) = data.get("credentials") {
            assert!(String::from_utf8_lossy(&file.0).contains(&second), "same key, new layout");
            break;
        }
        assert!(Instant::now() < deadline, "the Secret was not rewritten in the credentials-file layout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty(), "deletion removed the key");
}

/// Calls between two snapshots of `Operator::iam_calls_by_operation`.
fn calls_between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after.iter().map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0))).filter(|(_, n)| *n > 0).collect()
}

#[tokio::test]
async fn a_first_key_and_a_rotation_take_few_iam_calls() {
    // Counting: alone in its environment, so no other test's policy change wakes the operator.
    let f = Fixture::private("calls").await;
    let op = f.operator(&[]);
    let total = |calls: &BTreeMap<String, u64>| calls.values().sum::<u64>();
    let start = op.iam_calls_by_operation().await;
    f.create("app", json!({"rotation": {"gracePeriod": "2s", "retainInactive": "1h"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    let created = op.iam_calls_by_operation().await;
    let first_key = calls_between(&start, &created);
    bump_serial(&f, 1).await;
    let second = current(&wait_new_key(&f, &first).await).unwrap();
    let rotated = op.iam_calls_by_operation().await;
    let new_key = calls_between(&created, &rotated);
    wait_iam_status(&f, &first, Some("Inactive")).await;
    f.wait_for("app", Duration::from_secs(30), "the old key retired", |o| {
        phase_of(o, &first) == Some(KeyPhase::Inactive)
    })
    .await;
    let retired = calls_between(&rotated, &op.iam_calls_by_operation().await);
    println!(
        "IAM/STS calls: first key {} {first_key:?}; rotation to {second}: new key {} {new_key:?}, retiring the old one {} {retired:?}",
        total(&first_key),
        total(&new_key),
        total(&retired)
    );
    // The first key: list the keys, read the user (claim, ARN, path), create, tag the key and
    // claim the user in one TagUser, verify the key with STS.
    assert!(total(&first_key) <= 5, "first key: {first_key:?}");
    assert_eq!(first_key.get("TagUser"), Some(&1), "{first_key:?}");
    // A rotation's new key: list the keys, create, tag, verify (the user's ARN is known, and a
    // new key changes no existing one, so the tags are not read).
    assert_eq!(total(&new_key), 4, "rotation, new key: {new_key:?}");
    assert_eq!(new_key.get("GetUser"), None, "{new_key:?}");
    // Retiring the old key: list the keys, prove from the tags that it is ours, deactivate it.
    assert!(total(&retired) <= 3, "rotation, retiring the old key: {retired:?}");
}
