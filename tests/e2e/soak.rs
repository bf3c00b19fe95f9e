//! Soak: the operator SIGKILLed at random moments, again and again, while many resources are
//! created, rotated (short intervals, serial bumps, rotation requests) and deleted; at the end
//! nothing is leaked and nothing is lost. `#[ignore]`d, so `make test` skips it; `make soak`
//! runs it, sized by the environment:
//!
//! ```sh
//! IKO_SOAK_SECONDS=900 IKO_SOAK_RESOURCES=200 \
//!   cargo test --locked --features failpoints --test e2e soak:: -- --ignored --nocapture
//! ```
//!
//! This file also holds the scenario itself ([`random_kills`]) and the operator launcher it uses
//! ([`start_operator`]): `tests/e2e/faults.rs` includes it as a module and runs the same scenario small in
//! `make test`.

use crate::support;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::{Duration, Instant},
};

use iam_key_operator::crd::{IamAccessKey, KeyPhase};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use rand::Rng;
use serde_json::json;
use support::{Fixture, Operator, authenticates_as, fault_proxy, iam_keys, ready};
use testenv::proxy::{Call, FaultProxy, by_action, max_in_window};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run with `make soak` (IKO_SOAK_SECONDS, IKO_SOAK_RESOURCES)"]
async fn soak_random_kills() {
    let env_num =
        |name: &str, default: u64| -> u64 { std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default) };
    let seconds = env_num("IKO_SOAK_SECONDS", 900);
    let resources = env_num("IKO_SOAK_RESOURCES", 200) as usize;
    let scale = Scale::soak(resources, Duration::from_secs(seconds));
    let report = random_kills("soak", &scale).await;
    println!("{report}");
    report.assert_clean();
}

/// How big and how long a random-kill run is.
#[derive(Clone, Debug)]
pub struct Scale {
    /// Resources created at the start (each on its own IAM user).
    pub resources: usize,
    /// Further resources created during the run (on fresh users).
    pub extra: usize,
    /// How long resources are churned and the operator killed.
    pub churn: Duration,
    /// Seconds between two kills: uniform in this range.
    pub kill_between: (f64, f64),
    /// Seconds between two changes (serial bump, rotation request, create, delete).
    pub change_between: (f64, f64),
    /// `rotation.interval` of rotating resources, in seconds: uniform in this range.
    pub interval: (u64, u64),
    /// Every n-th user carries a foreign key (created directly in IAM) from the start.
    pub foreign_every: usize,
    /// Extra operator flags.
    pub operator_args: Vec<String>,
    /// How long the end state may take to settle.
    pub settle: Duration,
}

impl Scale {
    /// The size `make test` runs: about two minutes.
    pub fn small() -> Scale {
        Scale {
            resources: 20,
            extra: 5,
            churn: Duration::from_secs(60),
            kill_between: (1.0, 6.0),
            change_between: (0.3, 1.5),
            interval: (12, 30),
            foreign_every: 4,
            operator_args: ["--resync", "5s"].map(String::from).to_vec(),
            settle: Duration::from_secs(120),
        }
    }

    /// `make soak`: kills far enough apart that a restart (which relists and looks at every
    /// resource again) gets work done in between, rotation intervals and resync stretched with
    /// the number of resources, and a rate limit that moto keeps up with.
    pub fn soak(resources: usize, churn: Duration) -> Scale {
        let r = resources.max(1) as u64;
        Scale {
            resources,
            extra: resources / 4,
            churn,
            kill_between: (3.0, 20.0),
            change_between: (0.2, 0.2 + 100.0 / r as f64),
            interval: (30 + r / 4, 60 + r / 2),
            foreign_every: 4,
            operator_args: ["--resync", "30s", "--iam-rate", "50", "--iam-burst", "50"].map(String::from).to_vec(),
            settle: Duration::from_secs(120 + 2 * r),
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub resources: usize,
    pub created_during_run: usize,
    pub deleted: usize,
    pub rotations_asked: usize,
    pub kills: usize,
    pub keys_created: usize,
    pub iam_calls: usize,
    pub max_calls_in_1s: usize,
    pub churn: Duration,
    pub settle: Duration,
    pub foreign_keys: usize,
    // Violations: each must be 0.
    pub keys_leaked: usize,
    pub keys_missing: usize,
    pub secrets_broken: usize,
    pub foreign_touched: usize,
    pub operator_crashes: usize,
    pub violations: Vec<String>,
    /// Per-key tags left on a user after their key was deleted (each uses up one of the user's
    /// 50 tags for good).
    pub stale_tags: usize,
}

impl Report {
    pub fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "{} violation(s):\n{}\n{self}",
            self.violations.len(),
            self.violations.join("\n")
        );
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "random kills: {} resources ({} created during the run), {} deleted, {} rotations asked, {} foreign keys",
            self.resources, self.created_during_run, self.deleted, self.rotations_asked, self.foreign_keys
        )?;
        writeln!(
            f,
            "  {} SIGKILLs in {:.0}s of churn; settled {:.1}s after the last kill",
            self.kills,
            self.churn.as_secs_f64(),
            self.settle.as_secs_f64()
        )?;
        writeln!(
            f,
            "  IAM/STS calls: {} ({} CreateAccessKey), at most {} in any 1 s",
            self.iam_calls, self.keys_created, self.max_calls_in_1s
        )?;
        write!(
            f,
            "  keys leaked {}, keys missing {}, secrets broken {}, foreign keys touched {}, operator crashes {}; tags of deleted keys left {}",
            self.keys_leaked,
            self.keys_missing,
            self.secrets_broken,
            self.foreign_touched,
            self.operator_crashes,
            self.stale_tags
        )
    }
}

