//! Random histories against a simulated world (issue 4's planner requirements).
//!
//! The world is small and in memory: one IAM user (its keys with status, create date and last
//! use, its tags, IAM's limit of two keys), the resource (spec, the rotate-requested-at
//! annotation, the persisted status and its resourceVersion), the Secret's annotated key id, a
//! clock, and a client workload holding one key. An executor performs each planner [`Step`] the
//! way `controller/apply.rs` does — same writes, same order, same crash points (`after-create-key`,
//! `after-tag`, `after-secret`, `before-status`), same conditional status writes — and a crash
//! loses everything the operator held in memory, as a restarted process would.
//!
//! Proptest generates histories mixing the operator's steps with time passing, serial bumps,
//! rotation requests, Secret deletion, a person deactivating / reactivating / deleting keys in
//! IAM, foreign keys coming and going, crashes and spec changes. After every step the safety
//! invariants below are checked; after the history the world is left alone, time advances, and
//! the resource must converge (the liveness invariants). A failure prints the invariant, the
//! history and a trace of what the operator did.
//!
//! Safety, after every step and event:
//! - `at_most_two_keys`, `creates_only_with_a_free_slot` (judged on what the planner was shown);
//! - `never_touches_foreign_keys`, `foreign_keys_keep_their_status` (until the history changes them);
//! - `never_deletes_the_current_key`, `never_deletes_the_published_key`;
//! - `published_key_works`: the Secret's key is in IAM and Active from its publication until it is
//!   replaced, unless a person deactivated or deleted it, or `spec.keyStatus` / a policy did;
//! - `status_follows_spec_only_for_the_current_key`, `retires_only_draining_keys`,
//!   `grace_period_respected`, `retired_in_use_only_after_max_wait`, `rollback_window_respected`,
//!   `deactivates_only_unused_keys` (IAM's truth, not the operator's last reading).
//!
//! Liveness, once the world is quiet (`liveness: ...`): `Done` within `STEPS_TO_DONE` steps; at
//! every `Done` `at_most_one_current_key`, `current_key_is_published` (or it waits for the slot a
//! draining key frees, and wakes up by then), `current_key_works`, `no_pending_create`,
//! `exactly_the_keys_status_names` (no leaked key), `wakes_in_the_future`, `retirements_on_time`,
//! `scheduled_rotation_happens`; after two quiet days `serial_bump_rotates`,
//! `requested_rotation_happens`, `requested_rotation_replaces_the_key`, `every_rotation_finishes`.
//! A resource may instead end blocked only as allowed: `KeyLimitExceeded` when foreign keys fill
//! the slots, `KeyUnused` for a current key a policy found unused.
//!
//! Tenants who may write status forge it (`TenantForgesStatus`): a pending create from long ago
//! or a day ahead with no existing keys, a person's key listed as retired, draining or current,
//! or the keys wiped. The safety invariants hold regardless (the operator acts only on keys IAM
//! shows as its own); a forgery may cost the resource its own untagged crash remains (they are
//! then counted as foreign: a leak, never a wrong delete).
//!
//! Not generated (documented limitation, docs/decisions.md): a person adding an *untagged* key
//! while a create of ours is running, or within its window (`CREATE_WINDOW` and `CLOCK_SKEW`
//! around `pendingCreate.since`) — it is taken for the remains of that create; for the same
//! reason, a forged `since` is never close to the creation of a person's untagged key.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;

use super::*;
use crate::{
    crd::{Duration, IamAccessKeyStatus, LastUsed, PendingCreate, RestartKind, RestartTarget, RotationSpec},
    policy::Limits,
};

// ---------------------------------------------------------------------------------------------
// Knobs. Small tables keep shrinking effective: proptest shrinks an index towards 0.

const START: i64 = 1_800_000_000;
/// How far the clock moves in one `Wait`.
const WAITS: [i64; 6] = [1, 30, 300, 600, 3600, 86_400];
const INTERVALS: [Option<u64>; 3] = [None, Some(3 * 3600), Some(86_400)];
const GRACES: [u64; 3] = [0, 60, 600];
const RETAINS: [u64; 3] = [0, 600, 3600];
const USAGE_CHECK_INTERVAL: u64 = 300;
/// What an `IamAccessKeyPolicy` may impose: `maxKeyAge` and `deactivateUnusedAfter`.
const MAX_KEY_AGES: [Option<u64>; 2] = [None, Some(2 * 3600)];
const UNUSED_AFTERS: [Option<u64>; 2] = [None, Some(86_400)];
const MAX_WAIT: u64 = 3600;
/// `--last-used-refresh` (its default).
const LAST_USED_REFRESH: i64 = 3600;
/// As `MAX_STEPS` in controller/apply.rs: a reconcile then requeues itself.
const MAX_STEPS_PER_RECONCILE: usize = 24;
/// Liveness: steps (over any number of reconciles) until the first `Done` of a quiet world.
const STEPS_TO_DONE: usize = 40;
/// Liveness: how long the quiet world is watched.
const SETTLE_FOR: i64 = 2 * 86_400;
/// Tag value a person puts on a key of their own.
const FOREIGN_TAG: &str = "alice's laptop";

// ---------------------------------------------------------------------------------------------
// Histories

/// Where the operator process dies (the names of the failpoints in controller/apply.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Failpoint {
    AfterCreateKey,
    AfterTag,
    AfterSecret,
    BeforeStatus,
    /// After the first IAM write of any other step (delete before untag, update before status).
    MidStep,
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct RotationChoice {
    interval: usize,
    grace: usize,
    retain: usize,
    wait_for_unused: bool,
}

#[derive(Clone, Copy, Debug)]
enum Event {
    /// The operator performs one planner step (observing first when no reconcile is running).
    Step,
    /// The operator finishes the running reconcile, or runs a whole new one.
    Reconcile,
    /// The clock moves by `WAITS[i]` (a running reconcile keeps its own `now`, as the real one).
    Wait(usize),
    /// The operator process dies between two steps.
    Crash,
    /// The operator process will die at this point the next time it gets there.
    ArmFailpoint(Failpoint),
    BumpSerial,
    /// `iam-key-operator rotate`: the annotation is set to the current time.
    RequestRotation,
    /// The annotation disappears (Argo CD self-heal removes what git does not have).
    RequestAnnotationRemoved,
    DeleteSecret,
    /// A person acts on the key at this position of ListAccessKeys (any key: ours or not).
    PersonDeactivates(usize),
    PersonReactivates(usize),
    PersonDeletes(usize),
    /// A person creates a key of their own (IAM refuses a third key).
    PersonAddsKey {
        tagged: bool,
        active: bool,
    },
    SpecKeyStatus(KeyStatus),
    SpecRotation(Option<RotationChoice>),
    SpecRestartTargets(bool),
    /// The client signs a request with the key it loaded (IAM records the use if it is Active).
    ClientUsesItsKey,
    /// The client reads the Secret again (a pod restart).
    ClientReloadsSecret,
    /// STS keeps refusing the next new key until the verify timeout.
    VerifyFailsOnce,
    /// Someone with write access to status rewrites it (never while a reconcile runs).
    TenantForgesStatus(Forgery),
}

#[derive(Clone, Copy, Debug)]
enum Forgery {
    /// `pendingCreate` with no existing keys, `since` long before any key was created.
    PendingLongAgo,
    /// `pendingCreate` with no existing keys, `since` a day ahead.
    PendingAhead,
    /// `status.keys` lists a person's key (the first one) in this phase, its deadlines passed.
    ListsForeignKey(KeyPhase),
    /// `status.keys` emptied.
    KeysWiped,
}

#[derive(Clone, Debug)]
struct History {
    key_status: KeyStatus,
    rotation: Option<RotationChoice>,
    restart_targets: bool,
    /// Indexes into `MAX_KEY_AGES` and `UNUSED_AFTERS`; a policy on the user's path or tags
    /// makes every reconcile read the user (and so its tags) before observing.
    policy: (usize, usize, bool),
    events: Vec<Event>,
}

fn key_status() -> impl Strategy<Value = KeyStatus> {
    prop_oneof![3 => Just(KeyStatus::Active), 1 => Just(KeyStatus::Inactive)]
}

fn rotation_choice() -> impl Strategy<Value = Option<RotationChoice>> {
    proptest::option::of((0..INTERVALS.len(), 0..GRACES.len(), 0..RETAINS.len(), any::<bool>()).prop_map(
        |(interval, grace, retain, wait_for_unused)| RotationChoice { interval, grace, retain, wait_for_unused },
    ))
}

fn failpoint() -> impl Strategy<Value = Failpoint> {
    prop_oneof![
        Just(Failpoint::AfterCreateKey),
        Just(Failpoint::AfterTag),
        Just(Failpoint::AfterSecret),
        Just(Failpoint::BeforeStatus),
        Just(Failpoint::MidStep),
    ]
}

fn forgery() -> impl Strategy<Value = Forgery> {
    prop_oneof![
        Just(Forgery::PendingLongAgo),
        Just(Forgery::PendingAhead),
        Just(Forgery::ListsForeignKey(KeyPhase::Inactive)),
        Just(Forgery::ListsForeignKey(KeyPhase::Draining)),
        Just(Forgery::ListsForeignKey(KeyPhase::Current)),
        Just(Forgery::KeysWiped),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        10 => Just(Event::Step),
        5 => Just(Event::Reconcile),
        5 => (0..WAITS.len()).prop_map(Event::Wait),
        1 => Just(Event::Crash),
        3 => failpoint().prop_map(Event::ArmFailpoint),
        2 => Just(Event::BumpSerial),
        2 => Just(Event::RequestRotation),
        1 => Just(Event::RequestAnnotationRemoved),
        2 => Just(Event::DeleteSecret),
        1 => (0..2usize).prop_map(Event::PersonDeactivates),
        1 => (0..2usize).prop_map(Event::PersonReactivates),
        1 => (0..2usize).prop_map(Event::PersonDeletes),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(tagged, active)| Event::PersonAddsKey { tagged, active }),
        1 => key_status().prop_map(Event::SpecKeyStatus),
        1 => rotation_choice().prop_map(Event::SpecRotation),
        1 => any::<bool>().prop_map(Event::SpecRestartTargets),
        2 => Just(Event::ClientUsesItsKey),
        1 => Just(Event::ClientReloadsSecret),
        1 => Just(Event::VerifyFailsOnce),
        2 => forgery().prop_map(Event::TenantForgesStatus),
    ]
}

