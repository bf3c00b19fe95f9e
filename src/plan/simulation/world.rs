//! The simulated world: one IAM user (its keys with status, create date and last use, its tags,
//! IAM's limit of two keys), the resource (spec, the rotate-requested-at annotation, the
//! persisted status and its resourceVersion), the Secret's annotated key id, a clock, a client
//! workload holding one key, and the people and tenants who act on them (`Event`).

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rand::{SeedableRng, rngs::StdRng};

use super::{
    FOREIGN_TAG, GRACES, INTERVALS, MAX_KEY_AGES, MAX_WAIT, RETAINS, START, UNUSED_AFTERS, USAGE_CHECK_INTERVAL, WAITS,
    executor::Run,
};
use crate::{
    crd::{
        Duration, IamAccessKeySpec, IamAccessKeyStatus, KeyPhase, KeyStatus, OwnedKey, PendingCreate, RestartKind,
        RestartTarget, RotationSpec,
    },
    keys::IamKey,
    plan::{
        Ledger, MAX_KEYS_PER_USER, Owner, SecretObservation, Step, left_by_interrupted_create, record::LastUseSchedule,
    },
    policy::Limits,
};

/// Where the operator process dies (the names of the failpoints in controller/apply.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failpoint {
    AfterCreateKey,
    AfterTag,
    AfterSecret,
    BeforeStatus,
    /// After the first IAM write of any other step (delete before untag, update before status).
    MidStep,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotationChoice {
    pub interval: usize,
    pub grace: usize,
    pub retain: usize,
    pub wait_for_unused: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum Event {
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
    /// A person tags the user with something the operator did not write.
    PersonTagsUser(PersonTag),
}

/// Tags the operator never wrote and must leave as they are.
#[derive(Clone, Copy, Debug)]
pub enum PersonTag {
    /// A tag that has nothing to do with keys (`team: billing`).
    Unrelated,
    /// A person's description of a key that no longer exists.
    GoneKey,
    /// Another resource's tag of a key it owns (on a user claimed by this one: a copy, say).
    OtherResource,
}

#[derive(Clone, Copy, Debug)]
pub enum Forgery {
    /// `pendingCreate` with no existing keys, `since` long before any key was created.
    PendingLongAgo,
    /// `pendingCreate` with no existing keys, `since` a day ahead.
    PendingAhead,
    /// `status.keys` lists a person's key (the first one) in this phase, its deadlines passed.
    ListsForeignKey(KeyPhase),
    /// `status.keys` emptied.
    KeysWiped,
    /// `pendingCreate` listing every key the user has now, `since` long before any of them.
    PendingListsKeys,
}

#[derive(Clone, Debug)]
pub struct History {
    pub key_status: KeyStatus,
    pub rotation: Option<RotationChoice>,
    pub restart_targets: bool,
    /// Indexes into `MAX_KEY_AGES` and `UNUSED_AFTERS`; a policy on the user's path or tags
    /// makes every reconcile read the user (and so its tags) before observing.
    pub policy: (usize, usize, bool),
    /// Seeds what the controller draws at random.
    pub seed: u64,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub status: KeyStatus,
    pub create_date: Timestamp,
    pub last_used: Option<Timestamp>,
}

/// Who last set a key's status in IAM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Writer {
    Person,
    /// `SetKeyStatus`: the current key follows `spec.keyStatus`.
    OperatorForSpec,
    /// `RetireKey`: a replaced key's grace period ended.
    OperatorRetire,
    /// `DeactivateUnused`: a policy's `deactivateUnusedAfter`.
    OperatorForPolicy,
}

#[derive(Default, Debug)]
pub struct Coverage {
    pub steps: BTreeMap<String, usize>,
    pub crashes: BTreeMap<String, usize>,
    pub failures: BTreeMap<String, usize>,
    pub legit_key_limit: usize,
    pub legit_key_unused: usize,
    pub rotations_settled: usize,
    pub max_steps_to_done: usize,
}

pub struct Sim {
    pub now: Timestamp,
    pub owner: Owner,
    // IAM
    pub keys: Vec<Key>,
    pub tags: BTreeMap<String, String>,
    pub next_id: u32,
    pub verify_fails: bool,
    // The resource
    pub key_status: KeyStatus,
    pub rotation: Option<RotationChoice>,
    pub serial: i64,
    pub restart_targets: bool,
    pub requested_at: Option<String>,
    pub resource_version: u64,
    pub status: IamAccessKeyStatus,
    pub limits: Limits,
    pub policy_reads_user: bool,
    /// The Secret: missing, or ours with the annotated key id.
    pub secret: SecretObservation,
    // The operator process
    pub run: Option<Run>,
    /// `Context`'s schedule of last-use reads: in memory, lost with a crash.
    pub last_use: Option<LastUseSchedule>,
    /// Draws what the controller draws at random (the spread of last-use reads).
    pub rng: StdRng,
    pub failpoint: Option<Failpoint>,
    // The client workload
    pub client_key: Option<String>,
    // Bookkeeping for the invariants
    pub created_by_operator: BTreeSet<String>,
    /// Keys a person created, with the status the person last gave them.
    pub foreign: BTreeMap<String, KeyStatus>,
    /// Tags a person wrote, with their values.
    pub person_tags: BTreeMap<String, String>,
    pub last_writer: BTreeMap<String, Writer>,
    pub deleted_by_person: BTreeSet<String>,
    /// Keys a rotation request or a lost Secret asked to replace, and by what.
    pub must_be_replaced: BTreeMap<String, BTreeSet<&'static str>>,
    pub trace: Vec<String>,
    pub violations: Vec<String>,
    pub coverage: Coverage,
    /// Every step executed, with the reconcile's `now` (for the timeline diagram).
    pub executed: Vec<(Timestamp, Step)>,
}