/// The operator of the scenario: through the proxy, logging at info (minutes of debug logs of
/// hundreds of resources would be gigabytes).
pub fn start_operator(f: &Fixture, proxy: &FaultProxy, args: &[String]) -> Operator {
    let envs = proxy.operator_env();
    let mut envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    envs.push(("RUST_LOG", "info"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Operator::start(f.env, &f.ns, &envs, &args)
}

/// One resource of the run.
#[derive(Clone, Debug)]
struct Res {
    name: String,
    user: String,
    foreign: Option<String>,
    /// Rotates on schedule and on request (users with a foreign key have no free slot: they
    /// would wait in KeyLimitExceeded, correctly, and never settle).
    rotating: bool,
    serial: i64,
    deleted: bool,
}

fn spec(r: &Res, scale: &Scale) -> serde_json::Value {
    let mut rotation = json!({"gracePeriod": "2s", "retainInactive": "3s"});
    if r.rotating {
        let secs = rand::rng().random_range(scale.interval.0..=scale.interval.1);
        rotation["interval"] = format!("{secs}s").into();
    }
    json!({"userName": r.user, "rotation": rotation})
}

fn uniform(range: (f64, f64)) -> Duration {
    Duration::from_secs_f64(rand::rng().random_range(range.0..=range.1))
}

/// Create resources, churn them while SIGKILLing the operator at random moments, let it
/// settle, then check every user against IAM.
pub async fn random_kills(prefix: &str, scale: &Scale) -> Report {
    let began = Instant::now();
    let f = Fixture::new(prefix).await;
    let iam = f.env.iam_client();
    let total = scale.resources + scale.extra;
    let mut all: Vec<Res> = Vec::with_capacity(total);
    for i in 0..total {
        let user = format!("{}-{i}", f.user);
        iam.create_user().user_name(&user).send().await.expect("CreateUser");
        let foreign = if i % scale.foreign_every == scale.foreign_every - 1 {
            let out = iam.create_access_key().user_name(&user).send().await.expect("CreateAccessKey");
            Some(out.access_key().expect("key").access_key_id().to_string())
        } else {
            None
        };
        let rotating = foreign.is_none();
        all.push(Res { name: format!("r{i}"), user, foreign, rotating, serial: 0, deleted: false });
    }
    let proxy = fault_proxy(f.env).await;
    let mut op = start_operator(&f, &proxy, &scale.operator_args);
    let mut report = Report { resources: total, ..Report::default() };
    report.foreign_keys = all.iter().filter(|r| r.foreign.is_some()).count();
    for r in &all[..scale.resources] {
        f.create(&r.name, spec(r, scale)).await;
    }
    let mut next_new = scale.resources;

    // Churn and kill, concurrently, until the deadline.
    let churn_start = Instant::now();
    let deadline = churn_start + scale.churn;
    let api = f.keys_api();
    let churn = async {
        let mut changes = 0usize;
        while Instant::now() < deadline {
            tokio::time::sleep(uniform(scale.change_between)).await;
            let live: Vec<usize> = (0..next_new).filter(|&i| !all[i].deleted).collect();
            let roll: f64 = rand::rng().random();
            let pick = |candidates: &[usize]| {
                (!candidates.is_empty()).then(|| candidates[rand::rng().random_range(0..candidates.len())])
            };
            let rotating: Vec<usize> = live.iter().copied().filter(|&i| all[i].rotating).collect();
            if roll < 0.35 {
                if let Some(i) = pick(&rotating) {
                    all[i].serial += 1;
                    let patch = json!({"spec": {"rotation": {"serial": all[i].serial}}});
                    api.patch(&all[i].name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("bump serial");
                    changes += 1;
                }
            } else if roll < 0.55 {
                if let Some(i) = pick(&rotating) {
                    let at = jiff::Timestamp::now().to_string();
                    let patch = json!({"metadata": {"annotations": {"iam.keyop.dev/rotate-requested-at": at}}});
                    api.patch(&all[i].name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("annotate");
                    changes += 1;
                }
            } else if roll < 0.75 {
                if next_new < total {
                    f.create(&all[next_new].name, spec(&all[next_new], scale)).await;
                    next_new += 1;
                }
            } else if let Some(i) = pick(&live) {
                // Delete at most a quarter of what was ever created.
                if all.iter().filter(|r| r.deleted).count() < total / 4 {
                    api.delete(&all[i].name, &DeleteParams::default()).await.expect("delete");
                    all[i].deleted = true;
                }
            }
        }
        changes
    };
    let kills = async {
        let (mut kills, mut crashes) = (Vec::new(), Vec::new());
        loop {
            let wait = uniform(scale.kill_between);
            if Instant::now() + wait >= deadline {
                break;
            }
            tokio::time::sleep(wait).await;
            if let Some(status) = op.exited() {
                crashes.push(format!("the operator exited by itself ({status}) before kill {}", kills.len()));
            }
            op.restart(&[]);
            kills.push(Instant::now());
        }
        (kills, crashes)
    };
    let (changes, (kills, crashes)) = tokio::join!(churn, kills);
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    report.rotations_asked = changes;
    report.kills = kills.len();
    report.operator_crashes = crashes.len();
    report.violations.extend(crashes);
    report.churn = churn_start.elapsed();
    report.created_during_run = next_new - scale.resources;
    report.deleted = all.iter().filter(|r| r.deleted).count();
    let created = &all[..next_new];

    // Settle: no more scheduled rotations; everything Ready with one key, deleted ones gone.
    let settle_start = Instant::now();
    for r in created.iter().filter(|r| !r.deleted && r.rotating) {
        let patch = json!({"spec": {"rotation": {"interval": null}}});
        api.patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("stop rotating");
    }
    let settled = |o: &IamAccessKey| {
        let Some(s) = o.status.as_ref() else { return false };
        ready(o).is_some_and(|(st, _, _)| st == "True")
            && s.observed_generation == o.metadata.generation
            && s.pending_create.is_none()
            && s.keys.len() == 1
            && s.keys[0].phase == KeyPhase::Current
            && s.access_key_id.as_ref() == Some(&s.keys[0].access_key_id)
    };
    loop {
        let list = api.list(&ListParams::default()).await.expect("list");
        let by_name: BTreeMap<String, IamAccessKey> =
            list.items.into_iter().map(|o| (o.metadata.name.clone().unwrap_or_default(), o)).collect();
        let last_unsettled: Vec<String> = created
            .iter()
            .filter(|r| match by_name.get(&r.name) {
                Some(o) => r.deleted || !settled(o),
                None => !r.deleted,
            })
            .map(|r| {
                let state = by_name.get(&r.name).map(|o| {
                    let reason = ready(o).map(|(s, r, m)| format!("{s} {r}: {m}")).unwrap_or_default();
                    let keys = o.status.as_ref().map(|s| s.keys.len()).unwrap_or(0);
                    format!("{reason}; {keys} key(s)")
                });
                format!("{} (deleted: {}): {}", r.name, r.deleted, state.unwrap_or_else(|| "gone".into()))
            })
            .collect();
        if last_unsettled.is_empty() {
            break;
        }
        if settle_start.elapsed() > scale.settle {
            report.violations.push(format!(
                "not settled {:?} after the last kill: {} resource(s):\n  {}",
                scale.settle,
                last_unsettled.len(),
                last_unsettled.join("\n  ")
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.settle = settle_start.elapsed();
    if let Some(status) = op.exited() {
        report.operator_crashes += 1;
        report.violations.push(format!("the operator exited by itself ({status}) while settling"));
    }
    if op.log().contains("panicked at") {
        report.violations.push(format!("the operator panicked: see {}", op.log_path.display()));
    }

    // Check every user against IAM.
    let calls = proxy.calls_since(began);
    for r in created {
        check_user(&f, r, &calls, &kills, &mut report).await;
    }
    report.iam_calls = calls.len();
    report.keys_created = calls.iter().filter(|c| c.action == "CreateAccessKey" && c.outcome.reached_iam()).count();
    report.max_calls_in_1s = max_in_window(&calls, Duration::from_secs(1)).0;
    eprintln!("calls by action: {:?}", by_action(&calls));
    op.kill();
    report
}

/// IAM holds exactly the keys status names (plus the foreign key), the Secret's key is the
/// current one and authenticates; for a deleted resource, only the foreign key and no tag is left.
async fn check_user(f: &Fixture, r: &Res, calls: &[Call], kills: &[Instant], report: &mut Report) {
    let env = f.env;
    let iam: BTreeMap<String, String> = iam_keys(env, &r.user).await;
    let tags: BTreeMap<String, String> = env
        .iam_client()
        .list_user_tags()
        .user_name(&r.user)
        .send()
        .await
        .expect("ListUserTags")
        .tags()
        .iter()
        .map(|t| (t.key().to_string(), t.value().to_string()))
        .collect();
    if let Some(foreign) = &r.foreign
        && iam.get(foreign).map(String::as_str) != Some("Active")
    {
        report.foreign_touched += 1;
        report.violations.push(format!("{}: foreign key {foreign} changed: {:?}", r.name, iam.get(foreign)));
    }
    let foreign: BTreeSet<&String> = r.foreign.iter().collect();
    let ours_in_iam: BTreeSet<&String> = iam.keys().filter(|k| !foreign.contains(k)).collect();
    // Tags naming an access key that no longer exists.
    let stale: Vec<&String> = tags.keys().filter(|k| k.starts_with("AKIA") && !iam.contains_key(*k)).collect();
    for key in stale {
        report.stale_tags += 1;
        let trace: Vec<String> = calls
            .iter()
            .filter(|c| c.key.as_deref() == Some(key.as_str()))
            .map(|c| format!("{} {:?}", c.action, c.outcome))
            .collect();
        let deleted_at = calls
            .iter()
            .rfind(|c| c.key.as_deref() == Some(key.as_str()) && c.action == "DeleteAccessKey")
            .map(|c| c.at);
        let kill = deleted_at.and_then(|d| kills.iter().find(|k| **k >= d).map(|k| k.duration_since(d)));
        report.violations.push(format!(
            "{}: tag {key} left on user {} after the key was deleted; calls about it: {}; next kill {:?} after the DeleteAccessKey",
            r.name,
            r.user,
            trace.join(", "),
            kill
        ));
    }
    let obj = f.keys_api().get_opt(&r.name).await.expect("get");
    if r.deleted {
        if !ours_in_iam.is_empty() {
            report.keys_leaked += ours_in_iam.len();
            report.violations.push(format!("{} (deleted): keys left in IAM: {ours_in_iam:?}", r.name));
        }
        if !tags.is_empty() {
            report.violations.push(format!("{} (deleted): tags left on user {}: {tags:?}", r.name, r.user));
        }
        if f.secrets().get_opt(&r.name).await.expect("get Secret").is_some() {
            report.violations.push(format!("{} (deleted): Secret left", r.name));
        }
        return;
    }
    let Some(status) = obj.and_then(|o| o.status) else {
        report.violations.push(format!("{}: no status", r.name));
        return;
    };
    let in_status: BTreeSet<&String> = status.keys.iter().map(|k| &k.access_key_id).collect();
    let leaked: Vec<&&String> = ours_in_iam.difference(&in_status).collect();
    let missing: Vec<&&String> = in_status.difference(&ours_in_iam).collect();
    if !leaked.is_empty() {
        report.keys_leaked += leaked.len();
        report.violations.push(format!("{}: keys in IAM that status does not name: {leaked:?}", r.name));
    }
    if !missing.is_empty() {
        report.keys_missing += missing.len();
        report.violations.push(format!("{}: keys in status that IAM lacks: {missing:?}", r.name));
    }
    let secret_name = status.secret_name.clone().unwrap_or_else(|| r.name.clone());
    let broken = match f.secret_creds(&secret_name).await {
        None => Some("no Secret with credentials".to_string()),
        Some((id, _)) if Some(&id) != status.access_key_id.as_ref() => {
            Some(format!("Secret holds {id}, status names {:?}", status.access_key_id))
        }
        Some((id, secret)) => {
            (!authenticates_as(env, &id, &secret, &r.user).await).then(|| format!("key {id} does not authenticate"))
        }
    };
    if let Some(why) = broken {
        report.secrets_broken += 1;
        report.violations.push(format!("{}: Secret broken: {why}", r.name));
    }
}
