//! Wiring: watches, the finalizer, and the reconcile loop that executes the planner's steps.

mod apply;
mod cleanup;
mod events;
pub mod policy_status;
mod restart;
pub mod secret;
pub mod secret_policy;
mod status;
pub mod tenancy;

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::EventType,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::{self, ObjectRef},
        watcher,
    },
};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    crd::AccountRole,
    crd::{
        ACCESS_KEY_ID_ANNOTATION, FIELD_MANAGER, FINALIZER, IamAccessKey, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
        ROTATE_REQUESTED_AT_ANNOTATION, WRITTEN_FOR_LABEL,
    },
    error::Error,
    iam::{IamAccounts, IamApi},
    metrics::Metrics,
    plan::record::LastUseSchedule,
};

/// Operator-wide settings (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Names this cluster in ownership tags: `<cluster>/<namespace>/<name>`.
    pub cluster_name: String,
    /// The name this cluster had before: tags written under it are taken over.
    pub previous_cluster_name: Option<String>,
    /// How often each key's last use is read from IAM.
    pub last_used_refresh: Duration,
    /// Longest time between two reconciles of a converged resource (drift detection).
    pub resync: Duration,
    /// How long a new key may take to authenticate (IAM is eventually consistent).
    pub verify_timeout: Duration,
    /// Namespaces to watch (empty: all).
    pub namespaces: Vec<String>,
    /// Label selector of the IamAccessKeys to reconcile.
    pub selector: Option<String>,
    /// IAM path the managed users must be under (`/`: any).
    pub iam_user_path_prefix: String,
    /// Resources reconciled at once (not counting those waiting for a new key to authenticate).
    pub concurrency: u16,
}

/// Reconciles that may wait for a new key to authenticate without holding a slot, beyond
/// `concurrency`: enough for IAM's propagation delay at any rate IAM allows one account.
const WAITING_AT_ONCE: u16 = 128;

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// The IAM of the operator's own account and of each role a policy rule names.
    pub accounts: Arc<dyn IamAccounts>,
    events: events::Events,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub tenancy: tenancy::Tenancy,
    /// Consecutive failures per resource, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<IamAccessKey>, u32>>,
    /// When each resource's last use was read and is next due (by UID). Kept in memory so that
    /// reading last-use data does not have to write status when nothing changed.
    last_use_reads: Mutex<HashMap<String, LastUseSchedule>>,
    /// Users as last read (ARN and path; their tags are never trusted from memory), and when,
    /// by account (the role ARN; empty: the operator's own) and name.
    users: Mutex<HashMap<(String, String), (UserSighting, std::time::Instant)>>,
    /// The access key id this process last wrote to each Secret (namespace, name): the watch
    /// event of our own write is not a reason to reconcile again.
    published: Mutex<HashMap<(String, String), String>>,
    /// `concurrency` slots for reconciles at work. One waiting for its new key to authenticate
    /// gives its slot up, and comes back through `resume_slots`, so that it does not queue
    /// behind the new work that took its place.
    work_slots: Arc<Semaphore>,
    resume_slots: Arc<Semaphore>,
    /// When new keys are checked against STS; a change wakes the keys holding their first check.
    propagation: watch::Sender<crate::iam::Propagation>,
}

#[derive(Clone)]
struct UserSighting {
    arn: String,
    path: String,
}

impl Context {
    pub fn new(client: Client, accounts: Arc<dyn IamAccounts>, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let tenancy = tenancy::Tenancy::start(client.clone());
        let instance = std::env::var("POD_NAME").ok();
        Context {
            events: events::Events::new(client.clone(), FIELD_MANAGER, instance),
            client,
            accounts,
            metrics,
            tenancy,
            failures: Mutex::default(),
            last_use_reads: Mutex::default(),
            users: Mutex::default(),
            published: Mutex::default(),
            work_slots: Arc::new(Semaphore::new(settings.concurrency.into())),
            resume_slots: Arc::new(Semaphore::new(settings.concurrency.into())),
            propagation: watch::Sender::new(Default::default()),
            settings,
        }
    }

    /// The IAM of `role`'s account (`None`: the operator's own) for a namespace's resources.
    pub fn iam(&self, role: Option<&AccountRole>, namespace: &str) -> Arc<dyn IamApi> {
        self.accounts.iam(role, namespace)
    }

    async fn work_slot(&self) -> Slot {
        Slot(Some(self.work_slots.clone().acquire_owned().await.expect("the slots are never closed")))
    }