/// When every history starts.
pub fn start() -> Timestamp {
    Timestamp::from_second(START).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

pub fn current_of(status: &IamAccessKeyStatus) -> Option<&OwnedKey> {
    status.keys.iter().find(|k| k.phase == KeyPhase::Current)
}

impl Sim {
    pub fn new(h: &History) -> Self {
        Sim {
            now: start(),
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
            last_use: None,
            rng: StdRng::seed_from_u64(h.seed),
            failpoint: None,
            client_key: None,
            created_by_operator: BTreeSet::new(),
            foreign: BTreeMap::new(),
            person_tags: BTreeMap::new(),
            last_writer: BTreeMap::new(),
            deleted_by_person: BTreeSet::new(),
            must_be_replaced: BTreeMap::new(),
            trace: vec![],
            violations: vec![],
            coverage: Coverage::default(),
            executed: vec![],
        }
    }

    pub fn elapsed(&self) -> i64 {
        self.now.as_second() - START
    }

    pub fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    pub fn violation(&mut self, invariant: &str, detail: String) {
        let line = format!("VIOLATED {invariant}: {detail}");
        self.trace.push(line.clone());
        self.violations.push(line);
    }

    /// The spec as the user wrote it now.
    pub fn spec(&self) -> IamAccessKeySpec {
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

    pub fn secret_key(&self) -> Option<&str> {
        match &self.secret {
            SecretObservation::Ours { access_key_id } => access_key_id.as_deref(),
            _ => None,
        }
    }

    pub fn iam_key(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    pub fn list_access_keys(&self) -> Vec<IamKey> {
        self.keys
            .iter()
            .map(|k| IamKey { access_key_id: k.id.clone(), status: k.status, create_date: k.create_date })
            .collect()
    }

    /// IAM CreateAccessKey, for anyone.
    pub fn create_access_key(&mut self) -> Result<Key, String> {
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

    pub fn apply(&mut self, event: Event) {
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
                        self.person_tags.insert(key.id.clone(), FOREIGN_TAG.into());
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
            Event::PersonTagsUser(tag) => {
                let (key, value) = match tag {
                    PersonTag::Unrelated => ("team".to_owned(), "billing".to_owned()),
                    PersonTag::GoneKey => ("AKIAGONE".to_owned(), FOREIGN_TAG.to_owned()),
                    PersonTag::OtherResource => {
                        ("AKIAOTHER".to_owned(), Owner::new("c", "ns", "other").key_tag_value())
                    }
                };
                self.tags.insert(key.clone(), value.clone());
                self.person_tags.insert(key, value);
            }
        }
        self.check_world();
    }

    /// A status write by someone other than the operator.
    pub fn forge(&mut self, forgery: Forgery) {
        if self.run.is_some() {
            return;
        }
        let day = secs(86_400);
        match forgery {
            Forgery::PendingLongAgo | Forgery::PendingAhead | Forgery::PendingListsKeys => {
                // Long ago: before anything in this world was created. A forged `since` close
                // to the creation of a person's untagged key would have it taken for our remains
                // (documented limitation).
                let since = match forgery {
                    Forgery::PendingAhead => self.now + day,
                    _ => start() - secs(30 * 86_400),
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
                let existing_key_ids = match forgery {
                    Forgery::PendingListsKeys => self.keys.iter().map(|k| k.id.clone()).collect(),
                    _ => vec![],
                };
                self.status.pending_create = Some(PendingCreate { since: Time(since), existing_key_ids });
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

    pub fn remember_current_must_be_replaced(&mut self, why: &'static str) {
        if let Some(c) = current_of(&self.status) {
            self.must_be_replaced.entry(c.access_key_id.clone()).or_default().insert(why);
        }
    }

    pub fn client_uses_its_key(&mut self) {
        let now = self.now;
        if let Some(id) = self.client_key.clone()
            && let Some(key) = self.keys.iter_mut().find(|k| k.id == id && k.status == KeyStatus::Active)
        {
            key.last_used = Some(now);
        }
    }
}