fn history() -> impl Strategy<Value = History> {
    let policy = (0..MAX_KEY_AGES.len(), 0..UNUSED_AFTERS.len(), any::<bool>());
    (key_status(), rotation_choice(), any::<bool>(), policy, proptest::collection::vec(event(), 0..48)).prop_map(
        |(key_status, rotation, restart_targets, policy, events)| History {
            key_status,
            rotation,
            restart_targets,
            policy,
            events,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// The world

#[derive(Clone, Debug)]
struct Key {
    id: String,
    status: KeyStatus,
    create_date: Timestamp,
    last_used: Option<Timestamp>,
}

/// Who last set a key's status in IAM.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Writer {
    Person,
    /// `SetKeyStatus`: the current key follows `spec.keyStatus`.
    OperatorForSpec,
    /// `RetireKey`: a replaced key's grace period ended.
    OperatorRetire,
    /// `DeactivateUnused`: a policy's `deactivateUnusedAfter`.
    OperatorForPolicy,
}

/// A reconcile in progress: what `Run` in controller/apply.rs holds in memory.
struct Run {
    now: Timestamp,
    /// The resource as read when the reconcile started.
    spec: IamAccessKeySpec,
    requested_at: Option<String>,
    resource_version: u64,
    /// Working copy, and what the API server holds (status is written only on change).
    status: IamAccessKeyStatus,
    saved: IamAccessKeyStatus,
    user: UserObservation,
    secret: SecretObservation,
    steps: usize,
}

/// How one operator step ended.
enum Outcome {
    Continue,
    Done(Option<Timestamp>),
    Blocked(Blocked),
    Failed(String),
    Crashed,
    StepLimit,
}

/// Why a step stopped early.
enum Stop {
    Crashed,
    Failed(String),
}

#[derive(Default, Debug)]
struct Coverage {
    steps: BTreeMap<&'static str, usize>,
    crashes: BTreeMap<String, usize>,
    failures: BTreeMap<String, usize>,
    legit_key_limit: usize,
    legit_key_unused: usize,
    rotations_settled: usize,
    max_steps_to_done: usize,
}

struct Sim {
    now: Timestamp,
    owner: Owner,
    // IAM
    keys: Vec<Key>,
    tags: BTreeMap<String, String>,
    next_id: u32,
    verify_fails: bool,
    // The resource
    key_status: KeyStatus,
    rotation: Option<RotationChoice>,
    serial: i64,
    restart_targets: bool,
    requested_at: Option<String>,
    resource_version: u64,
    status: IamAccessKeyStatus,
    limits: Limits,
    policy_reads_user: bool,
    /// The Secret: missing, or ours with the annotated key id.
    secret: SecretObservation,
    // The operator process
    run: Option<Run>,
    last_used_due: Option<Timestamp>,
    /// `Context`'s record of when last use was read: in memory, lost with a crash.
    last_used_read_at: Option<Timestamp>,
    failpoint: Option<Failpoint>,
    // The client workload
    client_key: Option<String>,
    // Bookkeeping for the invariants
    created_by_operator: BTreeSet<String>,
    /// Keys a person created, with the status the person last gave them.
    foreign: BTreeMap<String, KeyStatus>,
    last_writer: BTreeMap<String, Writer>,
    deleted_by_person: BTreeSet<String>,
    /// Keys a rotation request or a lost Secret asked to replace, and by what.
    must_be_replaced: BTreeMap<String, BTreeSet<&'static str>>,
    trace: Vec<String>,
    violations: Vec<String>,
    coverage: Coverage,
    /// Every step executed, with the reconcile's `now` (for the timeline diagram).
    executed: Vec<(Timestamp, Step)>,
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::ReadUser => "ReadUser",
        Step::Blocked(_) => "Blocked",
        Step::ClaimUser => "ClaimUser",
        Step::TakeOverTags { .. } => "TakeOverTags",
        Step::DeleteOrphan { .. } => "DeleteOrphan",
        Step::AdoptSecretKey { .. } => "AdoptSecretKey",
        Step::ForgetKey { .. } => "ForgetKey",
        Step::DisownKey { .. } => "DisownKey",
        Step::UntagStale { .. } => "UntagStale",
        Step::MakeRoom { .. } => "MakeRoom",
        Step::StartCreate { .. } => "StartCreate",
        Step::ClearPending => "ClearPending",
        Step::CreateKey { .. } => "CreateKey",
        Step::DeactivateUnused { .. } => "DeactivateUnused",
        Step::SetKeyStatus { .. } => "SetKeyStatus",
        Step::RestartTargets { .. } => "RestartTargets",
        Step::RewriteSecret { .. } => "RewriteSecret",
        Step::CheckKeyUsage { .. } => "CheckKeyUsage",
        Step::RetireKey { .. } => "RetireKey",
        Step::DeleteRetired { .. } => "DeleteRetired",
        Step::RefreshLastUsed { .. } => "RefreshLastUsed",
        Step::Done { .. } => "Done",
    }
}

fn current_of(status: &IamAccessKeyStatus) -> Option<&OwnedKey> {
    status.keys.iter().find(|k| k.phase == KeyPhase::Current)
}

fn view_keys(run: &mut Run) -> &mut Vec<IamKey> {
    match &mut run.user {
        UserObservation::Found { keys, .. } => keys,
        UserObservation::Missing => unreachable!("the simulated user always exists"),
    }
}

fn view_tags(run: &mut Run) -> Option<&mut BTreeMap<String, String>> {
    match &mut run.user {
        UserObservation::Found { tags, .. } => tags.as_mut(),
        UserObservation::Missing => None,
    }
}

impl Sim {
    fn new(h: &History) -> Self {
        Sim {
            now: Timestamp::from_second(START).unwrap(),
            owner: Owner::new("c", "ns", "app"),
            keys: vec![],
            tags: BTreeMap::new(),
            next_id: 0,
            verify_fails: false,
            key_status: h.key_status,
            rotation: h.rotation,
            serial: 0,
            restart_targets: h.restart_targets,
            requested_at: None,
            resource_version: 1,
            status: IamAccessKeyStatus::default(),
            limits: Limits {
                policies: vec!["team-policy".into()],
                max_key_age: MAX_KEY_AGES[h.policy.0].map(Duration::from_secs),
                deactivate_unused_after: UNUSED_AFTERS[h.policy.1].map(Duration::from_secs),
                ..Default::default()
            },
            policy_reads_user: h.policy.2,
            secret: SecretObservation::Missing,
            run: None,
            last_used_due: None,
            last_used_read_at: None,
            failpoint: None,
            client_key: None,
            created_by_operator: BTreeSet::new(),
            foreign: BTreeMap::new(),
            last_writer: BTreeMap::new(),
            deleted_by_person: BTreeSet::new(),
            must_be_replaced: BTreeMap::new(),
            trace: vec![],
            violations: vec![],
            coverage: Coverage::default(),
            executed: vec![],
        }
    }

    fn elapsed(&self) -> i64 {
        self.now.as_second() - START
    }

    fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    fn violation(&mut self, invariant: &str, detail: String) {
        let line = format!("VIOLATED {invariant}: {detail}");
        self.trace.push(line.clone());
        self.violations.push(line);
    }

    /// The spec as the user wrote it now.
    fn spec(&self) -> IamAccessKeySpec {
        let mut spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({"userName": "app"})).unwrap();
        spec.key_status = self.key_status;
        spec.rotation = match self.rotation {
            Some(r) => Some(RotationSpec {
                interval: INTERVALS[r.interval].map(Duration::from_secs),
                grace_period: Duration::from_secs(GRACES[r.grace]),
                retain_inactive: Duration::from_secs(RETAINS[r.retain]),
                serial: self.serial,
                wait_for_unused: r.wait_for_unused,
                usage_check_interval: Duration::from_secs(USAGE_CHECK_INTERVAL),
                max_wait: Duration::from_secs(MAX_WAIT),
            }),
            // `serial` lives in `spec.rotation`: bumping it writes the block with its defaults.
            None if self.serial > 0 => Some(RotationSpec { serial: self.serial, ..Default::default() }),
            None => None,
        };
        if self.restart_targets {
            spec.restart_targets = vec![RestartTarget { kind: RestartKind::Deployment, name: "app".into() }];
        }
        spec
    }

    fn secret_key(&self) -> Option<&str> {
        match &self.secret {
            SecretObservation::Ours { access_key_id } => access_key_id.as_deref(),
            _ => None,
        }
    }

    fn iam_key(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    fn list_access_keys(&self) -> Vec<IamKey> {
        self.keys
            .iter()
            .map(|k| IamKey { access_key_id: k.id.clone(), status: k.status, create_date: k.create_date })
            .collect()
    }

    /// IAM CreateAccessKey, for anyone.
    fn create_access_key(&mut self) -> Result<Key, String> {
        if self.keys.len() >= MAX_KEYS_PER_USER {
            return Err("LimitExceeded".into());
        }
        self.next_id += 1;
        let key =
            Key { id: format!("K{}", self.next_id), status: KeyStatus::Active, create_date: self.now, last_used: None };
        self.keys.push(key.clone());
        Ok(key)
    }

    // -----------------------------------------------------------------------------------------
    // The history

    fn apply(&mut self, event: Event) {
        self.log(format!("t+{}s {event:?}", self.elapsed()));
        match event {
            Event::Step => {
                self.step();
            }
            Event::Reconcile => {
                self.reconcile();
            }
            Event::Wait(i) => self.now += secs(WAITS[i]),
            Event::Crash => self.crash("between steps"),
            Event::ArmFailpoint(fp) => self.failpoint = Some(fp),
            Event::BumpSerial => {
                self.remember_current_must_be_replaced("serial");
                self.serial += 1;
                self.resource_version += 1;
            }
            Event::RequestRotation => {
                let value = self.now.to_string();
                if self.requested_at.as_ref() != Some(&value) {
                    // The same second as a request already served is that request.
                    let served = self.status.rotation.as_ref().and_then(|r| r.requested_at.as_ref());
                    if served != Some(&value) {
                        self.remember_current_must_be_replaced("requested");
                    }
                    self.requested_at = Some(value);
                    self.resource_version += 1;
                }
            }
            Event::RequestAnnotationRemoved => {
                // A request withdrawn before it was served is cancelled.
                if self.requested_at.take().is_some() {
                    self.resource_version += 1;
                    for why in self.must_be_replaced.values_mut() {
                        why.remove("requested");
                    }
                    self.must_be_replaced.retain(|_, why| !why.is_empty());
                }
            }
            Event::DeleteSecret => {
                if let Some(id) = self.secret_key() {
                    self.must_be_replaced.entry(id.to_owned()).or_default().insert("secret lost");
                }
                self.secret = SecretObservation::Missing;
            }
            Event::PersonDeactivates(i) | Event::PersonReactivates(i) => {
                let status =
                    if matches!(event, Event::PersonDeactivates(_)) { KeyStatus::Inactive } else { KeyStatus::Active };
                if let Some(key) = self.keys.get_mut(i) {
                    key.status = status;
                    let id = key.id.clone();
                    self.last_writer.insert(id.clone(), Writer::Person);
                    if let Some(s) = self.foreign.get_mut(&id) {
                        *s = status;
                    }
                }
            }
            Event::PersonDeletes(i) => {
                if i < self.keys.len() {
                    // Deleting a key in the console leaves the user's tags as they are.
                    let key = self.keys.remove(i);
                    self.foreign.remove(&key.id);
                    self.deleted_by_person.insert(key.id);
                }
            }
            Event::PersonAddsKey { tagged, active } => {
                // Documented limitation (docs/decisions.md): an untagged key created while a
                // create of ours is in progress is taken for the remains of that create. People
                // therefore only add untagged keys while no create is running, nor one pending
                // whose window (around `since`) includes now.
                let in_window = self.status.pending_create.as_ref().is_some_and(|p| {
                    let key = IamKey { access_key_id: String::new(), status: KeyStatus::Active, create_date: self.now };
                    left_by_interrupted_create(&key, &Ledger::from_status(&self.status)) || p.since.0 > self.now
                });
                if !tagged && (in_window || self.run.is_some()) {
                    return self.check_world();
                }
                if let Ok(mut key) = self.create_access_key() {
                    if !active {
                        key.status = KeyStatus::Inactive;
                        self.keys.last_mut().unwrap().status = KeyStatus::Inactive;
                    }
                    if tagged {
                        self.tags.insert(key.id.clone(), FOREIGN_TAG.into());
                    }
                    self.last_writer.insert(key.id.clone(), Writer::Person);
                    self.foreign.insert(key.id, key.status);
                }
            }
            Event::SpecKeyStatus(s) => {
                if s != self.key_status {
                    self.key_status = s;
                    self.resource_version += 1;
                }
            }
            Event::SpecRotation(r) => {
                if r != self.rotation {
                    self.rotation = r;
                    self.resource_version += 1;
                }
            }
            Event::SpecRestartTargets(b) => {
                if b != self.restart_targets {
                    self.restart_targets = b;
                    self.resource_version += 1;
                }
            }
            Event::ClientUsesItsKey => self.client_uses_its_key(),
            Event::ClientReloadsSecret => self.client_key = self.secret_key().map(str::to_owned),
            Event::VerifyFailsOnce => self.verify_fails = true,
            Event::TenantForgesStatus(forgery) => self.forge(forgery),
        }
        self.check_world();
    }

    /// A status write by someone other than the operator.
    fn forge(&mut self, forgery: Forgery) {
        if self.run.is_some() {
            return;
        }
        let day = secs(86_400);
        match forgery {
            Forgery::PendingLongAgo | Forgery::PendingAhead => {
                // Long ago: before anything in this world was created. A forged `since` close
                // to the creation of a person's untagged key would have it taken for our remains
                // (documented limitation).
                let since = match forgery {
                    Forgery::PendingLongAgo => Timestamp::from_second(START).unwrap() - secs(30 * 86_400),
                    _ => self.now + day,
                };
                // Our own untagged crash remains are no longer recognised: from now on they are
                // as foreign as a person's key (a leak the forgery causes, never a wrong delete).
                let ledger = Ledger::from_status(&self.status);
                let lost: Vec<(String, KeyStatus)> = self
                    .keys
                    .iter()
                    .filter(|k| !self.tags.contains_key(&k.id) && !self.foreign.contains_key(&k.id))
                    .filter(|k| !ledger.keys.iter().any(|o| o.access_key_id == k.id))
                    .map(|k| (k.id.clone(), k.status))
                    .collect();
                self.foreign.extend(lost);
                self.status.pending_create = Some(PendingCreate { since: Time(since), existing_key_ids: vec![] });
            }
            Forgery::ListsForeignKey(phase) => {
                let Some(id) = self.foreign.keys().next().cloned() else { return };
                if self
                    .status
                    .keys
                    .iter()
                    .any(|k| k.access_key_id == id || (phase == KeyPhase::Current && k.phase == phase))
                {
                    return;
                }
                let past = Time(self.now - secs(1));
                self.status.keys.push(OwnedKey {
                    access_key_id: id,
                    phase,
                    create_date: Time(self.now - day),
                    deactivate_at: (phase == KeyPhase::Draining).then(|| past.clone()),
                    delete_at: (phase == KeyPhase::Inactive).then(|| past.clone()),
                    replaced_at: (phase == KeyPhase::Draining).then(|| Time(self.now - day)),
                    last_used_at: None,
                    usage_checked_at: None,
                });
            }
            Forgery::KeysWiped => {
                // The key in the Secret is adopted again, which records every rotation asked for
                // as served: wiping status cancels the tenant's own pending requests.
                self.status.keys.clear();
                for why in self.must_be_replaced.values_mut() {
                    why.remove("requested");
                    why.remove("serial");
                }
                self.must_be_replaced.retain(|_, why| !why.is_empty());
            }
        }
        self.resource_version += 1;
    }

    fn remember_current_must_be_replaced(&mut self, why: &'static str) {
        if let Some(c) = current_of(&self.status) {
            self.must_be_replaced.entry(c.access_key_id.clone()).or_default().insert(why);
        }
    }

    fn client_uses_its_key(&mut self) {
        let now = self.now;
        if let Some(id) = self.client_key.clone()
            && let Some(key) = self.keys.iter_mut().find(|k| k.id == id && k.status == KeyStatus::Active)
        {
            key.last_used = Some(now);
        }
    }

    /// The operator process dies: the running reconcile and everything in memory are gone.
    fn crash(&mut self, at: &str) {
        self.log(format!("  CRASH {at}"));
        *self.coverage.crashes.entry(at.to_owned()).or_default() += 1;
        self.run = None;
        self.last_used_due = None;
        self.last_used_read_at = None;
    }

    // -----------------------------------------------------------------------------------------
    // The operator

    fn observe(&self) -> Run {
        Run {
            now: self.now,
            spec: self.spec(),
            requested_at: self.requested_at.clone(),
            resource_version: self.resource_version,
            status: self.status.clone(),
            saved: self.status.clone(),
            // A policy that depends on the user's path or tags has the user read first.
            user: UserObservation::Found {
                keys: self.list_access_keys(),
                tags: self.policy_reads_user.then(|| self.tags.clone()),
            },
            secret: self.secret.clone(),
            steps: 0,
        }
    }

    /// `Context::last_used_due`: in memory; after a restart, spread over one refresh interval.
    fn last_used_due(&mut self, run: &Run) -> Option<Timestamp> {
        if self.last_used_due.is_none() {
            self.last_used_due = Some(run.now + secs(LAST_USED_REFRESH / 2));
        }
        self.last_used_due
    }

    fn reconcile(&mut self) -> Outcome {
        loop {
            match self.step() {
                Outcome::Continue => {}
                other => return other,
            }
        }
    }

    /// Plan one step and execute it, starting a reconcile when none is running.
    fn step(&mut self) -> Outcome {
        let mut run = match self.run.take() {
            Some(run) => run,
            None => self.observe(),
        };
        if run.steps == MAX_STEPS_PER_RECONCILE {
            let _ = self.save_status(&mut run);
            return Outcome::StepLimit;
        }
        run.steps += 1;
        let ledger = Ledger::from_status(&run.status);
        let last_used_due = self.last_used_due(&run);
        let current_last_used = current_of(&run.status).and_then(|c| {
            let used = run.status.last_used.as_ref().filter(|u| u.access_key_id == c.access_key_id)?;
            used.date.as_ref().map(|t| t.0)
        });
        let step = plan_next_step(&Observation {
            now: run.now,
            owner: &self.owner,
            previous_owner: None,
            spec: &run.spec,
            ledger: &ledger,
            rotate_requested_at: run.requested_at.as_deref(),
            user: &run.user,
            secret: &run.secret,
            last_used_due,
            current_last_used,
            last_used_read_at: self.last_used_read_at,
            limits: &self.limits,
            secret_layout_stale: false,
        });
        self.log(format!("  plan: {step:?}"));
        *self.coverage.steps.entry(step_name(&step)).or_default() += 1;
        self.check_plan(&run, &ledger, &step);
        let outcome = match step {
            Step::Done { wake_at } => {
                // `succeed`: one last (conditional) status write.
                let _ = self.save_status(&mut run);
                Outcome::Done(wake_at)
            }
            Step::Blocked(blocked) => {
                let _ = self.save_status(&mut run);
                Outcome::Blocked(blocked)
            }
            step => match self.execute_recorded(&mut run, step) {
                Ok(()) => {
                    self.run = Some(run);
                    Outcome::Continue
                }
                Err(Stop::Crashed) => Outcome::Crashed,
                Err(Stop::Failed(e)) => {
                    self.log(format!("  failed: {e}"));
                    *self.coverage.failures.entry(e.clone()).or_default() += 1;
                    let _ = self.save_status(&mut run);
                    Outcome::Failed(e)
                }
            },
        };
        self.check_world();
        outcome
    }

    /// The process dies here if this failpoint is armed.
    fn failpoint(&mut self, at: Failpoint) -> Result<(), Stop> {
        if self.failpoint == Some(at) {
            self.failpoint = None;
            self.crash(&format!("{at:?}"));
            return Err(Stop::Crashed);
        }
        Ok(())
    }

    fn execute_recorded(&mut self, run: &mut Run, step: Step) -> Result<(), Stop> {
        self.executed.push((run.now, step.clone()));
        self.execute(run, step)
    }

    /// One step, with the effects of `Run::execute` in controller/apply.rs.
    fn execute(&mut self, run: &mut Run, step: Step) -> Result<(), Stop> {
        match step {
            Step::Done { .. } | Step::Blocked(_) => unreachable!("handled by the caller"),
            Step::ReadUser => {
                let tags = self.tags.clone();
                if let UserObservation::Found { tags: t, .. } = &mut run.user {
                    *t = Some(tags);
                }
            }
            Step::ClaimUser => {
                self.tags.insert(OWNER_TAG.into(), self.owner.0.clone());
                let owner = self.owner.0.clone();
                if let Some(tags) = view_tags(run) {
                    tags.insert(OWNER_TAG.into(), owner);
                }
            }
            Step::TakeOverTags { tags } => {
                self.tags.extend(tags.iter().cloned());
                if let Some(view) = view_tags(run) {
                    view.extend(tags);
                }
            }
            Step::DeleteOrphan { access_key_id, tagged } => self.delete_key(run, &access_key_id, tagged)?,
            Step::AdoptSecretKey { key } => {
                install_current(&mut run.status, &run.spec, run.requested_at.clone(), key, run.now);
                self.save_status(run)?;
            }
            Step::ForgetKey { access_key_id, .. } | Step::DisownKey { access_key_id } => {
                run.status.keys.retain(|k| k.access_key_id != access_key_id);
                self.save_status(run)?;
            }
            Step::UntagStale { tag_keys } => {
                for k in &tag_keys {
                    self.tags.remove(k);
                }
                if let Some(tags) = view_tags(run) {
                    tags.retain(|k, _| !tag_keys.contains(k));
                }
            }
            Step::MakeRoom { access_key_id } | Step::DeleteRetired { access_key_id } => {
                self.delete_key(run, &access_key_id, true)?;
                run.status.keys.retain(|k| k.access_key_id != access_key_id);
                self.save_status(run)?;
            }
            Step::StartCreate { existing_key_ids } => {
                run.status.pending_create = Some(PendingCreate { since: Time(run.now), existing_key_ids });
                self.save_status(run)?;
            }
            Step::ClearPending => {
                run.status.pending_create = None;
                self.save_status(run)?;
            }
            Step::CreateKey { reason } => self.create_key(run, reason)?,
            Step::DeactivateUnused { access_key_id, .. } => {
                self.update_access_key(run, &access_key_id, KeyStatus::Inactive, Writer::OperatorForPolicy)?;
                self.failpoint(Failpoint::MidStep)?;
                run.status.key_status = Some(KeyStatus::Inactive);
                self.save_status(run)?;
            }
            Step::SetKeyStatus { access_key_id, status, .. } => {
                self.update_access_key(run, &access_key_id, status, Writer::OperatorForSpec)?;
                self.failpoint(Failpoint::MidStep)?;
                run.status.key_status = Some(status);
                self.save_status(run)?;
            }
            Step::RetireKey { access_key_id, already_inactive, .. } => {
                if !already_inactive {
                    self.update_access_key(run, &access_key_id, KeyStatus::Inactive, Writer::OperatorRetire)?;
                    self.failpoint(Failpoint::MidStep)?;
                }
                let retain = run.spec.rotation.clone().unwrap_or_default().retain_inactive.as_signed();
                let delete_at = after(run.now, retain);
                for k in run.status.keys.iter_mut().filter(|k| k.access_key_id == access_key_id) {
                    k.phase = KeyPhase::Inactive;
                    k.delete_at = Some(Time(delete_at));
                }
                self.save_status(run)?;
            }
            Step::CheckKeyUsage { access_key_id } => {
                let used = self.access_key_last_used(&access_key_id)?;
                for k in run.status.keys.iter_mut().filter(|k| k.access_key_id == access_key_id) {
                    k.last_used_at = used.map(Time);
                    k.usage_checked_at = Some(Time(run.now));
                }
                self.save_status(run)?;
            }
            // The Secret's layout (format, labels) is not modelled: the world never asks for it.
            Step::RewriteSecret { .. } => unreachable!("secret_layout_stale is always false here"),
            Step::RestartTargets { access_key_id } => {
                // The rollout makes the client read the Secret again.
                if !run.spec.restart_targets.is_empty() {
                    self.client_key = self.secret_key().map(str::to_owned);
                }
                run.status.restarted_for = Some(access_key_id);
                self.save_status(run)?;
            }
            Step::RefreshLastUsed { access_key_id } => {
                let used = self.access_key_last_used(&access_key_id)?;
                let record = LastUsed {
                    date: used.map(Time),
                    service_name: None,
                    region: None,
                    checked_at: Time(run.now),
                    access_key_id,
                };
                let changed = run
                    .status
                    .last_used
                    .as_ref()
                    .is_none_or(|old| LastUsed { checked_at: old.checked_at.clone(), ..record.clone() } != *old);
                if changed {
                    run.status.last_used = Some(record);
                    self.save_status(run)?;
                }
                self.last_used_due = Some(run.now + secs(LAST_USED_REFRESH));
                self.last_used_read_at = Some(run.now);
            }
        }
        Ok(())
    }

    /// Create -> tag -> verify -> publish -> record, with apply.rs's failpoints.
    fn create_key(&mut self, run: &mut Run, reason: NewKeyReason) -> Result<(), Stop> {
        // The reconcile's clock may be far behind (the world waited while it ran): an old
        // pendingCreate is renewed by the real clock before creating.
        if let Some(pending) = run.status.pending_create.as_mut()
            && !create_window_open(pending.since.0, self.now)
        {
            pending.since = Time(self.now);
            self.save_status(run)?;
        }
        let key = self.create_access_key().map_err(Stop::Failed)?;
        let id = key.id.clone();
        self.created_by_operator.insert(id.clone());
        self.failpoint(Failpoint::AfterCreateKey)?;
        self.tags.insert(id.clone(), self.owner.key_tag_value());
        self.failpoint(Failpoint::AfterTag)?;
        let iam_key = IamKey { access_key_id: id.clone(), status: key.status, create_date: key.create_date };
        view_keys(run).push(iam_key.clone());
        let tag_value = self.owner.key_tag_value();
        if let Some(tags) = view_tags(run) {
            tags.insert(id.clone(), tag_value);
        }
        if std::mem::take(&mut self.verify_fails) {
            // Never publish a key that does not work; nobody else has its secret.
            self.delete_key(run, &id, true)?;
            return Err(Stop::Failed("KeyVerificationFailed".into()));
        }
        // Publish: POST when the Secret was missing (fails if it appeared), else server-side apply.
        match (&run.secret, &self.secret) {
            (SecretObservation::Missing, SecretObservation::Missing) | (SecretObservation::Ours { .. }, _) => {}
            (SecretObservation::Missing, _) => return Err(Stop::Failed("Secret AlreadyExists".into())),
            (SecretObservation::NotOurs, _) => return Err(Stop::Failed("SecretConflict".into())),
        }
        self.secret = SecretObservation::Ours { access_key_id: Some(id.clone()) };
        self.failpoint(Failpoint::AfterSecret)?;
        run.secret = self.secret.clone();
        install_current(&mut run.status, &run.spec, run.requested_at.clone(), iam_key, run.now);
        if let Some(r) = run.status.rotation.as_mut() {
            r.last_reason = Some(reason.as_str().into());
        }
        self.failpoint(Failpoint::BeforeStatus)?;
        // Recorded by the reconcile's last status write; the first last-use read waits a refresh.
        self.last_used_due = Some(run.now + secs(LAST_USED_REFRESH));
        self.last_used_read_at = None;
        Ok(())
    }

    /// `Run::delete_key`: delete (a key already gone is fine), then untag.
    fn delete_key(&mut self, run: &mut Run, id: &str, untag: bool) -> Result<(), Stop> {
        if self.foreign.contains_key(id) {
            self.violation("never_touches_foreign_keys", format!("deleted foreign key {id}"));
        }
        if self.secret_key() == Some(id) {
            self.violation("never_deletes_the_published_key", format!("deleted {id}, the key in the Secret"));
        }
        if current_of(&run.status).is_some_and(|c| c.access_key_id == id) {
            self.violation("never_deletes_the_current_key", format!("deleted {id}, the current key"));
        }
        self.keys.retain(|k| k.id != id);
        self.failpoint(Failpoint::MidStep)?;
        if untag {
            self.tags.remove(id);
        }
        view_keys(run).retain(|k| k.access_key_id != id);
        if let Some(tags) = view_tags(run) {
            tags.remove(id);
        }
        Ok(())
    }

    fn update_access_key(&mut self, run: &mut Run, id: &str, status: KeyStatus, writer: Writer) -> Result<(), Stop> {
        if self.foreign.contains_key(id) {
            self.violation("never_touches_foreign_keys", format!("set foreign key {id} {status:?}"));
        }
        let Some(key) = self.keys.iter_mut().find(|k| k.id == id) else {
            return Err(Stop::Failed("NoSuchEntity".into()));
        };
        key.status = status;
        self.last_writer.insert(id.to_owned(), writer);
        for k in view_keys(run).iter_mut().filter(|k| k.access_key_id == id) {
            k.status = status;
        }
        Ok(())
    }

    fn access_key_last_used(&self, id: &str) -> Result<Option<Timestamp>, Stop> {
        self.iam_key(id).map(|k| k.last_used).ok_or_else(|| Stop::Failed("NoSuchEntity".into()))
    }

    /// `derive_summary` + the conditional status write (resourceVersion must be unchanged).
    fn save_status(&mut self, run: &mut Run) -> Result<(), Stop> {
        let keys = match &run.user {
            UserObservation::Found { keys, .. } => keys.clone(),
            UserObservation::Missing => vec![],
        };
        let status = &mut run.status;
        let current = current_of(status).cloned();
        status.access_key_id = current.as_ref().map(|k| k.access_key_id.clone());
        status.create_date = current.as_ref().map(|k| k.create_date.clone());
        status.key_status =
            current.as_ref().and_then(|c| keys.iter().find(|k| k.access_key_id == c.access_key_id)).map(|k| k.status);
        status.next_rotation_at = current.as_ref().and_then(|c| rotation_due_at(&run.spec, &self.limits, c)).map(Time);
        status.secret_name = current.as_ref().map(|_| "app".to_owned());
        let tracked: BTreeSet<&str> = status.keys.iter().map(|k| k.access_key_id.as_str()).collect();
        status.foreign_keys = keys.iter().filter(|k| !tracked.contains(k.access_key_id.as_str())).count() as u32;
        if run.status == run.saved {
            return Ok(());
        }
        if run.resource_version != self.resource_version {
            return Err(Stop::Failed("Conflict: the resource changed since it was read".into()));
        }
        self.status = run.status.clone();
        self.resource_version += 1;
        run.resource_version = self.resource_version;
        run.saved = run.status.clone();
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Safety invariants

    /// What the planner asks for, judged against what it was shown.
    fn check_plan(&mut self, run: &Run, ledger: &Ledger, step: &Step) {
        let view_len = match &run.user {
            UserObservation::Found { keys, .. } => keys.len(),
            UserObservation::Missing => 0,
        };
        let current = ledger.keys.iter().find(|k| k.phase == KeyPhase::Current);
        let owned = |id: &str| ledger.keys.iter().find(|k| k.access_key_id == id);
        let rotation = run.spec.rotation.clone().unwrap_or_default();
        let secret_key = match &run.secret {
            SecretObservation::Ours { access_key_id } => access_key_id.as_deref(),
            _ => None,
        };
        match step {
            Step::StartCreate { .. } | Step::CreateKey { .. } if view_len >= MAX_KEYS_PER_USER => {
                self.violation("creates_only_with_a_free_slot", format!("{step:?} with {view_len} keys"));
            }
            Step::DeleteOrphan { access_key_id: id, .. }
            | Step::MakeRoom { access_key_id: id }
            | Step::DeleteRetired { access_key_id: id }
            | Step::RetireKey { access_key_id: id, .. } => {
                if self.foreign.contains_key(id) {
                    self.violation("never_touches_foreign_keys", format!("{step:?}"));
                }
                if current.is_some_and(|c| c.access_key_id == *id) || secret_key == Some(id.as_str()) {
                    self.violation("never_deletes_the_current_key", format!("{step:?}"));
                }
            }
            Step::SetKeyStatus { access_key_id: id, .. } | Step::DeactivateUnused { access_key_id: id, .. }
                if current.is_none_or(|c| c.access_key_id != *id) =>
            {
                self.violation("status_follows_spec_only_for_the_current_key", format!("{step:?}"));
            }
            _ => {}
        }
        match step {
            Step::RetireKey { access_key_id: id, still_in_use, .. } => {
                let k = owned(id);
                if k.is_none_or(|k| k.phase != KeyPhase::Draining) {
                    self.violation("retires_only_draining_keys", format!("{step:?}: {k:?}"));
                }
                if k.and_then(|k| k.deactivate_at.as_ref()).is_some_and(|t| t.0 > run.now) {
                    self.violation("grace_period_respected", format!("{step:?} before deactivateAt: {k:?}"));
                }
                let gave_up_at =
                    k.and_then(|k| k.replaced_at.as_ref()).map(|t| after(t.0, rotation.max_wait.as_signed()));
                if *still_in_use && gave_up_at.is_none_or(|t| t > run.now) {
                    self.violation("retired_in_use_only_after_max_wait", format!("{step:?}: {k:?}"));
                }
            }
            Step::DeactivateUnused { access_key_id: id, .. } => {
                // IAM's truth, not the operator's last reading of it.
                let limit = self.limits.deactivate_unused_after.map(|d| d.as_signed());
                let last = self.iam_key(id).map(|k| k.last_used.unwrap_or(k.create_date));
                // A use in the very second of the operator's reading cannot be seen by it (nor is
                // it by IAM, whose last-use data lags); any earlier use must have been seen.
                let seen_by_the_reading = |t: Timestamp| self.last_used_read_at.is_none_or(|read| t < read);
                if let (Some(limit), Some(last)) = (limit, last)
                    && after(last, limit) > run.now
                    && seen_by_the_reading(last)
                {
                    self.violation(
                        "deactivates_only_unused_keys",
                        format!("{step:?}, but IAM shows {id} used at {last} (limit {limit:?}, now {})", run.now),
                    );
                }
            }
            Step::DeleteRetired { access_key_id: id } => {
                let k = owned(id);
                if k.is_none_or(|k| {
                    k.phase != KeyPhase::Inactive || k.delete_at.as_ref().is_some_and(|t| t.0 > run.now)
                }) {
                    self.violation("rollback_window_respected", format!("{step:?}: {k:?}"));
                }
            }
            _ => {}
        }
    }

    /// The state of the world, after every step and every event.
    fn check_world(&mut self) {
        if self.keys.len() > MAX_KEYS_PER_USER {
            self.violation("at_most_two_keys", format!("{:?}", self.keys));
        }
        let foreign: Vec<(String, KeyStatus)> = self.foreign.iter().map(|(k, s)| (k.clone(), *s)).collect();
        for (id, status) in foreign {
            let now = self.iam_key(&id).map(|k| k.status);
            if now != Some(status) {
                self.violation("foreign_keys_keep_their_status", format!("{id}: {status:?} -> {now:?}"));
            }
        }
        // The key in the Secret works from the moment it is published until it is replaced,
        // unless a person deactivated or deleted it, or spec.keyStatus made it Inactive.
        if let Some(id) = self.secret_key().map(str::to_owned) {
            match self.iam_key(&id).map(|k| k.status) {
                None if self.deleted_by_person.contains(&id) => {}
                None => self.violation("published_key_works", format!("{id} is in the Secret but not in IAM")),
                Some(KeyStatus::Inactive) => match self.last_writer.get(&id) {
                    Some(Writer::Person | Writer::OperatorForSpec | Writer::OperatorForPolicy) => {}
                    w => self.violation("published_key_works", format!("{id} is in the Secret, Inactive by {w:?}")),
                },
                Some(KeyStatus::Active) => {}
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Liveness

    /// Leave the world alone and let time pass: the resource must converge and stay converged.
    fn settle(&mut self) -> Result<(), String> {
        self.log(format!("t+{}s settle: no more disturbances", self.elapsed()));
        self.failpoint = None;
        self.verify_fails = false;
        // The reconcile running at the end of the history ends as it may (e.g. a conflict).
        if self.run.is_some() {
            self.reconcile();
        }
        let start = self.now;
        let end = start + secs(SETTLE_FOR);
        let mut steps = 0;
        let mut done_once = false;
        for _ in 0..500 {
            // A well-behaved client follows the Secret.
            self.client_key = self.secret_key().map(str::to_owned);
            self.client_uses_its_key();
            let outcome = self.step();
            if !self.violations.is_empty() {
                return Ok(());
            }
            steps += 1;
            match outcome {
                Outcome::Continue | Outcome::StepLimit => {
                    if !done_once && steps > STEPS_TO_DONE {
                        return Err(format!("no Done within {STEPS_TO_DONE} steps of a quiet world"));
                    }
                }
                Outcome::Done(wake_at) => {
                    if !done_once {
                        self.coverage.max_steps_to_done = self.coverage.max_steps_to_done.max(steps);
                        done_once = true;
                    }
                    self.check_converged(wake_at)?;
                    if self.now >= end {
                        return self.check_settled(start);
                    }
                    let wake = wake_at.ok_or("Done without a wake-up time, yet a key is current")?;
                    self.now = wake.min(end);
                    self.log(format!("t+{}s wake", self.elapsed()));
                }
                Outcome::Blocked(Blocked::KeyLimitExceeded { blocking }) => return self.check_key_limit(&blocking),
                Outcome::Blocked(Blocked::KeyUnused { access_key_id, .. }) => {
                    // The current key is Inactive (by the policy, or by a person — then the
                    // policy does not revert it) and IAM shows no use for deactivateUnusedAfter:
                    // a person must rotate.
                    // A use in the very second of the operator's last reading is not seen by it
                    // (as in `deactivates_only_unused_keys`); after a restart, the reading is the
                    // one status records.
                    let limit = self.limits.deactivate_unused_after.map(|d| d.as_signed());
                    let recorded = self.status.last_used.as_ref().filter(|u| u.access_key_id == access_key_id);
                    let read_at = self.last_used_read_at.max(recorded.map(|u| u.checked_at.0));
                    let seen_by_the_reading = |t: Timestamp| read_at.is_none_or(|read| t < read);
                    let unused = self.iam_key(&access_key_id).is_some_and(|k| {
                        let last = k.last_used.unwrap_or(k.create_date);
                        k.status == KeyStatus::Inactive
                            && limit.is_some_and(|l| after(last, l) <= self.now || !seen_by_the_reading(last))
                    });
                    if !unused || current_of(&self.status).is_none_or(|c| c.access_key_id != access_key_id) {
                        return Err(format!("key_unused_only_for_an_unused_inactive_current_key: {access_key_id}"));
                    }
                    self.coverage.legit_key_unused += 1;
                    return Ok(());
                }
                Outcome::Blocked(b) => return Err(format!("blocked in a quiet world: {b:?}")),
                Outcome::Failed(e) => return Err(format!("failed in a quiet world: {e}")),
                Outcome::Crashed => unreachable!("failpoints are disarmed"),
            }
        }
        Err("did not settle within 500 steps".into())
    }

    /// At every `Done` of a quiet world.
    fn check_converged(&mut self, wake_at: Option<Timestamp>) -> Result<(), String> {
        let status = &self.status;
        let spec = self.spec();
        let rotation = spec.rotation.clone().unwrap_or_default();
        // When a replaced key must retire (Draining) or be deleted (Inactive).
        let due = |k: &OwnedKey| match k.phase {
            KeyPhase::Draining => {
                let grace_end = k.deactivate_at.as_ref().map(|t| t.0);
                let give_up = k.replaced_at.as_ref().map(|t| after(t.0, rotation.max_wait.as_signed()));
                if rotation.wait_for_unused { grace_end.max(give_up) } else { grace_end }
            }
            _ => k.delete_at.as_ref().map(|t| t.0),
        };
        let currents: Vec<&OwnedKey> = status.keys.iter().filter(|k| k.phase == KeyPhase::Current).collect();
        let current = match currents[..] {
            [] => None,
            [current] => Some(current),
            _ => return Err(format!("at_most_one_current_key: {:?}", status.keys)),
        };
        let published = current.is_some_and(|c| self.secret_key() == Some(c.access_key_id.as_str()));
        if !published {
            // The Secret or the current key was lost and the new key waits for the slot a
            // draining key frees when it retires — and the operator wakes up by then. While it
            // waits, a lost current key is not looked after (drift on it is not reverted).
            let slot_frees_at = status
                .keys
                .iter()
                .filter(|k| k.phase == KeyPhase::Draining && self.keys.len() >= MAX_KEYS_PER_USER)
                .find_map(|k| due(k).filter(|t| *t > self.now));
            if slot_frees_at.is_none() || wake_at > slot_frees_at {
                return Err(format!(
                    "current_key_is_published: keys {:?}, Secret {:?}, wake {wake_at:?}",
                    status.keys, self.secret
                ));
            }
        }
        if let Some(current) = current.filter(|_| published) {
            let id = current.access_key_id.as_str();
            match self.iam_key(id) {
                Some(k) if k.status == spec.key_status => {}
                k => return Err(format!("current_key_works: {id} is {k:?} in IAM, spec says {:?}", spec.key_status)),
            }
            if status.pending_create.is_some() {
                return Err(format!("no_pending_create: {:?}", status.pending_create));
            }
        }
        // Exactly the keys status names (plus the foreign ones): no leaked key, no ghost.
        let in_iam: BTreeSet<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        let named: BTreeSet<&str> = status
            .keys
            .iter()
            .map(|k| k.access_key_id.as_str())
            .chain(self.foreign.keys().map(String::as_str))
            .collect();
        if in_iam != named {
            return Err(format!("exactly_the_keys_status_names: IAM {in_iam:?}, status + foreign {named:?}"));
        }
        let Some(wake) = wake_at else { return Err("Done without a wake-up time".into()) };
        if wake <= self.now {
            return Err(format!("wakes_in_the_future: Done with wake_at {wake} at {}", self.now));
        }
        // Nothing overdue: each replaced key is still inside its grace or rollback window.
        for k in status.keys.iter().filter(|k| k.phase != KeyPhase::Current) {
            if due(k).is_none_or(|due| due <= self.now) {
                return Err(format!("retirements_on_time: {k:?} is overdue at {}", self.now));
            }
        }
        if let Some(due) = current.and_then(|c| rotation_due_at(&spec, &self.limits, c))
            && due <= self.now
            && !status.keys.iter().any(|k| k.phase == KeyPhase::Draining)
        {
            return Err(format!("scheduled_rotation_happens: due at {due}, now {}", self.now));
        }
        Ok(())
    }

    /// After two quiet days: every rotation asked for happened and finished.
    fn check_settled(&mut self, start: Timestamp) -> Result<(), String> {
        let status = &self.status;
        let record = status.rotation.clone().unwrap_or_default();
        if self.serial > record.serial {
            return Err(format!("serial_bump_rotates: spec serial {}, rotated {}", self.serial, record.serial));
        }
        if self.requested_at.is_some() && self.requested_at != record.requested_at {
            return Err(format!("requested_rotation_happens: {:?} vs {:?}", self.requested_at, record.requested_at));
        }
        for k in &status.keys {
            if k.phase == KeyPhase::Current
                && let Some(why) = self.must_be_replaced.get(&k.access_key_id)
            {
                return Err(format!(
                    "requested_rotation_replaces_the_key: {} is still current ({why:?})",
                    k.access_key_id
                ));
            }
            if k.phase != KeyPhase::Current && k.replaced_at.as_ref().is_none_or(|t| t.0 < start) {
                return Err(format!("every_rotation_finishes: {k:?} replaced before the quiet period is still here"));
            }
        }
        self.coverage.rotations_settled += 1;
        Ok(())
    }

    /// `KeyLimitExceeded` is fine only when keys we may not remove fill both slots.
    fn check_key_limit(&mut self, blocking: &[String]) -> Result<(), String> {
        let current = current_of(&self.status).map(|k| k.access_key_id.clone());
        let removable_or_ours: Vec<&String> =
            blocking.iter().filter(|id| !self.foreign.contains_key(*id) && Some(*id) != current.as_ref()).collect();
        if !removable_or_ours.is_empty() || !blocking.iter().any(|id| self.foreign.contains_key(id)) {
            return Err(format!(
                "key_limit_only_when_foreign_keys_fill_the_slots: blocked by {blocking:?} (ours, not current: \
                 {removable_or_ours:?}); status keys {:?}",
                self.status.keys
            ));
        }
        self.coverage.legit_key_limit += 1;
        Ok(())
    }

    fn report(&self, h: &History) -> String {
        let skip = self.trace.len().saturating_sub(150);
        format!(
            "{}\nspec at start: keyStatus {:?}, rotation {:?}, restartTargets {}\ntrace (last {} lines):\n{}",
            self.violations.join("\n"),
            h.key_status,
            h.rotation,
            h.restart_targets,
            self.trace.len() - skip,
            self.trace[skip..].join("\n")
        )
    }
}

/// Play a history, then the quiet period; violations are collected in the returned world.
fn play(h: &History) -> Sim {
    let mut sim = Sim::new(h);
    for &event in &h.events {
        sim.apply(event);
        if !sim.violations.is_empty() {
            return sim;
        }
    }
    if let Err(e) = sim.settle() {
        sim.violation("liveness", e);
    }
    sim
}

fn config() -> ProptestConfig {
    // 256 cases unless PROPTEST_CASES says otherwise; no regression files in the source tree.
    ProptestConfig { failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_histories_keep_every_invariant_and_converge(h in history()) {
        let sim = play(&h);
        prop_assert!(sim.violations.is_empty(), "{}", sim.report(&h));
    }
}

/// The generator must keep reaching the interesting places: every kind of step, every crash
/// point, the failures the world can cause, and both endings of the quiet period.
#[test]
fn random_histories_reach_every_step_and_crash_point() {
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config { cases: 128, failure_persistence: None, ..Config::default() },
        proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let mut total = Coverage::default();
    for _ in 0..128 {
        let h = proptest::strategy::ValueTree::current(&history().new_tree(&mut runner).unwrap());
        let sim = play(&h);
        for (k, n) in sim.coverage.steps {
            *total.steps.entry(k).or_default() += n;
        }
        for (k, n) in sim.coverage.crashes {
            *total.crashes.entry(k).or_default() += n;
        }
        for (k, n) in sim.coverage.failures {
            *total.failures.entry(k).or_default() += n;
        }
        total.legit_key_limit += sim.coverage.legit_key_limit;
        total.rotations_settled += sim.coverage.rotations_settled;
        total.max_steps_to_done = total.max_steps_to_done.max(sim.coverage.max_steps_to_done);
    }
    eprintln!("coverage over 128 histories: {total:#?}");
    for step in [
        "ReadUser",
        "ClaimUser",
        "DeleteOrphan",
        "AdoptSecretKey",
        "ForgetKey",
        "DisownKey",
        "MakeRoom",
        "StartCreate",
        "ClearPending",
        "CreateKey",
        "SetKeyStatus",
        "RestartTargets",
        "CheckKeyUsage",
        "RetireKey",
        "DeleteRetired",
        "RefreshLastUsed",
        "Blocked",
    ] {
        assert!(total.steps.contains_key(step), "no history reached {step}: {total:#?}");
    }
    for point in ["AfterCreateKey", "AfterTag", "AfterSecret", "BeforeStatus", "MidStep", "between steps"] {
        assert!(total.crashes.contains_key(point), "no crash at {point}: {total:#?}");
    }
    assert!(total.failures.keys().any(|f| f.starts_with("Conflict")), "no status write conflict: {total:#?}");
    assert!(total.failures.contains_key("KeyVerificationFailed"), "{total:#?}");
    assert!(total.legit_key_limit > 0 && total.rotations_settled > 0, "{total:#?}");
}

// ---------------------------------------------------------------------------------------------
// Counterexamples found by the simulation, kept as plain tests.

/// Found by the simulation (minimal history: create, bump serial, rotate, delete the Secret).
/// The Secret is lost while the previous key drains: the planner rightly waits for the end of
/// the grace period (both slots are ours) — but then `plan_new_key` answers `KeyLimitExceeded`
/// naming our own two keys, and the retirement in section 5 is never reached, so the draining
/// key never retires, no slot frees up, and no Secret is ever written again.
#[test]
fn secret_lost_while_a_key_drains_retires_it_instead_of_blocking_forever() {
    let t = |s: i64| Timestamp::from_second(START + s).unwrap();
    let owner = Owner::new("c", "ns", "app");
    let spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({"userName": "app"})).unwrap();
    let key = |id: &str| IamKey { access_key_id: id.into(), status: KeyStatus::Active, create_date: t(0) };
    let owned = |id: &str, phase| OwnedKey {
        access_key_id: id.into(),
        phase,
        create_date: Time(t(0)),
        deactivate_at: (phase == KeyPhase::Draining).then(|| Time(t(600))),
        delete_at: None,
        replaced_at: (phase == KeyPhase::Draining).then(|| Time(t(0))),
        last_used_at: None,
        usage_checked_at: None,
    };
    let ledger = Ledger {
        keys: vec![owned("K1", KeyPhase::Draining), owned("K2", KeyPhase::Current)],
        key_status: Some(KeyStatus::Active),
        ..Default::default()
    };
    let mut tags = BTreeMap::from([(OWNER_TAG.to_string(), owner.0.clone())]);
    tags.extend(["K1", "K2"].map(|k| (k.to_string(), owner.key_tag_value())));
    let user = UserObservation::Found { keys: vec![key("K1"), key("K2")], tags: Some(tags) };
    let limits = Limits::default();
    let plan = |now| {
        plan_next_step(&Observation {
            now,
            owner: &owner,
            previous_owner: None,
            spec: &spec,
            ledger: &ledger,
            rotate_requested_at: None,
            user: &user,
            secret: &SecretObservation::Missing,
            last_used_due: Some(t(3600)),
            current_last_used: None,
            last_used_read_at: None,
            limits: &limits,
            secret_layout_stale: false,
        })
    };
    // During the grace period: wait for it to end (both slots are ours, one frees up then).
    assert_eq!(plan(t(1)), Step::Done { wake_at: Some(t(600)) });
    // At its end the draining key must be retired (then deleted after retainInactive, or
    // deleted early by MakeRoom), not reported as a key limit nobody can resolve.
    let retire = Step::RetireKey { access_key_id: "K1".into(), already_inactive: false, still_in_use: false };
    assert_eq!(plan(t(600)), retire);
}

/// Found by the simulation (policy `deactivateUnusedAfter: 24h`, a key never used per the last
/// reading, a client that used it since). Section 4 (`DeactivateUnused`) comes before section 6
/// (`RefreshLastUsed`), so the decision is taken on the last reading, however old — here the
/// read due right now is skipped and a key in use is deactivated. After a restart it is worse:
/// the next read is spread up to `--last-used-refresh` into the future, so "not due" does not
/// mean "fresh" either. The planner needs a reading taken after `since + deactivateUnusedAfter`.
#[test]
fn deactivate_unused_reads_last_use_again_before_deactivating() {
    let t = |s: i64| Timestamp::from_second(START + s).unwrap();
    let owner = Owner::new("c", "ns", "app");
    let spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({"userName": "app"})).unwrap();
    let ledger = Ledger {
        keys: vec![OwnedKey {
            access_key_id: "K1".into(),
            phase: KeyPhase::Current,
            create_date: Time(t(0)),
            deactivate_at: None,
            delete_at: None,
            replaced_at: None,
            last_used_at: None,
            usage_checked_at: None,
        }],
        key_status: Some(KeyStatus::Active),
        ..Default::default()
    };
    let keys = vec![IamKey { access_key_id: "K1".into(), status: KeyStatus::Active, create_date: t(0) }];
    let user = UserObservation::Found { keys, tags: None };
    let limits = Limits { deactivate_unused_after: Some(Duration::from_secs(86_400)), ..Default::default() };
    // Last read at t(82_800) (nothing), next read due now; the client used the key at t(84_600).
    let step = plan_next_step(&Observation {
        now: t(86_400),
        owner: &owner,
        previous_owner: None,
        spec: &spec,
        ledger: &ledger,
        rotate_requested_at: None,
        user: &user,
        secret: &SecretObservation::Ours { access_key_id: Some("K1".into()) },
        last_used_due: Some(t(86_400)),
        current_last_used: None,
        last_used_read_at: None,
        limits: &limits,
        secret_layout_stale: false,
    });
    assert_eq!(step, Step::RefreshLastUsed { access_key_id: "K1".into() });
}

/// Found by the simulation (a key adopted after a crash, already past `maxKeyAge`; equally an
/// `interval` shorter than `gracePeriod`, or `waitForUnused` holding the previous key past the
/// next interval). The rotation is due but waits for the draining key, and `Done` asked to be
/// woken at the past due time: the controller requeues `max(wake - now, 0) + 0.5s`, a hot loop
/// until the draining key retires. Fixed in `plan_owned_keys` (a past due time is not a wake).
#[test]
fn a_rotation_held_back_by_a_draining_key_does_not_wake_in_the_past() {
    let t = |s: i64| Timestamp::from_second(START + s).unwrap();
    let owner = Owner::new("c", "ns", "app");
    let mut spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({"userName": "app"})).unwrap();
    spec.rotation = Some(RotationSpec { interval: Some(Duration::from_secs(3600)), ..Default::default() });
    let owned = |id: &str, phase, deactivate_at: Option<i64>| OwnedKey {
        access_key_id: id.into(),
        phase,
        create_date: Time(t(0)),
        deactivate_at: deactivate_at.map(|s| Time(t(s))),
        delete_at: None,
        replaced_at: deactivate_at.map(|_| Time(t(0))),
        last_used_at: None,
        usage_checked_at: None,
    };
    let ledger = Ledger {
        keys: vec![owned("K1", KeyPhase::Draining, Some(4000)), owned("K2", KeyPhase::Current, None)],
        key_status: Some(KeyStatus::Active),
        ..Default::default()
    };
    let key = |id: &str| IamKey { access_key_id: id.into(), status: KeyStatus::Active, create_date: t(0) };
    let user = UserObservation::Found { keys: vec![key("K1"), key("K2")], tags: None };
    let limits = Limits::default();
    let step = plan_next_step(&Observation {
        now: t(3700),
        owner: &owner,
        previous_owner: None,
        spec: &spec,
        ledger: &ledger,
        rotate_requested_at: None,
        user: &user,
        secret: &SecretObservation::Ours { access_key_id: Some("K2".into()) },
        last_used_due: Some(t(7200)),
        current_last_used: None,
        last_used_read_at: None,
        limits: &limits,
        secret_layout_stale: false,
    });
    // The scheduled rotation (due at t(3600)) waits for K1, which retires at t(4000).
    assert_eq!(step, Step::Done { wake_at: Some(t(4000)) });
}

// ---------------------------------------------------------------------------------------------
// The timeline diagram of docs/rotation.md, drawn from the planner itself: a scripted rotation
// runs through the same world and executor, each key's phase is sampled every minute, and the
// result is rendered as SVG (docs/rotation-timeline.svg) and as a Mermaid gantt chart (in
// docs/rotation.md). `IKO_UPDATE_DOCS=1 cargo test --lib plan::simulation` rewrites both; without
// it the test fails when they no longer match what the planner does.

/// What a key is doing, as the diagram shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    Current,
    Grace,
    InUse,
    Window,
}

impl Lane {
    /// (long label, short label, fill, text colour, Mermaid tag)
    fn style(self) -> (&'static str, &'static str, &'static str, &'static str, &'static str) {
        match self {
            Lane::Current => ("Current · Active · in the Secret", "Current", "#2e7d32", "#ffffff", ""),
            Lane::Grace => ("Draining · Active (gracePeriod)", "grace", "#f9a825", "#212121", "active, "),
            Lane::InUse => ("Draining · still used (waitForUnused)", "still used", "#e65100", "#ffffff", "crit, "),
            Lane::Window => ("Inactive · rollback window (retainInactive)", "Inactive", "#b0bec5", "#212121", "done, "),
        }
    }
}

/// One key's bar: `(from, to, lane)` in minutes.
type Segments = Vec<(i64, i64, Lane)>;

/// A scripted rotation, sampled.
struct Timeline {
    title: &'static str,
    /// Minutes since the first key was created.
    requested_at: i64,
    view: (i64, i64),
    /// The old key, then the new one: `(from, to, lane)`; a key absent after its last
    /// segment was deleted.
    keys: Vec<(&'static str, Segments)>,
    deleted_at: Vec<Option<i64>>,
    /// Operator steps worth a marker: `(minute, label)`.
    marks: Vec<(i64, String)>,
}

const REQUESTED_AT_MIN: i64 = 60;
const VIEW_MIN: (i64, i64) = (45, 165);

fn scripted_rotation(wait_for_unused: bool) -> Timeline {
    let h = History {
        key_status: KeyStatus::Active,
        // gracePeriod 10m, retainInactive 1h (usageCheckInterval 5m, maxWait 1h).
        rotation: Some(RotationChoice { interval: 0, grace: 2, retain: 2, wait_for_unused }),
        restart_targets: !wait_for_unused,
        policy: (0, 0, false),
        events: vec![],
    };
    let mut sim = Sim::new(&h);
    let at = |m: i64| Timestamp::from_second(START + m * 60).unwrap();
    let minute = |t: Timestamp| (t.as_second() - START + 59).div_euclid(60);
    // The client without restart targets picks the new key up only when its pod restarts.
    let client_restarts_at = REQUESTED_AT_MIN + 25;
    let mut samples: Vec<Vec<Option<Lane>>> = vec![];
    let mut next_wake = 0;
    for m in 0..=VIEW_MIN.1 {
        sim.now = at(m);
        if m == REQUESTED_AT_MIN {
            sim.apply(Event::RequestRotation);
            next_wake = m; // the annotation change is watched: reconcile now
        }
        if m == client_restarts_at {
            sim.apply(Event::ClientReloadsSecret);
        }
        sim.client_uses_its_key();
        if m >= next_wake {
            match sim.reconcile() {
                Outcome::Done(Some(wake)) => next_wake = minute(wake),
                _ => panic!("the scripted rotation must converge:\n{}", sim.trace.join("\n")),
            }
        }
        if m == 0 {
            sim.apply(Event::ClientReloadsSecret);
        }
        let lanes = ["K1", "K2"].map(|id| {
            sim.status.keys.iter().find(|k| k.access_key_id == id).map(|k| match k.phase {
                KeyPhase::Current => Lane::Current,
                KeyPhase::Draining if k.deactivate_at.as_ref().is_some_and(|t| t.0 > sim.now) => Lane::Grace,
                KeyPhase::Draining => Lane::InUse,
                KeyPhase::Inactive => Lane::Window,
            })
        });
        samples.push(lanes.to_vec());
    }
    assert!(sim.violations.is_empty(), "{}", sim.violations.join("\n"));
    let mut keys = vec![];
    let mut deleted_at = vec![];
    for (i, name) in ["old key", "new key"].into_iter().enumerate() {
        let mut segments: Segments = vec![];
        let mut seen_last = None;
        for (m, lanes) in samples.iter().enumerate() {
            let m = m as i64;
            let Some(lane) = lanes[i] else { continue };
            seen_last = Some(m);
            match segments.last_mut() {
                Some(s) if s.2 == lane && s.1 == m => s.1 = m + 1,
                _ => segments.push((m, m + 1, lane)),
            }
        }
        deleted_at.push(seen_last.filter(|m| *m < VIEW_MIN.1).map(|m| m + 1));
        keys.push((name, segments));
    }
    let mut marks = vec![(REQUESTED_AT_MIN, "rotation requested".to_owned())];
    let mut checks = 0;
    for (t, step) in &sim.executed {
        let m = minute(*t);
        if m < REQUESTED_AT_MIN {
            continue;
        }
        let label = match step {
            Step::CreateKey { .. } => "create · tag · verify (STS) · publish".to_owned(),
            Step::RestartTargets { .. } => "restart targets".to_owned(),
            Step::CheckKeyUsage { .. } => {
                checks += 1;
                if checks == 1 { "usage checks".to_owned() } else { String::new() }
            }
            Step::RetireKey { .. } => "deactivate old key".to_owned(),
            Step::DeleteRetired { .. } => "delete old key".to_owned(),
            _ => continue,
        };
        marks.push((m, label));
    }
    Timeline {
        title: if wait_for_unused {
            "waitForUnused: true — a client keeps using the old key until its pod restarts 25m later"
        } else {
            "Rotation requested (gracePeriod: 10m, retainInactive: 1h, restartTargets set)"
        },
        requested_at: REQUESTED_AT_MIN,
        view: VIEW_MIN,
        keys,
        deleted_at,
        marks,
    }
}

fn hhmm(m: i64) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn svg_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Width of a label in 12px sans-serif, roughly.
fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * 6.4
}

fn render_svg(timelines: &[Timeline]) -> String {
    const W: f64 = 980.0;
    const LEFT: f64 = 110.0;
    const RIGHT: f64 = 30.0;
    const LANE: f64 = 26.0;
    let mut out = String::new();
    let mut body = String::new();
    let mut y = 10.0;
    for tl in timelines {
        let (v0, v1) = tl.view;
        let x = |m: i64| LEFT + (m.clamp(v0, v1) - v0) as f64 / (v1 - v0) as f64 * (W - LEFT - RIGHT);
        body.push_str(&format!(
            "<text x=\"{LEFT}\" y=\"{:.1}\" font-weight=\"bold\" font-size=\"14\">{}</text>\n",
            y + 16.0,
            svg_escape(tl.title)
        ));
        let lanes_top = y + 28.0;
        let marks_top = lanes_top + tl.keys.len() as f64 * (LANE + 8.0) + 4.0;
        // Operator marks, with labels stacked so they do not overlap.
        let mut rows: Vec<f64> = vec![];
        let mut labels = String::new();
        for (m, label) in &tl.marks {
            let mx = x(*m);
            body.push_str(&format!(
                "<line x1=\"{mx:.1}\" y1=\"{lanes_top:.1}\" x2=\"{mx:.1}\" y2=\"{:.1}\" stroke=\"#455a64\" stroke-dasharray=\"3,3\"/>\n",
                marks_top + 4.0
            ));
            body.push_str(&format!(
                "<circle cx=\"{mx:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"#455a64\"/>\n",
                marks_top + 4.0
            ));
            if label.is_empty() {
                continue;
            }
            let row = rows.iter().position(|end| *end < mx - 4.0).unwrap_or_else(|| {
                rows.push(f64::MIN);
                rows.len() - 1
            });
            rows[row] = mx + text_width(label);
            labels.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#263238\">{}</text>\n",
                mx + 3.0,
                marks_top + 20.0 + row as f64 * 15.0,
                svg_escape(label)
            ));
        }
        let axis_y = marks_top + 26.0 + rows.len() as f64 * 15.0;
        for (i, (name, segments)) in tl.keys.iter().enumerate() {
            let ly = lanes_top + i as f64 * (LANE + 8.0);
            body.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"13\" text-anchor=\"end\">{name}</text>\n",
                LEFT - 8.0,
                ly + 17.0
            ));
            for &(from, to, lane) in segments {
                if to <= v0 || from >= v1 {
                    continue;
                }
                let (long, short, fill, ink, _) = lane.style();
                let (x0, x1) = (x(from), x(to));
                body.push_str(&format!(
                    "<rect x=\"{x0:.1}\" y=\"{ly:.1}\" width=\"{:.1}\" height=\"{LANE}\" rx=\"3\" fill=\"{fill}\"/>\n",
                    x1 - x0
                ));
                let label = [long, short].into_iter().find(|l| text_width(l) + 10.0 < x1 - x0);
                if let Some(label) = label {
                    body.push_str(&format!(
                        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"{ink}\">{}</text>\n",
                        x0 + 6.0,
                        ly + 17.0,
                        svg_escape(label)
                    ));
                }
            }
            if let Some(d) = tl.deleted_at[i] {
                body.push_str(&format!(
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#b71c1c\">✕ deleted</text>\n",
                    x(d) + 4.0,
                    ly + 17.0
                ));
            }
        }
        body.push_str(&labels);
        body.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{axis_y:.1}\" x2=\"{:.1}\" y2=\"{axis_y:.1}\" stroke=\"#90a4ae\"/>\n",
            W - RIGHT
        ));
        let mut m = v0 + (15 - v0.rem_euclid(15)) % 15;
        while m <= v1 {
            body.push_str(&format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#90a4ae\"/>\n\
                 <text x=\"{0:.1}\" y=\"{3:.1}\" font-size=\"11\" text-anchor=\"middle\" fill=\"#546e7a\">{4}</text>\n",
                x(m),
                axis_y,
                axis_y + 4.0,
                axis_y + 16.0,
                hhmm(m)
            ));
            m += 15;
        }
        y = axis_y + 34.0;
    }
    let legend = [
        (Lane::Current, "Current: Active in IAM, in the Secret"),
        (Lane::Grace, "Draining: still Active (gracePeriod)"),
        (Lane::InUse, "Draining: held Active while IAM shows use"),
        (Lane::Window, "Inactive in IAM: rollback window"),
    ];
    for (i, (lane, text)) in legend.into_iter().enumerate() {
        let (_, _, fill, _, _) = lane.style();
        let lx = LEFT + (i % 2) as f64 * 330.0;
        if i == 2 {
            y += 20.0;
        }
        body.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"14\" height=\"14\" rx=\"2\" fill=\"{fill}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"#263238\">{}</text>\n",
            y - 12.0,
            lx + 19.0,
            y,
            svg_escape(text)
        ));
    }
    body.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"11\" fill=\"#78909c\">Each bar is what the planner did, \
         minute by minute, in a simulated run (src/plan/simulation.rs); the dashed lines are the steps it executed.</text>\n",
        y + 20.0
    ));
    y += 32.0;
    out.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{y:.0}\" viewBox=\"0 0 {W} {y:.0}\" \
         font-family=\"Helvetica, Arial, sans-serif\">\n\
         <!-- Generated by src/plan/simulation.rs (rotation_timeline_diagram_matches_the_planner). Do not edit. -->\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n"
    ));
    out.push_str(&body);
    out.push_str("</svg>\n");
    out
}