    /// Publish an event about the resource; failures are logged, never fatal.
    async fn event(&self, obj: &IamAccessKey, type_: EventType, reason: &str, note: String) {
        match type_ {
            EventType::Normal => info!(reason, "{note}"),
            EventType::Warning => warn!(reason, "{note}"),
        }
        if let Err(e) = self.events.publish(&obj.object_ref(&()), type_, reason, reason, note).await {
            warn!(error = %crate::error::kube_message(&e), reason, "could not publish event");
        }
    }

    fn backoff(&self, obj: &impl Resource, err: &Error) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(object_ref(obj)).or_insert(0);
        *n = n.saturating_add(1);
        // Retryable faults (throttling, outages) start fast; waiting conditions start slower.
        let (base, cap) = if err.is_retryable() { (2.0, 300.0) } else { (5.0, 600.0) };
        let secs = (base * 2f64.powi((*n - 1).min(16) as i32)).min(cap);
        jitter(Duration::from_secs_f64(secs))
    }

    fn reset_backoff(&self, obj: &impl Resource) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&object_ref(obj));
    }

    /// When the resource's last use is next read (`None`: now), and when it was last read.
    fn last_use_reads(&self, obj: &IamAccessKey, now: Timestamp) -> (Option<Timestamp>, Option<Timestamp>) {
        let Some(uid) = obj.uid() else { return (None, None) };
        let mut reads = self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner());
        let schedule = reads.entry(uid).or_insert_with(|| {
            LastUseSchedule::first_sight(now, self.last_used_refresh(), rand::rng().random_range(0.0..1.0))
        });
        (Some(schedule.due_at(now)), schedule.read_at)
    }

    fn record_last_use_read(&self, obj: &IamAccessKey, now: Timestamp) {
        self.schedule_last_use_read(obj, now, Some(now));
    }

    /// After a create: the first read comes one refresh later. Not a reading: decisions on
    /// disuse still read first.
    fn defer_last_use_read(&self, obj: &IamAccessKey, now: Timestamp) {
        self.schedule_last_use_read(obj, now, None);
    }

    fn schedule_last_use_read(&self, obj: &IamAccessKey, now: Timestamp, read_at: Option<Timestamp>) {
        if let Some(uid) = obj.uid() {
            let lateness = rand::rng().random_range(0.0..1.0);
            let next = LastUseSchedule::next(now, self.last_used_refresh(), lateness, read_at);
            self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner()).insert(uid, next);
        }
    }

    fn last_used_refresh(&self) -> SignedDuration {
        let refresh = self.settings.last_used_refresh.max(Duration::from_secs(1));
        SignedDuration::try_from(refresh).unwrap_or(SignedDuration::MAX)
    }

    fn remember_published(&self, namespace: &str, secret: &str, access_key_id: &str) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        published.insert((namespace.to_owned(), secret.to_owned()), access_key_id.to_owned());
    }

    /// Whether a Secret event only shows this process's own last write.
    fn is_own_write(&self, secret: &PartialObjectMeta<Secret>) -> bool {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        let held = secret.annotations().get(ACCESS_KEY_ID_ANNOTATION);
        let published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        held.is_some() && published.get(&key) == held
    }

    /// A user's ARN and path, read within a day: they change only when the user is recreated,
    /// which a key's verification notices (and then forgets the sighting).
    fn recent_user(&self, account: Option<&AccountRole>, user: &str) -> Option<UserSighting> {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let (sighting, read_at) = users.get(&user_key(account, user))?;
        (read_at.elapsed() < Duration::from_secs(24 * 3600)).then(|| sighting.clone())
    }

    fn remember_user(&self, account: Option<&AccountRole>, user: &str, read: &crate::iam::IamUser) {
        let sighting = UserSighting { arn: read.arn.clone(), path: read.path.clone() };
        self.users
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(user_key(account, user), (sighting, std::time::Instant::now()));
    }

    /// How long from now a new key `age` old, refused `refusals` times, is checked next.
    fn next_check(&self, age: Duration, refusals: u32) -> Duration {
        self.propagation.borrow().next_check(age, refusals)
    }

    /// Whether a new key may be checked now (`false`: it holds its first check while another
    /// finds out how long keys take).
    fn start_first_check(&self) -> bool {
        let mut go = true;
        // Those holding wait for a key to be accepted, not for this: no need to wake them.
        self.propagation.send_if_modified(|p| {
            go = p.start_first_check();
            false
        });
        go
    }

    /// Until a key has authenticated and taught the wait, or `until`.
    async fn learn_first_check(&self, until: std::time::Instant) {
        let mut learned = self.propagation.subscribe();
        let _ = tokio::time::timeout_at(until.into(), learned.wait_for(|p| p.learned())).await;
    }

    fn key_refused(&self, age: Duration) {
        self.propagation.send_if_modified(|p| {
            p.refused(age);
            false
        });
        self.metrics.verify_first_check.set(self.propagation.borrow().first_check().as_secs_f64());
    }

    fn key_accepted(&self, refused_at: Option<Duration>, accepted_at: Duration) {
        self.propagation.send_modify(|p| p.accepted(refused_at, accepted_at));
        self.metrics.verify_first_check.set(self.propagation.borrow().first_check().as_secs_f64());
    }

    fn forget_user(&self, account: Option<&AccountRole>, user: &str) {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).remove(&user_key(account, user));
    }

    fn forget(&self, obj: &IamAccessKey) {
        self.reset_backoff(obj);
        if let Some(uid) = obj.uid() {
            self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
        }
        let secret = (obj.namespace().unwrap_or_default(), secret::secret_name(obj));
        self.published.lock().unwrap_or_else(|e| e.into_inner()).remove(&secret);
    }
}

