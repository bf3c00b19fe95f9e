//! Running it like a platform team would: leader election between replicas, metrics, probes,
//! and scoping by label selector.

mod support;

use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

async fn reconciles(op: &Operator) -> u64 {
    op.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("iam_key_operator_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over_when_it_dies() {
    let f = Fixture::new("leader").await;
    // The Lease lives in the installed identity's namespace, where its RBAC allows it.
    let lease_name = format!("lease-{}", f.ns);
    let lease = ["--leader-elect", "--lease-name", &lease_name, "--lease-duration", "4s"];
    let mut first = Operator::start(f.env, &f.ns, &[("POD_NAME", "first")], &lease);
    // Let the first one take the lease before the second starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = Operator::start(f.env, &f.ns, &[("POD_NAME", "second")], &lease);
    f.create("app", json!({})).await;
    let key = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    assert!(reconciles(&first).await > 0, "the leader reconciles");
    assert_eq!(reconciles(&second).await, 0, "the standby does not");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", second.metrics_port)).await.unwrap();
    assert!(ready.status().is_success(), "a standby is ready (rollouts must not stall on it)");

    first.kill();
    let killed = Instant::now();
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "rotation by the standby", |o| {
        o.status.as_ref().and_then(|s| s.access_key_id.clone()).is_some_and(|id| id != key)
    })
    .await;
    let failover = killed.elapsed();
    // The reconcile that rotated is counted when it returns, a moment after its status write.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reconciles(&second).await == 0 {
        assert!(Instant::now() < deadline, "the standby never reconciled:\n{}", tail(&second.log(), 30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failover < Duration::from_secs(15), "took over within the lease duration plus a retry: {failover:?}");
    println!("failover after SIGKILL of the leader: {failover:?}");
}

#[tokio::test]
async fn metrics_and_probes_answer() {
    let f = Fixture::new("metrics").await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    f.wait_ready("app").await;
    let base = format!("http://127.0.0.1:{}", op.metrics_port);
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let text = op.metrics().await;
    for name in [
        "iam_key_operator_reconciles_total{result=\"ok\"}",
        "iam_key_operator_reconcile_duration_seconds_bucket",
        "iam_key_operator_iam_calls_total{operation=\"CreateAccessKey\",outcome=\"ok\"} 1",
        "iam_key_operator_rotations_total{reason=\"Initial\"} 1",
        &format!("iam_key_operator_condition{{namespace=\"{}\",name=\"app\",reason=\"Ready\"}} 1", f.ns),
        &format!("iam_key_operator_keys_managed{{namespace=\"{}\",name=\"app\"}} 1", f.ns),
        &format!("iam_key_operator_key_age_seconds{{namespace=\"{}\",name=\"app\"}}", f.ns),
        &format!("iam_key_operator_rotation_overdue{{namespace=\"{}\",name=\"app\"}} 0", f.ns),
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
}

#[tokio::test]
async fn selector_limits_what_an_instance_reconciles() {
    let f = Fixture::new("shard").await;
    let _op = Operator::start(f.env, &f.ns, &[], &["--selector", "shard=a"]);
    let mut obj: iam_key_operator::crd::IamAccessKey = serde_json::from_value(
        json!({"metadata": {"name": "other", "labels": {"shard": "b"}}, "spec": {"userName": f.user}}),
    )
    .unwrap();
    f.keys_api().create(&Default::default(), &obj).await.unwrap();
    obj.metadata.name = Some("mine".into());
    obj.metadata.labels = Some([("shard".to_string(), "a".to_string())].into());
    obj.spec.secret.name = Some("mine".into());
    f.keys_api().create(&Default::default(), &obj).await.unwrap();
    f.wait_ready("mine").await;
    let other = f.keys_api().get("other").await.unwrap();
    assert!(other.status.is_none() && other.metadata.finalizers.is_none(), "shard b untouched by the shard a instance");
}

/// A cluster renamed without `--previous-cluster-name` finds every user claimed by its former
/// self; with it, each resource takes over its tags (no new key) and rotation goes on.
#[tokio::test]
async fn renaming_the_cluster_takes_over_the_old_tags_and_rotation_goes_on() {
    let f = Fixture::new("rename").await;
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    let old = Operator::start(f.env, &f.ns, &[], &["--cluster-name", "old-name"]);
    f.create("app", spec).await;
    let first = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    drop(old);

    let renamed = Operator::start(f.env, &f.ns, &[], &["--cluster-name", "new-name"]);
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    f.wait_reason("app", "UserClaimed").await;
    drop(renamed);

    let _op =
        Operator::start(f.env, &f.ns, &[], &["--cluster-name", "new-name", "--previous-cluster-name", "old-name"]);
    let rotated = f
        .wait_for("app", Duration::from_secs(60), "rotated under the new name", |o| {
            o.status
                .as_ref()
                .is_some_and(|s| s.access_key_id.as_deref().is_some_and(|id| id != first) && s.keys.len() == 1)
        })
        .await;
    let second = rotated.status.unwrap().access_key_id.unwrap();
    let tags = f.user_tags().await;
    assert_eq!(tags["iam.keyop.dev/owner"], format!("new-name/{}/app", f.ns), "the claim moved");
    assert_eq!(tags[&second], format!("iam-key-operator:new-name/{}/app", f.ns));
    assert!(!tags.values().any(|v| v.contains("old-name")), "no tag of the old name is left: {tags:?}");
    let events = f.env.kubectl(["get", "events.events.k8s.io", "-n", &f.ns, "-o", "jsonpath={.items[*].reason}"]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("OwnershipRenamed"));
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty());
}
