//! Fault suite: whatever fails, and whenever, the operator converges to exactly the keys it
//! records, every Secret it wrote holds a key that works, it never touches a key that is not its
//! own, and it never hammers IAM.
//!
//! Faults are real: IAM errors, delays and outages come from a proxy in front of moto
//! (`testenv::proxy`), the API server is a real process killed and started again, and the
//! operator is SIGKILLed at random moments. The figures each test prints (`--nocapture`) are
//! the ones `docs/reliability.md` reports.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::support::*;
use crate::{etcd, soak};
use futures::StreamExt;
use iam_key_operator::crd::{IamAccessKey, IamAccessKeyPolicy, KeyPhase};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use testenv::{
    TestEnv,
    proxy::{self, FaultProxy, Faults, Outcome, by_action, by_outcome, max_in_window, per_second},
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// An operator for the fixture's namespace that reaches IAM and STS through the proxy.
fn via_proxy(f: &Fixture, proxy: &FaultProxy, args: &[&str]) -> Operator {
    let envs = proxy.operator_env();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Operator::start(f.env, &f.ns, &envs, args)
}

/// `n` IAM users named `<fixture user>-<i>` (the fixture's policy allows `<fixture user>*`).
async fn make_users(f: &Fixture, n: usize) -> Vec<String> {
    let iam = f.env.iam_client();
    let mut users = Vec::with_capacity(n);
    for i in 0..n {
        let user = format!("{}-{i}", f.user);
        iam.create_user().user_name(&user).send().await.expect("CreateUser");
        users.push(user);
    }
    users
}

async fn create_for(f: &Fixture, name: &str, user: &str, mut spec: serde_json::Value) {
    spec["userName"] = user.into();
    f.create(name, spec).await;
}

/// Every resource of the namespace by name.
async fn list(f: &Fixture) -> BTreeMap<String, IamAccessKey> {
    let items = f.keys_api().list(&ListParams::default()).await.expect("list").items;
    items.into_iter().map(|o| (o.metadata.name.clone().unwrap_or_default(), o)).collect()
}

fn reason(o: &IamAccessKey) -> String {
    ready(o).map(|(_, r, _)| r).unwrap_or_default()
}

/// The Ready reasons of the fixture's resources, sampled every half second until `end`, with
/// how often each was seen.
async fn reasons_until(f: &Fixture, end: Instant) -> BTreeMap<String, usize> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    while Instant::now() < end {
        for o in list(f).await.values() {
            *seen.entry(reason(o)).or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen
}

fn is_ready(o: &IamAccessKey) -> bool {
    ready(o).is_some_and(|(s, _, _)| s == "True")
}

/// Ready, one key (the current one), nothing pending, the latest spec seen.
fn settled(o: &IamAccessKey) -> bool {
    let Some(s) = o.status.as_ref() else { return false };
    is_ready(o)
        && s.observed_generation == o.metadata.generation
        && s.pending_create.is_none()
        && s.keys.len() == 1
        && s.keys[0].phase == KeyPhase::Current
}

/// Wait until `check` holds for every named resource; returns how long it took.
async fn wait_all(
    f: &Fixture,
    names: &[String],
    timeout: Duration,
    what: &str,
    check: impl Fn(&IamAccessKey) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let all = list(f).await;
        let failing: Vec<String> = names
            .iter()
            .filter(|n| !all.get(*n).is_some_and(&check))
            .map(|n| match all.get(n) {
                Some(o) => format!("{n}: {:?}", ready(o)),
                None => format!("{n}: missing"),
            })
            .collect();
        if failing.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}; not yet:\n  {}", failing.join("\n  "));
        }
        // Listing many resources is not free: poll less often when there are many.
        tokio::time::sleep(Duration::from_millis(250).max(Duration::from_millis(5) * names.len() as u32)).await;
    }
}

/// IAM holds exactly the keys status names (plus `foreign`), the Secret holds the current key
/// and it authenticates as the user.
async fn assert_user_consistent(f: &Fixture, name: &str, user: &str, foreign: &[String]) {
    let obj = f.keys_api().get(name).await.expect("get");
    let status = obj.status.clone().expect("status");
    let mut expected: BTreeSet<String> = status.keys.iter().map(|k| k.access_key_id.clone()).collect();
    expected.extend(foreign.iter().cloned());
    let actual: BTreeSet<String> = iam_keys(f.env, user).await.into_keys().collect();
    assert_eq!(actual, expected, "{name}: IAM keys of {user} vs status.keys + foreign keys");
    let secret = status.secret_name.clone().expect("status.secretName");
    let (id, key) = f.secret_creds(&secret).await.expect("Secret with credentials");
    assert_eq!(Some(&id), status.access_key_id.as_ref(), "{name}: the Secret holds the current key");
    assert!(authenticates_as(f.env, &id, &key, user).await, "{name}: the Secret's key authenticates as {user}");
    assert!(status.pending_create.is_none(), "{name}: no create left pending");
}

/// How many times a resource failing without pause wakes up from its backoff within `window`:
/// the n-th consecutive failure waits at least `0.9 * base * 2^(n-1)` (base 2 s for retryable
/// errors, 5 s for the others; ±10% jitter), so k wake-ups need at least
/// `0.9 * base * (2^k - 1)` seconds.
fn backoff_wakeups(window: Duration, base_secs: f64) -> u32 {
    let min = 0.9 * base_secs;
    let mut k = 0;
    while min * (2f64.powi(k as i32 + 1) - 1.0) <= window.as_secs_f64() {
        k += 1;
    }
    k
}