/// Users of the same name in two accounts are two users.
fn user_key(account: Option<&AccountRole>, user: &str) -> (String, String) {
    (account.map(|a| a.role_arn.clone()).unwrap_or_default(), user.to_owned())
}

/// A reconcile's right to work (see `Context::work_slots`).
struct Slot(Option<OwnedSemaphorePermit>);

impl Slot {
    /// Wait without holding the slot, then take one back from the resuming reconciles' slots.
    async fn idle(&mut self, ctx: &Context, wait: Duration) {
        if !wait.is_zero() {
            self.idle_until(ctx, tokio::time::sleep(wait)).await;
        }
    }

    /// The same, until `done` completes.
    async fn idle_until(&mut self, ctx: &Context, done: impl Future<Output = ()>) {
        self.0 = None;
        done.await;
        self.0 = Some(ctx.resume_slots.clone().acquire_owned().await.expect("the slots are never closed"));
    }
}

fn object_ref(obj: &impl Resource) -> ObjectRef<IamAccessKey> {
    ObjectRef::new(&obj.name_any()).within(&obj.namespace().unwrap_or_default())
}

/// ±10%, so that many resources do not wake up in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// Up to 10% later, never earlier: periodic work spreads out but never runs more often than
/// its period.
fn later(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(1.0..1.1))
}

/// The watch delivers objects through `DeserializeGuard`, so one stored object the types cannot
/// read (written before a schema change, say) is reported instead of stopping the watch.
type Watched = DeserializeGuard<IamAccessKey>;