fn render_mermaid(timelines: &[Timeline]) -> String {
    let mut out = String::new();
    for (n, tl) in timelines.iter().enumerate() {
        out.push_str("```mermaid\ngantt\n");
        out.push_str(&format!("    title {}\n", tl.title.replace([':', '#', ';'], "")));
        out.push_str("    dateFormat HH:mm\n    axisFormat %H:%M\n");
        for (i, (name, segments)) in tl.keys.iter().enumerate() {
            out.push_str(&format!("    section {name}\n"));
            for (j, &(from, to, lane)) in segments.iter().enumerate() {
                let (long, _, _, _, tag) = lane.style();
                let to = to.min(tl.view.1);
                out.push_str(&format!("    {long} :{tag}t{n}k{i}s{j}, {}, {}\n", hhmm(from), hhmm(to)));
            }
        }
        out.push_str("    section operator\n");
        let mut merged: Vec<(i64, String)> = vec![];
        for (m, label) in tl.marks.iter().filter(|(_, l)| !l.is_empty()) {
            match merged.last_mut() {
                Some((at, text)) if at == m => *text = format!("{text} → {label}"),
                _ => merged.push((*m, label.clone())),
            }
        }
        for (j, (m, label)) in merged.iter().enumerate() {
            out.push_str(&format!("    {label} :milestone, t{n}m{j}, {}, 0m\n", hhmm(*m)));
        }
        out.push_str("```\n");
        if n + 1 < timelines.len() {
            out.push('\n');
        }
    }
    out
}

