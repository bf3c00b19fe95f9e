//! Wiring: watches, the finalizer, and the reconcile loop that executes the planner's steps.

mod apply;
mod cleanup;
mod restart;
pub mod secret;
mod status;
pub mod tenancy;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::ObjectRef,
        watcher,
    },
};
use rand::Rng;
use tracing::{Instrument, info, info_span, warn};

use crate::{crd::IamAccessKey, error::Error, iam::IamApi, metrics::Metrics};

pub const FINALIZER: &str = "iam.keyop.dev/cleanup";
pub const FIELD_MANAGER: &str = "iam-key-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "iam-key-operator";
pub const ACCESS_KEY_ID_ANNOTATION: &str = "iam.keyop.dev/access-key-id";
pub const ROTATE_REQUESTED_AT_ANNOTATION: &str = "iam.keyop.dev/rotate-requested-at";
pub const PAUSED_ANNOTATION: &str = "iam.keyop.dev/paused";

/// Operator-wide settings (from flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Names this cluster in ownership tags: `<cluster>/<namespace>/<name>`.
    pub cluster_name: String,
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
    /// Resources reconciled at once.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_name: "default".into(),
            last_used_refresh: Duration::from_secs(3600),
            resync: Duration::from_secs(3600),
            verify_timeout: Duration::from_secs(60),
            namespaces: vec![],
            selector: None,
            iam_user_path_prefix: "/".into(),
            concurrency: 8,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub iam: Arc<dyn IamApi>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    pub tenancy: tenancy::Tenancy,
    /// Consecutive failures per resource, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<IamAccessKey>, u32>>,
    /// When each resource's last use was read and is next due (by UID). Kept in memory so that
    /// reading last-use data does not have to write status when nothing changed.
    last_use_reads: Mutex<HashMap<String, LastUseReads>>,
    /// IAM paths of users, as last read, and when.
    user_paths: Mutex<HashMap<String, (String, std::time::Instant)>>,
}

#[derive(Clone, Copy)]
struct LastUseReads {
    due: Timestamp,
    /// `None`: not read since this process started.
    read_at: Option<Timestamp>,
}

impl Context {
    pub fn new(client: Client, iam: Arc<dyn IamApi>, metrics: Arc<Metrics>, settings: Settings) -> Self {
        let tenancy = tenancy::Tenancy::start(client.clone());
        let instance = std::env::var("POD_NAME").ok();
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            iam,
            metrics,
            settings,
            tenancy,
            failures: Mutex::default(),
            last_use_reads: Mutex::default(),
            user_paths: Mutex::default(),
        }
    }

    /// Publish an event about the resource; failures are logged, never fatal.
    async fn event(&self, obj: &IamAccessKey, type_: EventType, reason: &str, note: String) {
        match type_ {
            EventType::Normal => info!(reason, "{note}"),
            EventType::Warning => warn!(reason, "{note}"),
        }
        let event = Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish event");
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
    fn last_use_reads(&self, obj: &IamAccessKey) -> (Option<Timestamp>, Option<Timestamp>) {
        let Some(uid) = obj.uid() else { return (None, None) };
        let mut reads = self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = reads.get(&uid) {
            return (Some(r.due), r.read_at);
        }
        // First sight since start of a key read before: spread the reads over one interval
        // instead of reading every key at once after a restart.
        if obj.status.as_ref().and_then(|s| s.last_used.as_ref()).is_none() {
            return (None, None);
        }
        let refresh = self.settings.last_used_refresh.as_secs_f64().max(1.0);
        let due = after(Timestamp::now(), Duration::from_secs_f64(rand::rng().random_range(0.0..refresh)));
        reads.insert(uid, LastUseReads { due, read_at: None });
        (Some(due), None)
    }

    fn record_last_use_read(&self, obj: &IamAccessKey, now: Timestamp) {
        if let Some(uid) = obj.uid() {
            let due = after(now, jitter(self.settings.last_used_refresh));
            let reads = LastUseReads { due, read_at: Some(now) };
            self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner()).insert(uid, reads);
        }
    }

    /// A user's IAM path read within the last day.
    fn recent_user_path(&self, user: &str) -> Option<String> {
        let paths = self.user_paths.lock().unwrap_or_else(|e| e.into_inner());
        let (path, read_at) = paths.get(user)?;
        (read_at.elapsed() < Duration::from_secs(24 * 3600)).then(|| path.clone())
    }

    fn remember_user_path(&self, user: &str, path: &str) {
        let mut paths = self.user_paths.lock().unwrap_or_else(|e| e.into_inner());
        paths.insert(user.to_owned(), (path.to_owned(), std::time::Instant::now()));
    }

    fn forget(&self, obj: &IamAccessKey) {
        self.reset_backoff(obj);
        if let Some(uid) = obj.uid() {
            self.last_use_reads.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
        }
    }
}

fn object_ref(obj: &impl Resource) -> ObjectRef<IamAccessKey> {
    ObjectRef::new(&obj.name_any()).within(&obj.namespace().unwrap_or_default())
}

/// ±10%, so that many resources do not wake up in lockstep.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.9..1.1))
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    crate::plan::after(t, jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
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
        let timer = std::time::Instant::now();
        let api: Api<IamAccessKey> = Api::namespaced(ctx.client.clone(), &ns);
        // The watch cache can lag behind our own last status write; deciding on a stale
        // ledger would redo work. One GET per reconcile buys a current view.
        let obj = match api.get_opt(&watched.name_any()).await {
            Ok(Some(fresh)) => Arc::new(fresh),
            Ok(None) => return Ok(Action::await_change()),
            Err(kube::Error::SerdeError(e)) => {
                let err = Error::Invalid(format!("the stored IamAccessKey cannot be read ({e}): fix or delete it"));
                let event = Event {
                    type_: EventType::Warning,
                    reason: err.reason().into(),
                    note: Some(err.to_string()),
                    action: "Read".into(),
                    secondary: None,
                };
                let _ = ctx.recorder.publish(&event, &watched.object_ref(&())).await;
                return Err(err);
            }
            Err(e) => return Err(e.into()),
        };
        let result = finalizer(&api, FINALIZER, obj.clone(), |event| async {
            match event {
                FinalizerEvent::Apply(o) => apply::apply(&o, &ctx).await,
                FinalizerEvent::Cleanup(o) => {
                    let result = cleanup::cleanup(&o, &ctx).await;
                    // Deletion has no status to speak through: a stuck deletion says why in events.
                    if let Err(e) = &result {
                        ctx.event(&o, EventType::Warning, e.reason(), format!("deletion waits: {e}")).await;
                    }
                    result
                }
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        });
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

/// Set the rotate-requested-at annotation to now (what `iam-key-operator rotate` does).
pub async fn request_rotation(client: Client, namespace: &str, name: &str) -> Result<Timestamp, kube::Error> {
    let now = Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH);
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
        // independent of how many other Secrets the cluster holds.
        let our_secrets = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
        let secret_events = watcher(secrets, our_secrets).default_backoff().touched_objects();
        let mut selected = watcher::Config::default().any_semantic();
        if let Some(selector) = &ctx.settings.selector {
            selected = selected.labels(selector);
        }
        let controller = Controller::new(keys, selected)
            // A policy change can allow or deny any resource: look at all of them again.
            .reconcile_all_on(ctx.tenancy.changes())
            .owns_stream(secret_events)
            .with_config(kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency))
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
    futures::future::join_all(controllers).await;
}