async fn reconcile(watched: Arc<Watched>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = watched.namespace().unwrap_or_default();
    // A short random id ties together the log lines of one reconcile.
    let trace_id = format!("{:08x}", rand::rng().random::<u32>());
    let span = info_span!("reconcile", namespace = %ns, name = %watched.name_any(), trace_id = %trace_id);
    async move {
        let slot = ctx.work_slot().await;
        let timer = std::time::Instant::now();
        let api: Api<IamAccessKey> = Api::namespaced(ctx.client.clone(), &ns);
        // The watch cache can lag behind our own last status write; deciding on a stale
        // ledger would redo work. One GET per reconcile buys a current view.
        let obj = match api.get_opt(&watched.name_any()).await {
            Ok(Some(fresh)) => Arc::new(fresh),
            Ok(None) => return Ok(Action::await_change()),
            Err(kube::Error::SerdeError(e)) => {
                let err = Error::Invalid(format!("the stored IamAccessKey cannot be read ({e}): fix or delete it"));
                let regarding = watched.object_ref(&());
                let _ = ctx.events.publish(&regarding, EventType::Warning, err.reason(), "Read", err.to_string()).await;
                return Err(err);
            }
            Err(e) => return Err(Error::Kube { call: "reading the IamAccessKey", source: e }),
        };
        let result = finalizer(&api, FINALIZER, obj.clone(), |event| async {
            match event {
                FinalizerEvent::Apply(o) => apply::apply(&o, &ctx, slot).await,
                FinalizerEvent::Cleanup(o) => {
                    let result = cleanup::cleanup(&o, &ctx).await;
                    drop(slot);
                    if let Err(e) = &result {
                        cleanup::report_waiting(&o, &ctx, e).await;
                    }
                    result
                }
            }
        })
        .await
        .map_err(Error::from);
        ctx.metrics.reconcile_duration.observe(timer.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        ctx.metrics.reconciles.get_or_create(&crate::metrics::ResultLabels { result: label.into() }).inc();
        if result.is_ok() {
            ctx.reset_backoff(obj.as_ref());
        }
        result
    }
    .instrument(span)
    .await
}

fn error_policy(obj: Arc<Watched>, err: &Error, ctx: Arc<Context>) -> Action {
    let wait = ctx.backoff(obj.as_ref(), err);
    if err.is_retryable() {
        warn!(namespace = ?obj.namespace(), name = %obj.name_any(), reason = err.reason(), error = %err, retry_in = ?wait, "reconcile failed");
    } else {
        info!(namespace = ?obj.namespace(), name = %obj.name_any(), reason = err.reason(), error = %err, retry_in = ?wait, "waiting");
    }
    Action::requeue(wait)
}

/// What the cache keeps of an IamAccessKey. A reconcile reads the object afresh, so the cache
/// only names it and feeds `reconcile_triggers`: no field history (a third of each object), no
/// status (most of the rest), no copy of the object in kubectl's last-applied annotation.
fn slim(obj: &mut Watched) {
    obj.managed_fields_mut().clear();
    obj.annotations_mut().remove("kubectl.kubernetes.io/last-applied-configuration");
    if let DeserializeGuard(Ok(key)) = obj {
        key.status = None;
    }
}

/// What a reconcile answers to: spec, labels, annotations, finalizers and deletion. Status is
/// the operator's own output; a status-only change is not a reason to reconcile.
fn reconcile_triggers(obj: &Watched) -> Option<u64> {
    let meta = obj.meta();
    let mut hasher = DefaultHasher::new();
    let deletion = meta.deletion_timestamp.as_ref().map(|t| t.0.as_second());
    (meta.generation, &meta.labels, &meta.annotations, &meta.finalizers, deletion).hash(&mut hasher);
    Some(hasher.finish())
}

/// The Secret events worth a reconcile: any but the echo of this process's own last write.
fn secret_triggers(
    ctx: Arc<Context>,
    events: impl Stream<Item = Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>>,
) -> impl Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> {
    events.filter_map(move |event| {
        futures::future::ready(match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => (!ctx.is_own_write(&s)).then_some(Ok(s)),
            Ok(watcher::Event::Delete(s)) => Some(Ok(s)),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        })
    })
}

/// The resources a tenancy change may allow or deny, counted by cause.
fn woken_by(ctx: &Context, store: &reflector::Store<Watched>, change: &tenancy::Affected) -> Vec<ObjectRef<Watched>> {
    let refs: Vec<ObjectRef<Watched>> = store
        .state()
        .iter()
        .filter(|k| ctx.tenancy.affects(change, &k.namespace().unwrap_or_default()))
        .map(|k| ObjectRef::from_obj(&**k))
        .collect();
    let cause = change.cause();
    ctx.metrics.tenancy_wakes.get_or_create(&crate::metrics::CauseLabels { cause }).inc_by(refs.len() as u64);
    if *change == tenancy::Affected::Everything && !refs.is_empty() {
        info!(resources = refs.len(), "policies or namespaces listed again: looking at every resource again");
    }
    refs
}

/// The resource a Secret it does not own holds the entries of (`Merge`, `Orphan`), by the UID
/// in the Secret's `written-for` label.
fn writer_of(store: &reflector::Store<Watched>, secret: &PartialObjectMeta<Secret>) -> Option<ObjectRef<Watched>> {
    let uid = secret.labels().get(WRITTEN_FOR_LABEL);
    let namespace = secret.namespace();
    let writer = store.find(|k| k.uid().as_ref() == uid && k.namespace() == namespace)?;
    Some(ObjectRef::from_obj(&*writer))
}

/// Set the rotate-requested-at annotation to now (what `iam-key-operator rotate` does).
pub async fn request_rotation(client: Client, namespace: &str, name: &str) -> Result<Timestamp, kube::Error> {
    let now = crate::plan::record::whole_seconds(Timestamp::now());
    let api: Api<IamAccessKey> = Api::namespaced(client, namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {ROTATE_REQUESTED_AT_ANNOTATION: now.to_string()}}});
    let params = kube::api::PatchParams { field_manager: Some("iam-key-operator-rotate".into()), ..Default::default() };
    api.patch(name, &params, &kube::api::Patch::Merge(&patch)).await?;
    Ok(now)
}