const MERMAID_BEGIN: &str = "<!-- BEGIN generated timeline: src/plan/simulation.rs, IKO_UPDATE_DOCS=1 to refresh -->\n";
const MERMAID_END: &str = "<!-- END generated timeline -->";

#[test]
fn rotation_timeline_diagram_matches_the_planner() {
    let timelines = [scripted_rotation(false), scripted_rotation(true)];
    // What the diagram claims, checked here so a change of behaviour shows up as a failure.
    let plain = &timelines[0];
    assert_eq!(plain.keys[0].1.iter().map(|s| s.2).collect::<Vec<_>>(), [Lane::Current, Lane::Grace, Lane::Window]);
    assert_eq!(plain.deleted_at[0], Some(REQUESTED_AT_MIN + 10 + 60), "grace 10m, then 1h rollback window");
    let careful = &timelines[1];
    let old: Vec<Lane> = careful.keys[0].1.iter().map(|s| s.2).collect();
    assert_eq!(old, [Lane::Current, Lane::Grace, Lane::InUse, Lane::Window]);
    assert!(timelines.iter().all(|t| t.requested_at == REQUESTED_AT_MIN));

    let svg = render_svg(&timelines);
    let mermaid = render_mermaid(&timelines);
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let md_path = docs.join("rotation.md");
    let md = std::fs::read_to_string(&md_path).expect("docs/rotation.md");
    let begin =
        md.find(MERMAID_BEGIN).expect("docs/rotation.md lacks the generated-timeline markers") + MERMAID_BEGIN.len();
    let end = md[begin..].find(MERMAID_END).expect("end marker") + begin;
    if std::env::var_os("IKO_UPDATE_DOCS").is_some() {
        std::fs::write(docs.join("rotation-timeline.svg"), &svg).unwrap();
        std::fs::write(&md_path, format!("{}{mermaid}{}", &md[..begin], &md[end..])).unwrap();
        return;
    }
    let stale = "is stale: run `IKO_UPDATE_DOCS=1 cargo test --lib plan::simulation::rotation_timeline`";
    let on_disk = std::fs::read_to_string(docs.join("rotation-timeline.svg")).unwrap_or_default();
    assert!(on_disk == svg, "docs/rotation-timeline.svg {stale}");
    assert!(md[begin..end] == mermaid, "the Mermaid timeline in docs/rotation.md {stale}");
}