/// Changes of IamAccessKeyPolicy objects (every test's Fixture writes one) seen since start.
/// Each change makes the operator look at all its resources again, whatever their backoff, so
/// the call bounds below allow one more reconcile per change.
struct PolicyChanges {
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyChanges {
    async fn start(f: &Fixture) -> PolicyChanges {
        let api: Api<IamAccessKeyPolicy> = Api::all(f.client.clone());
        let count = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let counter = count.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    // A relist after the first counts too: the operator's watch relists as well.
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(watcher::Event::Init) if ready.is_none() => {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
        PolicyChanges { count, task }
    }

    fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for PolicyChanges {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// HTTP requests per IAM operation: the operator turns the SDK's retries off (a retry would
/// bypass the rate limiter; the reconcile's backoff retries instead).
const SDK_ATTEMPTS: usize = 1;

/// Lines of the per-resource condition gauge with this reason.
fn condition_gauges(metrics: &str, reason: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("iam_key_operator_condition{") && l.contains(&format!("reason=\"{reason}\"")))
        .filter(|l| l.ends_with(" 1"))
        .count()
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn keys_created_since(proxy: &FaultProxy, since: Instant) -> usize {
    proxy.calls_since(since).iter().filter(|c| c.action == "CreateAccessKey" && c.outcome.reached_iam()).count()
}

// ---------------------------------------------------------------------------------------------
// IAM throttling and 5xx

#[tokio::test]
async fn throttling_and_server_errors_show_in_conditions_back_off_and_converge() {
    const N: usize = 8;
    const FULL: Duration = Duration::from_secs(15);
    const PARTIAL: Duration = Duration::from_secs(15);
    let f = Fixture::new("throttle").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    // No client-side rate limit: only the backoff stands between a failing resource and IAM.
    let op = via_proxy(&f, &proxy, &["--iam-rate", "0"]);
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    for i in 0..N / 2 {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all[..N / 2], Duration::from_secs(60), "Ready", is_ready).await;
    let before = proxy.calls().len();

    // Phase 1: IAM throttles every call. Half the resources are Ready (their next resync fails),
    // half are created now.
    let policies = PolicyChanges::start(&f).await;
    proxy.set(Faults::throttle(1.0));
    let t1 = Instant::now();
    let changes_before = policies.get();
    for i in N / 2..N {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all, Duration::from_secs(30), "reason Throttled", |o| reason(o) == "Throttled").await;
    let obj = f.keys_api().get(&all[0]).await.unwrap();
    let message = ready(&obj).unwrap().2;
    assert!(message.contains("throttled") && message.contains("Rate exceeded"), "clear message: {message}");
    assert_eq!(condition_gauges(&op.metrics().await, "Throttled"), N, "condition gauge per resource");
    tokio::time::sleep((t1 + FULL).saturating_duration_since(Instant::now())).await;
    let phase1 = proxy.calls_since(t1);
    let changes = policies.get() - changes_before;

    // Phase 2: 50% Throttling, and 20% of the rest 500/503.
    proxy.set(Faults { throttle: 0.5, server_error: 0.2, ..Faults::none() });
    let t2 = Instant::now();
    let seen = reasons_until(&f, t2 + PARTIAL).await;
    let phase2 = proxy.calls_since(t2);
    // Throttling and 5xx show as what they are, and nothing else: all were Throttled when the
    // phase began.
    assert!(seen.contains_key("Throttled"), "reasons seen under partial faults: {seen:?}");
    let expected = ["Ready", "Throttled", "IamUnavailable"];
    assert!(seen.keys().all(|r| expected.contains(&r.as_str())), "reasons seen under partial faults: {seen:?}");

    // Phase 3: no faults.
    proxy.set(Faults::none());
    // A resource may be waiting out its backoff when the faults stop: at most the 5 minute cap
    // (+10% jitter).
    let converge = wait_all(&f, &all, Duration::from_secs(360), "settled after the faults", settled).await;
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
        assert_eq!(iam_keys(f.env, user).await.len(), 1, "{name}: one key, none created twice");
    }

    // Bound of phase 1: every reconcile stops at its first IAM call (ListAccessKeys), one HTTP
    // request. Reconciles per resource: the first (creation or resync), one more for slack (the
    // finalizer's event of a resource created during the fault), the backoff wake-ups, and one
    // per policy change in the cluster. Status writes do not trigger reconciles.
    let wakeups = backoff_wakeups(FULL, 2.0) as usize;
    let bound = N * SDK_ATTEMPTS * (2 + wakeups + changes);
    let (max1s, _) = max_in_window(&phase1, Duration::from_secs(1));
    println!(
        "throttling: {N} resources; 100% Throttling for {FULL:?}: {} calls (bound {bound} = {N} x {SDK_ATTEMPTS} x (2 + {wakeups} + {changes} policy changes)), max {max1s} in 1 s; \
         50% Throttling + 10% 5xx for {PARTIAL:?}: {} calls {:?}, Ready reasons seen {seen:?}; \
         settled {:.1}s after the faults stopped; calls before faults {before}, total {}; by action {:?}",
        phase1.len(),
        phase2.len(),
        by_outcome(&phase2),
        converge.as_secs_f64(),
        proxy.calls().len(),
        by_action(&proxy.calls_since(t1)),
    );
    assert!(phase1.len() <= bound, "{} calls during full throttling exceed the backoff bound {bound}", phase1.len());
    assert!(phase1.iter().all(|c| c.action == "ListAccessKeys"), "nothing but observation under full throttling");
    op.assert_log_free_of(&f.secret_creds(&all[0]).await.unwrap().1);
}

#[tokio::test]
async fn backoff_holds_when_the_error_changes_every_time() {
    const N: usize = 4;
    const WINDOW: Duration = Duration::from_secs(40);
    let f = Fixture::new("alternate").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    // Every failed operation ends with another error than the previous one (Throttled,
    // IamUnavailable, Throttled, ...): each failure changes the Ready condition.
    proxy.set(Faults { alternate_errors: true, ..Faults::none() });
    let policies = PolicyChanges::start(&f).await;
    let op = via_proxy(&f, &proxy, &["--iam-rate", "0"]);
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    tokio::time::sleep(WINDOW.saturating_sub(t0.elapsed())).await;
    let calls = proxy.calls_since(t0);
    let changes = policies.get();
    let kube_writes = op.kube_writes().await;
    let reconciles: u64 = op
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("iam_key_operator_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    // As in the throttling test: first reconcile and one for slack, backoff wake-ups, policy
    // changes; each stops at its first operation. Before the watch ignored status-only changes,
    // each changed condition started the next reconcile at once: 1,021 calls here.
    let wakeups = backoff_wakeups(WINDOW, 2.0) as usize;
    let bound = N * SDK_ATTEMPTS * (2 + wakeups + changes);
    println!(
        "alternating errors: {N} resources, every call failing with Throttling and 503 in turn for {WINDOW:?}: {} calls \
         (bound {bound} = {N} x {SDK_ATTEMPTS} x (2 + {wakeups} + {changes} policy changes)); per resource {:?}; \
         {reconciles} reconciles, {kube_writes} status writes",
        calls.len(),
        users
            .iter()
            .map(|u| calls.iter().filter(|c| c.user.as_deref() == Some(u.as_str())).count())
            .collect::<Vec<_>>()
    );
    assert!(calls.len() <= bound, "{} calls in {WINDOW:?} exceed the backoff bound {bound}", calls.len());
}

// ---------------------------------------------------------------------------------------------
// IAM outage

#[tokio::test]
async fn iam_outage_then_recovery_creates_each_key_once() {
    const OUTAGE: Duration = Duration::from_secs(20);
    let f = Fixture::new("outage").await;
    let users = make_users(&f, 10).await;
    let all = names("r", 0..10);
    let proxy = fault_proxy(f.env).await;
    let op = via_proxy(&f, &proxy, &[]);
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    for i in 0..6 {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all[..6], Duration::from_secs(60), "Ready", settled).await;
    let keys_before: Vec<String> = {
        let l = list(&f).await;
        all[..6].iter().map(|n| l[n].status.as_ref().unwrap().access_key_id.clone().unwrap()).collect()
    };
    let unavailable_before = unavailable_ops(&op).await;
    let policies = PolicyChanges::start(&f).await;

    // The outage: connections refused. Meanwhile: 4 new resources, 2 rotations, 1 deletion.
    proxy.set(Faults::outage());
    let t0 = Instant::now();
    for i in 6..10 {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    for name in &all[0..2] {
        let patch = json!({"spec": {"rotation": {"serial": 1}}});
        f.keys_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    f.delete(&all[2]).await;
    let live: Vec<String> = all.iter().filter(|n| *n != &all[2]).cloned().collect();
    wait_all(&f, &live, OUTAGE, "reason IamUnavailable", |o| reason(o) == "IamUnavailable").await;
    let obj = f.keys_api().get(&all[6]).await.unwrap();
    let message = ready(&obj).unwrap().2;
    assert!(message.contains("IAM unavailable"), "clear message: {message}");
    tokio::time::sleep((t0 + OUTAGE).saturating_duration_since(Instant::now())).await;
    assert!(f.keys_api().get_opt(&all[2]).await.unwrap().is_some(), "deletion waits for IAM");
    let failed_ops = unavailable_ops(&op).await - unavailable_before;
    let changes = policies.get();

    proxy.set(Faults::none());
    let back = Instant::now();
    let converge = wait_all(&f, &live, Duration::from_secs(180), "settled after the outage", settled).await;
    f.wait_gone(&all[2], Duration::from_secs(60)).await;
    let gone = back.elapsed();

    // Each key was created exactly once: 4 new resources + 2 rotations.
    let created = keys_created_since(&proxy, t0);
    for (name, user) in live.iter().zip(users.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, u)| u)) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    assert!(iam_keys(f.env, &users[2]).await.is_empty(), "the deleted resource's key is gone");
    let l = list(&f).await;
    for (i, name) in all[..2].iter().enumerate() {
        assert_ne!(l[name].status.as_ref().unwrap().access_key_id.as_ref(), Some(&keys_before[i]), "{name} rotated");
    }
    // Operations that failed during the outage: each reconcile stops at its first failed call.
    let wakeups = backoff_wakeups(OUTAGE, 2.0) as usize;
    // Per resource: creation or resync, a spec change or deletion, the backoff wake-ups, and
    // the policy changes.
    let bound = 10 * (2 + wakeups + changes);
    println!(
        "outage: 10 resources, connections refused for {OUTAGE:?}: {failed_ops} IAM operations failed (bound {bound}, {changes} policy changes); \
         settled {:.1}s and deletion done {:.1}s after recovery; CreateAccessKey reaching IAM since the outage began: {created} (expected 6)",
        converge.as_secs_f64(),
        gone.as_secs_f64()
    );
    assert_eq!(created, 6, "each new key created once: 4 new resources + 2 rotations");
    assert!(failed_ops as usize <= bound, "{failed_ops} failed IAM operations during the outage exceed {bound}");
}

async fn unavailable_ops(op: &Operator) -> u64 {
    op.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("iam_key_operator_iam_calls_total{") && l.contains("outcome=\"unavailable\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

// ---------------------------------------------------------------------------------------------
// Responses lost after IAM acted, and slow IAM

/// For each resource: IAM holds exactly the keys status names; on failure, what the proxy saw of
/// the user.
async fn assert_no_extra_keys(f: &Fixture, proxy: &FaultProxy, all: &[String], users: &[String]) {
    let calls = proxy.calls();
    let l = list(f).await;
    let mut leaks = Vec::new();
    for (name, user) in all.iter().zip(users) {
        let status = l[name].status.clone().unwrap_or_default();
        let in_status: BTreeSet<String> = status.keys.iter().map(|k| k.access_key_id.clone()).collect();
        let in_iam: BTreeSet<String> = iam_keys(f.env, user).await.into_keys().collect();
        if in_iam != in_status {
            let trace: Vec<String> = calls
                .iter()
                .filter(|c| c.user.as_deref() == Some(user.as_str()))
                .map(|c| {
                    format!(
                        "{}{} {:?}",
                        c.action,
                        c.key.as_ref().map(|k| format!("({k})")).unwrap_or_default(),
                        c.outcome
                    )
                })
                .collect();
            leaks.push(format!(
                "{name}: IAM {in_iam:?}, status {in_status:?}, status.foreignKeys {}, Ready: {:?}\n    calls: {}",
                status.foreign_keys,
                ready(&l[name]),
                trace.join(", ")
            ));
        }
    }
    assert!(leaks.is_empty(), "keys IAM holds that status does not name:\n  {}", leaks.join("\n  "));
}

#[tokio::test]
async fn lost_responses_and_slow_iam_leave_no_extra_key() {
    const N: usize = 6;
    let f = Fixture::new("dropped").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    let _op = via_proxy(&f, &proxy, &[]);
    // A quarter of the calls reach IAM but their answer is lost (CreateAccessKey too: the key IAM
    // made is found by the pending-create marker and deleted); every call is 300 ms slower.
    proxy.set(Faults { drop_response: 0.25, delay: Duration::from_millis(300), ..Faults::none() });
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Rotate each once, still under the fault.
    for name in &all {
        let patch = json!({"spec": {"rotation": {"serial": 1}}});
        f.keys_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.set(Faults::none());
    let converge = wait_all(&f, &all, Duration::from_secs(180), "settled and rotated", |o| {
        settled(o) && o.status.as_ref().and_then(|s| s.rotation.as_ref()).is_some_and(|r| r.serial == 1)
    })
    .await;
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    let calls = proxy.calls_since(t0);
    println!(
        "lost responses: {N} resources created and rotated while 25% of responses were lost \
         after IAM acted, + 300 ms delay, for 20 s: {} calls {:?}; {} CreateAccessKey; settled {:.1}s after",
        calls.len(),
        by_outcome(&calls),
        keys_created_since(&proxy, t0),
        converge.as_secs_f64(),
    );
}

#[tokio::test]
async fn a_lost_create_access_key_response_leaves_no_extra_key() {
    const N: usize = 3;
    let f = Fixture::new("lostcreate").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults { lose_first_response_of: Some("CreateAccessKey".into()), ..Faults::none() });
    let _op = via_proxy(&f, &proxy, &[]);
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    wait_all(&f, &all, Duration::from_secs(60), "settled", settled).await;
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
}

/// A new key's tag whose answer is lost is tried again at once, with the key's secret still in
/// hand: the key is kept (a later reconcile could only delete it and make another).
#[tokio::test]
async fn a_lost_tag_answer_after_a_create_keeps_the_new_key() {
    const N: usize = 3;
    let f = Fixture::new("losttag").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults { lose_first_response_of: Some("TagUser".into()), ..Faults::none() });
    let _op = via_proxy(&f, &proxy, &[]);
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    wait_all(&f, &all, Duration::from_secs(60), "settled", settled).await;
    let calls = proxy.calls_since(t0);
    let lost = calls.iter().filter(|c| c.action == "TagUser" && c.outcome == Outcome::Dropped).count();
    let deleted = calls.iter().filter(|c| c.action == "DeleteAccessKey").count();
    assert_eq!(lost, N, "every first TagUser answer was lost");
    assert_eq!((keys_created_since(&proxy, t0), deleted), (N, 0), "one key per resource, none deleted");
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
}

#[tokio::test]
async fn a_failed_untag_after_a_key_deletion_leaves_no_tag_behind() {
    let f = Fixture::new("untag").await;
    let proxy = fault_proxy(f.env).await;
    let _op = via_proxy(&f, &proxy, &[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let first = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    // IAM fails every UntagUser for a while (after the SDK's retries): the rotation deletes the
    // old key, then cannot remove its tag.
    proxy.set(Faults { server_error: 1.0, only: vec!["UntagUser".into()], ..Faults::none() });
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while f.iam_keys().await.contains_key(&first) {
        assert!(Instant::now() < deadline, "the old key was never deleted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.set(Faults::none());
    f.wait_for("app", Duration::from_secs(120), "settled", settled).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let tags = f.user_tags().await;
    let calls: Vec<String> = proxy
        .calls()
        .iter()
        .filter(|c| c.key.as_deref() == Some(first.as_str()))
        .map(|c| format!("{} {:?}", c.action, c.outcome))
        .collect();
    assert!(
        !tags.contains_key(&first),
        "the tag of deleted key {first} is still on the user: {tags:?}; calls about the key: {calls:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// API server restart

/// An environment of this test's own (its API server gets killed); never dropped (the child
/// processes end with the test process).
/// A kube-apiserver started by this test with the command line of the one it killed.
struct Restarted(std::process::Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill_apiserver(env: &TestEnv) -> Vec<String> {
    let (_, pid) = env.processes().into_iter().find(|(n, _)| n == "kube-apiserver").expect("kube-apiserver pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let argv: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "kill -KILL {pid}");
    argv
}

fn start_apiserver(env: &TestEnv, argv: &[String]) -> Restarted {
    let log = std::fs::File::options().create(true).append(true).open(env.log_path("kube-apiserver")).unwrap();
    // setpriv: the kernel kills it if this test's thread dies without dropping the guard.
    let child = std::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .args(argv)
        .current_dir(env.dir())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start kube-apiserver again");
    Restarted(child)
}

async fn wait_apiserver_ready(env: &TestEnv, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(client) = env.kube_client().await {
            let keys: Api<IamAccessKey> = Api::all(client);
            if keys.list(&ListParams::default().limit(1)).await.is_ok() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "kube-apiserver not serving IamAccessKeys within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn api_server_restart_watches_recover_and_nothing_is_created_twice() {
    const DOWN: Duration = Duration::from_secs(10);
    let f = Fixture::private("apirestart").await;
    let env = f.env;
    let users = make_users(&f, 6).await;
    let all = names("r", 0..6);
    let proxy = fault_proxy(env).await;
    let mut op = via_proxy(&f, &proxy, &[]);
    // A kube-apiserver that has just started serves requests before its RBAC authorizer has
    // loaded the roles: it refuses the operator for a moment, as a real one does after a restart.
    op.expect_forbidden = true;
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    for i in 0..5 {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all[..5], Duration::from_secs(60), "Ready", settled).await;
    let first_key = list(&f).await[&all[0]].status.as_ref().unwrap().access_key_id.clone().unwrap();

    let killed = Instant::now();
    let argv = kill_apiserver(env);
    tokio::time::sleep(DOWN).await;
    let _apiserver = start_apiserver(env, &argv);
    wait_apiserver_ready(env, Duration::from_secs(120)).await;
    let back = Instant::now();
    let downtime = killed.elapsed();

    // The watches must have come back: a new resource, a rotation and a deletion are all seen.
    let f = Fixture { client: env.kube_client().await.unwrap(), ..f };
    create_for(&f, &all[5], &users[5], spec.clone()).await;
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch(&all[0], &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    f.delete(&all[1]).await;
    let live: Vec<String> = all.iter().filter(|n| *n != &all[1]).cloned().collect();
    let converge = wait_all(&f, &live, Duration::from_secs(120), "settled after the restart", |o| {
        settled(o) && o.status.as_ref().and_then(|s| s.access_key_id.as_ref()) != Some(&first_key)
    })
    .await;
    f.wait_gone(&all[1], Duration::from_secs(60)).await;
    let gone = back.elapsed();
    for (i, name) in all.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_user_consistent(&f, name, &users[i], &[]).await;
    }
    assert!(iam_keys(env, &users[1]).await.is_empty(), "the deleted resource's key is gone");
    let created = keys_created_since(&proxy, killed);
    println!(
        "API server restart: down {:.1}s (killed with SIGKILL, started again on the same etcd); new resource, rotation \
         and deletion settled {:.1}s / {:.1}s after it was back; CreateAccessKey since the kill: {created} (expected 2)",
        downtime.as_secs_f64(),
        converge.as_secs_f64(),
        gone.as_secs_f64()
    );
    assert_eq!(created, 2, "one key for the new resource, one for the rotation: nothing created twice");
    assert!(!op.log().contains("panicked at"), "the operator did not panic");
    op.metrics().await;
}

// ---------------------------------------------------------------------------------------------
// Random kills (small; `make soak` runs the same for longer)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_leak_nothing_and_lose_nothing() {
    let report = soak::random_kills("kills", &soak::Scale::small()).await;
    println!("{report}");
    report.assert_clean();
    assert!(report.kills >= 5, "enough kills to mean something: {}", report.kills);
}

// ---------------------------------------------------------------------------------------------
// Tenancy changes cost IAM calls only where they govern

/// A policy edit or a namespace label change looks again at the resources it may allow or deny,
/// and at no others: in a cluster of 5,000 keys, each edit of one team's rule would otherwise
/// cost 5,000 `ListAccessKeys`.
#[tokio::test]
async fn a_policy_change_looks_again_only_at_the_resources_it_governs() {
    const N: usize = 4;
    let f = Fixture::new("scoped").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    // No resync during the test: every reconcile after the first has a tenancy change as cause.
    let op = via_proxy(&f, &proxy, &["--resync", "10m"]);
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    wait_all(&f, &all, Duration::from_secs(60), "all Ready", settled).await;
    let looked_at = |since: Instant| proxy.calls_since(since).iter().filter(|c| c.action == "ListAccessKeys").count();
    let wait_looked_at = async |since: Instant, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while looked_at(since) < N {
            assert!(Instant::now() < deadline, "{what}: {} of {N} resources looked at again", looked_at(since));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = looked_at(since);
        println!("{what}: {N} resources, {seen} looked at again; {:?}", by_action(&proxy.calls_since(since)));
        assert!(seen <= 2 * N, "{what}: {seen} ListAccessKeys for {N} resources");
    };

    // Quiet first: the reconciles that follow each resource's own writes are over.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.calls_since(Instant::now() - Duration::from_secs(3)).is_empty() {
        assert!(Instant::now() < deadline, "IAM calls go on after every resource settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The operator's own count of the resources each kind of change woke.
    let wakes = async |cause: &str| -> u64 {
        let series = format!("iam_key_operator_tenancy_wakes_total{{cause=\"{cause}\"}} ");
        let text = op.metrics().await;
        text.lines().find_map(|l| l.strip_prefix(series.as_str())?.parse().ok()).unwrap_or(0)
    };

    // Another namespace's policy comes, changes and goes: nothing here is looked at. (A relist
    // of the policies or namespaces, after a watch broke on the loaded API server, looks at
    // everything; the operator counts those apart, and this part is run again then.)
    let elsewhere = format!("{}-elsewhere", f.ns);
    let policies: Api<IamAccessKeyPolicy> = Api::all(f.client.clone());
    for attempt in 1.. {
        let (relists, policy_wakes, t0) = (wakes("relist").await, wakes("policy").await, Instant::now());
        let other = format!("other{attempt}-{}", f.ns);
        f.allow(&other, json!({"namespaces": [elsewhere], "userNames": ["*"]})).await;
        f.allow(&other, json!({"namespaces": [elsewhere], "userNames": ["x*"]})).await;
        policies.delete(&other, &DeleteParams::default()).await.expect("delete the other policy");
        tokio::time::sleep(Duration::from_secs(3)).await;
        if wakes("relist").await > relists && attempt < 3 {
            println!("a relist during attempt {attempt}: again");
            continue;
        }
        let calls = proxy.calls_since(t0);
        let when: Vec<_> = calls.iter().map(|c| (c.action.clone(), c.at.duration_since(t0))).collect();
        let all_wakes = (wakes("relist").await, wakes("policy").await, wakes("namespace").await);
        assert_eq!(
            looked_at(t0),
            0,
            "another namespace's policy changed nothing here: {when:?}; wakes (relist, policy, namespace) {all_wakes:?}"
        );
        assert_eq!(wakes("policy").await, policy_wakes, "no resource here woken by another namespace's policy");
        break;
    }

    // This namespace's rule changes: every resource here is looked at again.
    let (policy_wakes, t1) = (wakes("policy").await, Instant::now());
    f.allow_own_user(json!({"maxKeyAge": "90d"})).await;
    wait_looked_at(t1, "this namespace's rule changed").await;
    assert_eq!(wakes("policy").await - policy_wakes, N as u64, "each resource woken once by its rule's change");

    // This namespace's labels change (a `namespaceSelector` may now match or not).
    let (namespace_wakes, t2) = (wakes("namespace").await, Instant::now());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(f.client.clone());
    let labels = json!({"metadata": {"labels": {"iam-key-operator-test": "relabelled"}}});
    namespaces.patch(&f.ns, &PatchParams::default(), &Patch::Merge(&labels)).await.expect("label the namespace");
    wait_looked_at(t2, "this namespace's labels changed").await;
    assert_eq!(wakes("namespace").await - namespace_wakes, N as u64, "each resource woken once by its namespace");
    let l = list(&f).await;
    assert!(all.iter().all(|name| settled(&l[name])), "still Ready with one key each");
}

// ---------------------------------------------------------------------------------------------
// Rate limiting

#[tokio::test]
async fn iam_rate_limit_holds_for_many_resources_at_once_and_after_a_restart() {
    rate_limit_run("rate", 100, 5, 20).await;
}

/// `make soak` runs this one too: 1,000 resources (IKO_BENCH_RESOURCES) at --iam-rate 20
/// (IKO_BENCH_IAM_RATE), about 10 minutes.
#[tokio::test]
#[ignore = "long: run with `make soak`"]
async fn bench_rate_limit_1000_resources() {
    let env_num = |name: &str, default: usize| -> usize {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    rate_limit_run("bench", env_num("IKO_BENCH_RESOURCES", 1000), env_num("IKO_BENCH_IAM_RATE", 20), 20).await;
}

#[tokio::test]
async fn iam_rate_limit_holds_while_iam_throttles() {
    const N: usize = 60;
    const RATE: usize = 5;
    const BURST: usize = 5;
    const WINDOW: Duration = Duration::from_secs(30);
    let f = Fixture::new("ratethrottled").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults::throttle(0.6));
    let _op = via_proxy(&f, &proxy, &["--iam-rate", &RATE.to_string(), "--iam-burst", &BURST.to_string()]);
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    tokio::time::sleep(WINDOW.saturating_sub(t0.elapsed())).await;
    let calls = proxy.calls_since(t0);
    let (max1s, _) = max_in_window(&calls, Duration::from_secs(1));
    let bound_1s = BURST + RATE * 14 / 10;
    let bound_total = BURST + RATE * (WINDOW.as_secs() as usize + 1);
    println!(
        "rate limit under 60% Throttling: {N} resources, --iam-rate {RATE} --iam-burst {BURST}: {} calls in {WINDOW:?} \
         (bound {bound_total}), max {max1s} in any 1 s (bound {bound_1s}); {:?}",
        calls.len(),
        by_outcome(&calls)
    );
    assert!(calls.len() <= bound_total, "{} calls in {WINDOW:?} exceed {bound_total}", calls.len());
    assert!(max1s <= bound_1s, "{max1s} calls in 1 s exceed {bound_1s}");
}

/// `n` resources applied at once, then a restart with `n` Ready resources; the proxy's count of
/// calls in any 1 s window stays within what the token bucket allows.
async fn rate_limit_run(prefix: &str, n: usize, rate: usize, burst: usize) {
    // In any 1 s window the token bucket grants at most burst + rate calls. The proxy sees a call
    // a little after its grant (signing, scheduling on a loaded machine, loopback); 0.4 s of that
    // shift is allowed for: burst + rate * 1.4 s.
    let bound = burst + rate * 14 / 10;
    let f = Fixture::new(prefix).await;
    let users = make_users(&f, n).await;
    let all = names("r", 0..n);
    let proxy = fault_proxy(f.env).await;
    let args: Vec<String> = ["--iam-rate", &rate.to_string(), "--iam-burst", &burst.to_string(), "--resync", "10m"]
        .map(String::from)
        .to_vec();
    let mut op = soak::start_operator(&f, &proxy, &args);
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    let applied = t0.elapsed();
    // About 8 calls per new resource.
    let timeout = Duration::from_secs(60 + (10 * n / rate) as u64);
    let converge = wait_all(&f, &all, timeout, "all Ready", settled).await;
    let created = proxy.calls_since(t0);
    let (max_created, at) = max_in_window(&created, Duration::from_secs(1));

    // A restart with n Ready resources: each is looked at again.
    op.restart(&[]);
    let t1 = Instant::now();
    let deadline = t1 + Duration::from_secs(60 + (2 * n / rate) as u64);
    while proxy.calls_since(t1).iter().filter(|c| c.action == "ListAccessKeys").count() < n {
        assert!(Instant::now() < deadline, "not every resource was looked at after the restart");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let relist = t1.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = proxy.calls_since(t1);
    let (max_restart, _) = max_in_window(&restarted, Duration::from_secs(1));
    let l = list(&f).await;
    assert!(all.iter().all(|name| is_ready(&l[name])), "still Ready after the restart");
    for (name, user) in all.iter().zip(&users).step_by((n / 10).max(1)) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    // How many whole seconds saw how many calls.
    let mut histogram: BTreeMap<usize, usize> = BTreeMap::new();
    for c in per_second(&created, t0) {
        *histogram.entry(c).or_default() += 1;
    }
    println!(
        "rate limit: {n} resources applied at once (in {:.1}s), --iam-rate {rate} --iam-burst {burst}: {} calls, all \
         Ready after {:.1}s ({:.1} calls/resource), max {max_created} in any 1 s window (bound {bound}), mean {:.2}/s; \
         restart with {n} Ready: {} calls, every resource seen again in {:.1}s, max {max_restart} in any 1 s; \
         by action {:?}; seconds by calls in them {histogram:?}",
        applied.as_secs_f64(),
        created.len(),
        converge.as_secs_f64(),
        created.len() as f64 / n as f64,
        created.len() as f64 / converge.as_secs_f64(),
        restarted.len(),
        relist.as_secs_f64(),
        by_action(&created),
    );
    assert!(max_created <= bound, "{max_created} calls within 1 s (from {at:?}) exceed {bound}");
    assert!(max_restart <= bound, "{max_restart} calls within 1 s after the restart exceed {bound}");
    // The proxy injects nothing here: no call is refused or throttled. moto itself may answer
    // 500 while other tests create users: GetCallerIdentity looks the key up in
    // `get_user_from_access_key_id`, which iterates the users dict unlocked, and Python raises
    // "dictionary changed size during iteration" (../shared/notes/moto-facts.md). The operator
    // retries those, as it must; one or two in ~600 do not move what the bound measures.
    let outcomes = by_outcome(&created);
    let moto_errors: usize =
        outcomes.iter().filter(|(o, _)| matches!(o, Outcome::Forwarded(500..))).map(|(_, n)| n).sum();
    let refused = outcomes.iter().any(|(o, _)| !matches!(o, Outcome::Forwarded(200) | Outcome::Forwarded(500..)));
    assert!(!refused && moto_errors <= 2, "no retries hidden in here: {outcomes:?}");
}

// ---------------------------------------------------------------------------------------------
// Bad input at the edges

#[tokio::test]
async fn nonsense_specs_end_in_clear_conditions_and_do_not_stall_their_namespace() {
    let f = Fixture::new("edges").await;
    let users = make_users(&f, 6).await;
    // moto accepts any user name; real IAM refuses some the schema allows. The proxy answers
    // calls naming this user the way IAM does.
    let rejected_user = users[0].clone();
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults { reject_user: Some(rejected_user.clone()), ..Faults::none() });
    // A ServiceAccount token Secret holds the name one resource asks for.
    let sa_token: Secret = serde_json::from_value(json!({
        "metadata": {"name": "sa-token", "annotations": {"kubernetes.io/service-account.name": "default"}},
        "type": "kubernetes.io/service-account-token",
    }))
    .unwrap();
    f.secrets().create(&PostParams::default(), &sa_token).await.expect("SA token Secret");
    // kube-controller-manager fills in the token; compare against that.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sa_token = loop {
        let s = f.secrets().get("sa-token").await.unwrap();
        if s.data.as_ref().is_some_and(|d| d.contains_key("token")) {
            break s;
        }
        assert!(Instant::now() < deadline, "the token controller did not fill in the SA token Secret");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let policies = PolicyChanges::start(&f).await;
    let op = via_proxy(&f, &proxy, &[]);
    let t0 = Instant::now();
    create_for(&f, "rejected", &rejected_user, json!({})).await;
    create_for(&f, "sa-clash", &users[1], json!({"secret": {"name": "sa-token"}})).await;
    create_for(&f, "no-target", &users[2], json!({"restartTargets": [{"kind": "Deployment", "name": "nope"}]})).await;
    let good = names("good", 0..3);
    for (i, name) in good.iter().enumerate() {
        create_for(&f, name, &users[3 + i], json!({})).await;
    }
    let good_ready = wait_all(&f, &good, Duration::from_secs(30), "the good ones Ready", is_ready).await;

    let o = f.wait_reason("rejected", "IamRejected").await;
    let message = ready(&o).unwrap().2;
    assert!(message.contains("refused by IAM") && message.contains("userName"), "clear message: {message}");
    let o = f.wait_reason("sa-clash", "SecretConflict").await;
    assert!(ready(&o).unwrap().2.contains("sa-token"), "names the Secret");
    f.wait_ready("no-target").await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(f.client.clone(), &f.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if list.items.iter().any(|e| e.reason.as_deref() == Some("RestartTargetNotFound")) {
            break;
        }
        assert!(Instant::now() < deadline, "no RestartTargetNotFound event");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = f.secrets().get("sa-token").await.unwrap();
    assert_eq!(after.type_.as_deref(), Some("kubernetes.io/service-account-token"));
    assert_eq!(after.metadata.resource_version, sa_token.metadata.resource_version, "token Secret untouched");
    assert!(iam_keys(f.env, &users[1]).await.is_empty(), "no key made for a Secret it cannot write");
    for (i, name) in good.iter().enumerate() {
        assert_user_consistent(&f, name, &users[3 + i], &[]).await;
    }
    assert_user_consistent(&f, "no-target", &users[2], &[]).await;

    // The refused resource backs off (non-retryable: 5 s doubling); IAM refuses, the SDK does
    // not retry a ValidationError.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let window = t0.elapsed();
    let refused = proxy.calls().iter().filter(|c| c.user.as_deref() == Some(rejected_user.as_str())).count();
    // Reconciles: the first (after the one adding the finalizer), one for its own status write,
    // the backoff wake-ups (5 s doubling), one per policy change.
    let changes = policies.get();
    let bound = 2 + backoff_wakeups(window, 5.0) as usize + changes;
    let sa_calls = proxy.calls().iter().filter(|c| c.user.as_deref() == Some(users[1].as_str())).count();
    println!(
        "edges: good resources Ready {:.1}s after creation next to the bad ones; IAM calls for the refused user in {:.0}s: \
         {refused} (bound {bound}, {changes} policy changes); IAM calls for the SecretConflict user: {sa_calls}",
        good_ready.as_secs_f64(),
        window.as_secs_f64()
    );
    assert!(refused <= bound, "{refused} calls for a refused user name in {window:?} exceed {bound}");
    assert!(!op.log().contains("panicked at"));
}

#[tokio::test]
async fn an_object_the_operator_cannot_read_does_not_stop_the_others() {
    let f = Fixture::new("malformed").await;
    let users = make_users(&f, 4).await;
    // An object stored under an older, looser schema: a duration the operator's parser refuses.
    // Today's schema refuses it too, so it is written straight into etcd, past the API server.
    let bad_interval = "99999999999999999999h";
    let ar = ApiResource::erase::<IamAccessKey>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(f.client.clone(), &f.ns, &ar);
    let broken = json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
        "metadata": etcd::metadata("broken", Some(&f.ns)),
        "spec": {"userName": users[0], "rotation": {"interval": bad_interval}},
    });
    assert!(serde_json::from_value::<IamAccessKey>(broken.clone()).is_err(), "the operator's type cannot read it");
    let refused = dynamic.create(&PostParams::default(), &serde_json::from_value(broken.clone()).unwrap()).await;
    assert!(refused.is_err(), "today's schema refuses it");
    etcd::put(f.env, &etcd::key("iamaccesskeys", Some(&f.ns), "broken"), &broken).await;

    let op = f.operator(&[]);
    create_for(&f, "good0", &users[1], json!({})).await;
    create_for(&f, "good1", &users[2], json!({})).await;
    let first = Instant::now();
    let stalled = |what: &str| {
        format!(
            "{what}: the operator stops reconciling its namespace when one stored IamAccessKey cannot be \
             deserialized (see docs/reliability.md); operator log:\n{}",
            tail(&op.log(), 20)
        )
    };
    // (Polled one by one: a list would fail to deserialize here too.)
    let wait_ready = |names: Vec<String>| {
        let f = &f;
        async move {
            for name in names {
                f.wait_for(&name, Duration::from_secs(30), "Ready", is_ready).await;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(35), wait_ready(names("good", 0..2)))
        .await
        .unwrap_or_else(|_| panic!("{}", stalled("good0 and good1 never became Ready")));
    let ready_in = first.elapsed();

    // An object that becomes unreadable later (as after a schema change) must not stop the watch
    // either.
    let mut good1 = serde_json::to_value(dynamic.get("good1").await.unwrap()).unwrap();
    good1["spec"]["rotation"] = json!({"interval": bad_interval});
    good1["metadata"]["generation"] = json!(good1["metadata"]["generation"].as_i64().unwrap_or(1) + 1);
    etcd::put(f.env, &etcd::key("iamaccesskeys", Some(&f.ns), "good1"), &good1).await;
    create_for(&f, "good2", &users[3], json!({})).await;
    tokio::time::timeout(Duration::from_secs(35), wait_ready(names("good", 2..3)))
        .await
        .unwrap_or_else(|_| panic!("{}", stalled("good2, created after good1 became unreadable, never became Ready")));
    // The unreadable objects are reported, as Warning events on them.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(f.client.clone(), &f.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let about = |name: &str| {
            list.items.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.type_.as_deref() == Some("Warning")
                    && e.note.as_deref().is_some_and(|n| n.contains("cannot be read"))
            })
        };
        if about("broken") && about("good1") {
            break;
        }
        assert!(Instant::now() < deadline, "no Warning event says the stored objects cannot be read");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = dynamic.delete("broken", &DeleteParams::default()).await;
    println!("malformed object: others Ready {:.1}s after creation", ready_in.as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Wrong secrets and Inactive keys: the IAM endpoint checks signatures, as AWS does

/// IAM answers CreateAccessKey with a secret that does not match the key: the operator's own
/// verification (STS, which checks the signature) refuses it, the key is deleted, and nothing is
/// ever published. When IAM answers correctly again, a working key is published.
#[tokio::test]
async fn a_key_whose_secret_does_not_authenticate_is_never_published() {
    let f = Fixture::new("wrongsecret").await;
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults { corrupt_new_secrets: true, ..Faults::none() });
    let op = via_proxy(&f, &proxy, &["--verify-timeout", "3s"]);
    f.create("app", json!({})).await;
    let refused = f.wait_reason("app", "KeyVerificationFailed").await;
    assert!(f.secrets().get_opt("app").await.unwrap().is_none(), "no Secret with a wrong secret");
    assert!(refused.status.unwrap().keys.is_empty(), "status records no key");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f.iam_keys().await.is_empty() {
        assert!(Instant::now() < deadline, "the unverified key was not deleted: {:?}", f.iam_keys().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created = proxy.calls().iter().filter(|c| c.action == "CreateAccessKey").count();
    assert!(created >= 1, "a key was created and refused");

    proxy.set(Faults::none());
    f.wait_ready("app").await;
    f.assert_consistent("app", &[]).await;
    op.assert_log_free_of(&f.secret_creds("app").await.unwrap().1);
}

/// The proxy plays IAM's refusal of Inactive keys (moto accepts them): a key made Inactive
/// stops authenticating through it, and a resource asking for an Inactive key still verifies
/// its key before deactivating it.
#[tokio::test]
async fn inactive_keys_are_refused_and_an_inactive_resource_still_converges() {
    let f = Fixture::new("inactive").await;
    let proxy = fault_proxy(f.env).await;
    let _op = via_proxy(&f, &proxy, &[]);
    f.create("app", json!({"keyStatus": "Inactive"})).await;
    let obj = f.wait_ready("app").await;
    let id = obj.status.unwrap().access_key_id.unwrap();
    assert_eq!(f.iam_keys().await[&id], "Inactive");
    let (_, secret) = f.secret_creds("app").await.unwrap();
    let sts = |url: String| {
        let conf = aws_sdk_sts::Config::builder()
            .behavior_version(aws_sdk_sts::config::BehaviorVersion::latest())
            .region(aws_sdk_sts::config::Region::new(testenv::AWS_REGION))
            .endpoint_url(url)
            .credentials_provider(aws_sdk_sts::config::Credentials::new(&id, &secret, None, None, "test"))
            .build();
        aws_sdk_sts::Client::from_conf(conf)
    };
    let through_proxy = sts(proxy.url()).get_caller_identity().send().await;
    let code = through_proxy.as_ref().err().and_then(|e| e.as_service_error()).and_then(|e| e.meta().code());
    assert_eq!(code, Some("InvalidClientTokenId"), "an Inactive key is refused: {through_proxy:?}");
    assert!(sts(f.env.iam_endpoint()).get_caller_identity().send().await.is_ok(), "moto alone accepts it");
    assert!(proxy.calls().iter().any(|c| c.outcome == Outcome::InactiveKey));
}

// ---------------------------------------------------------------------------------------------
// IAM as AWS runs it: latency, eventual consistency, an account quota, transient refusals

/// Calls of these outcomes.
fn count(calls: &[proxy::Call], outcome: Outcome) -> usize {
    calls.iter().filter(|c| c.outcome == outcome).count()
}

/// Resources created and then rotated through the AWS-like profile, with the operator's default
/// rate limit: every new key is refused for seconds before it authenticates, every call takes
/// 50-150 ms, the account throttles above 20 calls/s, and a few writes are refused as busy.
/// Everything converges with the guarantees intact.
#[tokio::test]
async fn aws_like_iam_converges_with_every_guarantee() {
    const N: usize = 12;
    let f = Fixture::new("awslike").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults::aws_like(20.0));
    let op = via_proxy(&f, &proxy, &["--verify-timeout", "60s"]);
    let t0 = Instant::now();
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, spec.clone()).await;
    }
    let created = wait_all(&f, &all, Duration::from_secs(240), "settled", settled).await;
    // From a cold start, one key finds out how long keys take while the others hold their
    // first check: in the first 3 s (no key propagates in under 4), only that key is checked, at
    // about 0.35, 0.95, 1.6 and 2.7 s (250 ms doubling, plus IAM's latency); without the hold,
    // each of the 12 would be. After that, how many checks the others need depends on the
    // propagation times drawn (a first key that propagated fast teaches a short wait), so the
    // total is bounded loosely.
    let calls = proxy.calls_since(t0);
    let first_create = calls.iter().find(|c| c.action == "CreateAccessKey" && c.outcome.reached_iam());
    let first_create = first_create.expect("a key was created").at;
    let early: Vec<Duration> = calls
        .iter()
        .filter(|c| c.action == "GetCallerIdentity" && c.at < first_create + Duration::from_secs(3))
        .map(|c| c.at.saturating_duration_since(first_create))
        .collect();
    let first_checks = sts_checks(&calls);
    println!("STS checks of the {N} first keys: {first_checks}; in the first 3 s after the first create: {early:?}");
    assert!(early.len() <= 4, "STS checks at {early:?} after the first create: the keys did not wait for the first");
    assert!(first_checks <= 5 * N, "{first_checks} STS checks for {N} new keys from a cold start");
    // Rotate half of them, still under the profile.
    let t1 = Instant::now();
    for name in &all[..N / 2] {
        let patch = json!({"spec": {"rotation": {"serial": 1}}});
        f.keys_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    let rotated = wait_all(&f, &all[..N / 2], Duration::from_secs(240), "rotated and settled", |o| {
        settled(o) && o.status.as_ref().and_then(|s| s.rotation.as_ref()).is_some_and(|r| r.serial == 1)
    })
    .await;
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    let calls = proxy.calls_since(t0);
    let refused = count(&calls, Outcome::NewKeyRefused);
    println!(
        "AWS-like IAM: {N} resources Ready after {:.1}s, {} rotated {:.1}s after the bump; {} calls {:?}; \
         new keys refused {refused} times before they authenticated; CreateAccessKey reaching IAM {} for {} keys \
         (a create whose next step failed is cleaned up and made again)",
        created.as_secs_f64(),
        N / 2,
        rotated.as_secs_f64(),
        calls.len(),
        by_outcome(&calls),
        keys_created_since(&proxy, t0),
        N + N / 2,
    );
    assert!(refused > 0, "the profile refused new keys for a while: verification had to wait");
    assert!(proxy.calls_since(t1).iter().all(|c| c.outcome != Outcome::Rejected), "nothing refused as invalid");
    // The rotations' new keys are first checked when the first keys had authenticated.
    let checks = sts_checks(&proxy.calls_since(t1));
    println!("STS checks of the {} rotated keys: {checks}", N / 2);
    assert!(checks <= N, "{checks} STS checks for {} new keys: the first check is not timed from recent keys", N / 2);
    op.assert_log_free_of(&f.secret_creds(&all[0]).await.unwrap().1);
}

fn sts_checks(calls: &[proxy::Call]) -> usize {
    calls.iter().filter(|c| c.action == "GetCallerIdentity").count()
}

/// A reconcile waiting for its new key to authenticate gives its slot to others: with one slot,
/// several keys wait at once. Once the first keys have shown how long IAM takes, a new key is
/// checked about once.
#[tokio::test]
async fn keys_waiting_to_authenticate_hold_no_reconcile_slot() {
    const N: usize = 8;
    let f = Fixture::new("propagation").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    let refused_for = (Duration::from_secs(3), Duration::from_secs(4));
    proxy.set(Faults { new_key_refused_for: Some(refused_for), ..Faults::none() });
    let op = via_proxy(&f, &proxy, &["--concurrency", "1"]);
    let verifying = |metrics: &str| {
        let line = metrics.lines().find(|l| l.starts_with("iam_key_operator_keys_verifying "));
        line.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).expect("keys_verifying gauge") as usize
    };
    // Two keys teach the operator how long IAM takes.
    for (name, user) in all.iter().zip(&users).take(2) {
        create_for(&f, name, user, json!({})).await;
    }
    wait_all(&f, &all[..2], Duration::from_secs(60), "settled", settled).await;
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users).skip(2) {
        create_for(&f, name, user, json!({})).await;
    }
    let mut most_waiting = 0;
    while list(&f).await.values().filter(|o| settled(o)).count() < N {
        assert!(t0.elapsed() < Duration::from_secs(60), "not all settled in 60 s");
        most_waiting = most_waiting.max(verifying(&op.metrics().await));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let checks = sts_checks(&proxy.calls_since(t0));
    println!(
        "{} keys made with one reconcile slot: at most {most_waiting} waited to authenticate at once; {checks} STS checks",
        N - 2
    );
    assert!(most_waiting >= 2, "with one slot, keys waiting to authenticate must not hold it ({most_waiting} at most)");
    assert_eq!(verifying(&op.metrics().await), 0, "no key left waiting");
    // Learned from two keys, the first wait can fall short by the retry step: at most three
    // checks a key (a fixed schedule from 250 ms would take five or six).
    assert!(checks <= 3 * (N - 2), "{checks} STS checks for {} keys", N - 2);
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
}

/// IAM's transient 409s (`ConcurrentModification`, `EntityTemporarilyUnmodifiable`), which moto
/// never returns, show as `IamBusy` (retried, Progressing in Argo CD), never as `IamRejected`
/// (a person must act), and everything converges once they stop.
#[tokio::test]
async fn concurrent_modification_is_transient_and_converges() {
    const N: usize = 6;
    const FAULT: Duration = Duration::from_secs(12);
    let f = Fixture::new("busy").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    let op = via_proxy(&f, &proxy, &[]);
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    for i in 0..N / 2 {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all[..N / 2], Duration::from_secs(60), "Ready", settled).await;

    // Every write refused as busy: the Ready half is rotated, the other half created.
    proxy.set(Faults { busy: 1.0, ..Faults::none() });
    let t0 = Instant::now();
    for name in &all[..N / 2] {
        let patch = json!({"spec": {"rotation": {"serial": 1}}});
        f.keys_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    }
    for i in N / 2..N {
        create_for(&f, &all[i], &users[i], spec.clone()).await;
    }
    wait_all(&f, &all, FAULT, "reason IamBusy", |o| reason(o) == "IamBusy").await;
    let obj = f.keys_api().get(&all[N - 1]).await.unwrap();
    let message = ready(&obj).unwrap().2;
    assert!(message.contains("IAM entity busy"), "clear message: {message}");
    let seen = reasons_until(&f, t0 + FAULT).await;
    assert_eq!(condition_gauges(&op.metrics().await, "IamBusy"), N, "condition gauge per resource");
    let metrics = op.metrics().await;
    let busy_outcomes = metrics
        .lines()
        .filter(|l| l.starts_with("iam_key_operator_iam_calls_total{") && l.contains("outcome=\"busy\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    let fault_calls = proxy.calls_since(t0);

    proxy.set(Faults::none());
    // The new ones settled, the Ready ones rotated (their spec asks for serial 1).
    let converge = wait_all(&f, &all, Duration::from_secs(120), "settled and rotated", |o| {
        let asked = o.spec.rotation.as_ref().map_or(0, |r| r.serial);
        let done = o.status.as_ref().and_then(|s| s.rotation.as_ref()).map_or(0, |r| r.serial);
        settled(o) && done == asked
    })
    .await;
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
    for (name, user) in all.iter().zip(&users) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    println!(
        "busy: {N} resources ({} created, {} rotated) while every write got ConcurrentModification or \
         EntityTemporarilyUnmodifiable for {FAULT:?}: {} calls {:?}, {busy_outcomes} counted as outcome=busy; \
         reasons seen {seen:?}; settled {:.1}s after",
        N - N / 2,
        N / 2,
        fault_calls.len(),
        by_outcome(&fault_calls),
        converge.as_secs_f64()
    );
    assert!(!seen.contains_key("IamRejected"), "a transient refusal is never IamRejected: {seen:?}");
    assert!(seen.keys().all(|r| r == "IamBusy" || r == "Ready"), "reasons seen: {seen:?}");
    assert!(count(&fault_calls, Outcome::Busy) >= N, "every resource was refused");
    assert!(busy_outcomes >= N as f64, "the operator counted them as busy");
}

/// The adaptive rate limiter under the AWS-like profile with an account quota of 20 calls/s
/// and a ceiling well above it (`--iam-rate-max 50`), with enough concurrency to want more than
/// the quota: it learns the quota from IAM's `Throttling` answers, few calls are throttled and
/// never many at once, and everything converges.
#[tokio::test]
async fn adaptive_rate_learns_the_account_quota() {
    const N: usize = 50;
    const QUOTA: f64 = 20.0;
    const CEILING: &str = "50";
    const MAX_THROTTLED_1S: usize = 8;
    let f = Fixture::new("adaptive").await;
    let users = make_users(&f, N).await;
    let all = names("r", 0..N);
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults::aws_like(QUOTA));
    let op = via_proxy(
        &f,
        &proxy,
        &["--iam-rate-max", CEILING, "--concurrency", "32", "--verify-timeout", "60s", "--resync", "10m"],
    );
    // The gauge, sampled while the resources converge.
    let gauge = |text: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with("iam_key_operator_iam_rate_limit "))?.rsplit(' ').next()?.parse().ok()
    };
    let start_rate = gauge(&op.metrics().await).expect("the rate gauge");
    let t0 = Instant::now();
    for (name, user) in all.iter().zip(&users) {
        create_for(&f, name, user, json!({})).await;
    }
    let mut samples = Vec::new();
    let converge = loop {
        samples.push(gauge(&op.metrics().await).unwrap_or(f64::NAN));
        let l = list(&f).await;
        if all.iter().all(|n| l.get(n).is_some_and(settled)) {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "not all settled in 300 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let calls = proxy.calls_since(t0);
    let throttled: Vec<proxy::Call> = calls.iter().filter(|c| c.outcome == Outcome::Throttled).cloned().collect();
    let fraction = throttled.len() as f64 / calls.len() as f64;
    let (max_throttled_1s, at) = max_in_window(&throttled, Duration::from_secs(1));
    let (max_1s, _) = max_in_window(&calls, Duration::from_secs(1));
    let accepted = calls.len() - throttled.len();
    let min_rate = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max_rate = samples.iter().copied().fold(0.0, f64::max);
    for (name, user) in all.iter().zip(&users).step_by(5) {
        assert_user_consistent(&f, name, user, &[]).await;
    }
    assert_no_extra_keys(&f, &proxy, &all, &users).await;
    let mut per_second_throttled: BTreeMap<usize, usize> = BTreeMap::new();
    for c in per_second(&throttled, t0) {
        *per_second_throttled.entry(c).or_default() += 1;
    }
    println!(
        "adaptive rate: {N} resources, account quota {QUOTA}/s, --iam-rate-max {CEILING} --concurrency 32: all settled \
         after {:.1}s; {} calls, {} throttled = {:.2}% (bound 5%), max {max_throttled_1s} throttled in any 1 s \
         (bound {MAX_THROTTLED_1S}), max {max_1s} calls in any 1 s; {:.1} accepted calls/s; rate limit started at {start_rate}, \
         ranged {min_rate:.1}..{max_rate:.1}; seconds by throttled calls in them {per_second_throttled:?}; {:?}",
        converge.as_secs_f64(),
        calls.len(),
        throttled.len(),
        fraction * 100.0,
        accepted as f64 / converge.as_secs_f64(),
        by_outcome(&calls),
    );
    assert!(fraction < 0.05, "{:.2}% of calls throttled", fraction * 100.0);
    // No burst: what the limiter lets through at the ceiling before IAM's first `Throttling`
    // answer can come back (one round trip, at most 150 ms of latency plus the proxy's and the
    // operator's own scheduling), 50/s x 0.15 s ≈ 8.
    assert!(max_throttled_1s <= MAX_THROTTLED_1S, "{max_throttled_1s} throttled calls within 1 s (from {at:?})");
    if !throttled.is_empty() {
        assert!(min_rate < start_rate, "throttling lowered the rate (samples {min_rate}..{max_rate})");
    }
    assert!(max_rate <= 50.0, "never above the ceiling");
}

/// Two resources racing for one IAM user: both read it unclaimed before either claim lands (the
/// proxy holds every `TagUser` for a second). However the writes interleave, the end is one
/// owner with one key, and the other resource says `UserClaimed` and holds none.
#[tokio::test]
async fn two_resources_racing_for_one_user_end_with_one_owner_and_one_key() {
    let f = Fixture::new("race").await;
    let proxy = fault_proxy(f.env).await;
    proxy.set(Faults { delay: Duration::from_secs(1), only: vec!["TagUser".into()], ..Faults::none() });
    let _op = via_proxy(&f, &proxy, &[]);
    let (a, b) = (f.create("a", json!({"secret": {"name": "a"}})), f.create("b", json!({"secret": {"name": "b"}})));
    tokio::join!(a, b);
    let both = ["a".to_string(), "b".to_string()];
    // The loser notices at its next look at the user (it sees the winner's key): a resync.
    let deadline = Instant::now() + Duration::from_secs(90);
    let l = loop {
        let l = list(&f).await;
        let claimed =
            |n: &String| reason(&l[n]) == "UserClaimed" && l[n].status.as_ref().is_some_and(|s| s.keys.is_empty());
        if both.iter().filter(|n| settled(&l[*n])).count() == 1 && both.iter().any(claimed) {
            break l;
        }
        let states: Vec<_> = both.iter().map(|n| (n, reason(&l[n]))).collect();
        assert!(Instant::now() < deadline, "no single owner after 90 s: {states:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let owners: Vec<&String> = both.iter().filter(|n| is_ready(&l[*n])).collect();
    assert_eq!(owners.len(), 1, "exactly one owner: {:?}", both.iter().map(|n| (n, reason(&l[n]))).collect::<Vec<_>>());
    let owner = owners[0];
    let keys = iam_keys(f.env, &f.user).await;
    assert_eq!(keys.len(), 1, "one key on the user, the owner's: {keys:?}");
    assert_user_consistent(&f, owner, &f.user, &[]).await;
    let (id, secret) = f.secret_creds(owner).await.expect("the owner's Secret");
    assert!(f.authenticates(&id, &secret).await, "the owner's key works");
    let created = proxy.calls().iter().filter(|c| c.action == "CreateAccessKey" && c.outcome.reached_iam()).count();
    println!("race: owner {owner}, {created} CreateAccessKey reached IAM, keys left {keys:?}");
}