/// Run the controller until a shutdown signal. One controller per watched namespace (or one
/// for the whole cluster).
pub async fn run(ctx: Arc<Context>, ready: Arc<std::sync::atomic::AtomicBool>) {
    // Deciding with an empty policy cache would deny everything for a moment.
    ctx.tenancy.wait_until_ready().await;
    let scopes: Vec<Option<String>> = if ctx.settings.namespaces.is_empty() {
        vec![None]
    } else {
        ctx.settings.namespaces.iter().cloned().map(Some).collect()
    };
    let controllers = scopes.into_iter().map(|ns| {
        let (keys, secrets): (Api<Watched>, Api<PartialObjectMeta<Secret>>) = match &ns {
            Some(ns) => (Api::namespaced(ctx.client.clone(), ns), Api::namespaced(ctx.client.clone(), ns)),
            None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
        };
        // Only our Secrets, and only their metadata: no secret material in memory, and memory
        // independent of how many other Secrets the cluster holds. Those we own, by our label;
        // those we write into without owning them (Merge, Orphan), by their `written-for` label.
        let our_secrets = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
        let owned_secrets = secret_triggers(ctx.clone(), watcher(secrets.clone(), our_secrets).default_backoff());
        let written_into = watcher::Config::default().labels(WRITTEN_FOR_LABEL);
        let written_into = secret_triggers(ctx.clone(), watcher(secrets, written_into).default_backoff());
        let mut selected = watcher::Config::default().any_semantic();
        if let Some(selector) = &ctx.settings.selector {
            selected = selected.labels(selector);
        }
        let (store, writer) = reflector::store();
        let key_events = watcher(keys, selected)
            .default_backoff()
            .modify(slim)
            .reflect(writer)
            .applied_objects()
            // Our own status writes are no reason to look again (and would bypass the backoff).
            .predicate_filter(reconcile_triggers, Default::default());
        // A policy or namespace change: look again at the resources whose decision it may change.
        let affected = ctx.tenancy.changes().flat_map({
            let (store, ctx) = (store.clone(), ctx.clone());
            move |change| futures::stream::iter(woken_by(&ctx, &store, &change))
        });
        let writer_of = {
            let store = store.clone();
            move |secret: PartialObjectMeta<Secret>| writer_of(&store, &secret)
        };
        let controller = Controller::for_stream(key_events, store)
            .reconcile_on(affected)
            .owns_stream(owned_secrets)
            .watches_stream(written_into, writer_of)
            .with_config(
                kube::runtime::controller::Config::default()
                    .concurrency(ctx.settings.concurrency.saturating_add(WAITING_AT_ONCE)),
            )
            .shutdown_on_signal();
        let store = controller.store();
        let ready = ready.clone();
        let ctx = ctx.clone();
        async move {
            let wait_ready = async move {
                if store.wait_until_ready().await.is_ok() {
                    ready.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            };
            let run = controller.run(reconcile, error_policy, ctx).for_each(|_| futures::future::ready(()));
            futures::join!(wait_ready, run);
        }
    });
    // Policy status is written by the replica that reconciles, until the controllers stop.
    tokio::select! {
        _ = futures::future::join_all(controllers) => {}
        () = policy_status::run(ctx.clone()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Change = dyn Fn(&mut IamAccessKey);

    #[test]
    fn status_only_changes_do_not_trigger_a_reconcile() {
        let base: IamAccessKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
            "metadata": {"name": "app", "namespace": "ns", "generation": 1, "resourceVersion": "1"},
            "spec": {"userName": "app"},
        }))
        .unwrap();
        let trigger = |change: &Change| {
            let mut obj = base.clone();
            change(&mut obj);
            reconcile_triggers(&DeserializeGuard(Ok(obj)))
        };
        let original = trigger(&|_| {});
        let status_write = |o: &mut IamAccessKey| {
            o.metadata.resource_version = Some("2".into());
            o.status =
                Some(crate::crd::IamAccessKeyStatus { access_key_id: Some("AKIA1".into()), ..Default::default() });
        };
        assert_eq!(trigger(&status_write), original, "a status write");
        let changes: [(&str, &Change); 5] = [
            ("generation", &|o| o.metadata.generation = Some(2)),
            ("annotation", &|o| {
                o.annotations_mut().insert(ROTATE_REQUESTED_AT_ANNOTATION.into(), "now".into());
            }),
            ("label", &|o| {
                o.labels_mut().insert("shard".into(), "a".into());
            }),
            ("finalizer", &|o| o.finalizers_mut().push(FINALIZER.into())),
            ("deletion", &|o| {
                o.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH))
            }),
        ];
        for (what, change) in changes {
            assert_ne!(trigger(change), original, "{what}");
        }
    }
}
