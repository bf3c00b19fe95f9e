//! What the harness does to the cluster and to IAM: namespaces, the tenancy policy, IAM users,
//! applying resources, watching them become Ready, checking Secrets, unrelated Secrets.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream};
use iam_key_operator::crd::{IamAccessKey, IamAccessKeyPolicy, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
};
use kube::{
    Api, Client,
    api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::sync::{mpsc, watch};

use crate::prom;

pub const POLICY: &str = "bench";
/// Every IAM user the harness makes starts with this; every namespace too.
pub const PREFIX: &str = "bench";

/// A resource to apply: its name and the IAM user it manages.
#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    pub user: String,
}

pub fn items(tag: &str, n: usize) -> Vec<Item> {
    (0..n).map(|i| Item { name: format!("k{i:05}"), user: format!("{PREFIX}-{tag}-{i:05}") }).collect()
}

pub async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.into()), ..Default::default() }, ..Default::default() };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => panic!("cannot create namespace {name}: {e}"),
    }
}

/// One policy allowing every `bench-*` namespace to manage every `bench-*` IAM user.
pub async fn allow_bench(client: &Client) {
    let api: Api<IamAccessKeyPolicy> = Api::all(client.clone());
    let policy: IamAccessKeyPolicy = serde_json::from_value(json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
        "metadata": {"name": POLICY},
        "spec": {"rules": [{"namespaces": [format!("{PREFIX}-*")], "userNames": [format!("{PREFIX}-*")]}]}
    }))
    .expect("valid policy");
    api.patch(POLICY, &PatchParams::apply("bench").force(), &Patch::Apply(&policy)).await.expect("apply policy");
}

/// Create the IAM users of `items` in moto (not timed).
pub async fn create_users(iam: &aws_sdk_iam::Client, items: &[Item]) {
    stream::iter(items.iter().map(|it| it.user.clone()))
        .for_each_concurrent(8, |user| async move {
            match iam.create_user().user_name(&user).send().await {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(|s| s.is_entity_already_exists_exception()) => {}
                Err(e) => panic!("cannot create IAM user {user}: {e:?}"),
            }
        })
        .await;
}

/// Times of one bulk apply.
pub struct Applied {
    pub started: Instant,
    pub finished: Instant,
    /// When each create returned.
    pub created: HashMap<String, Instant>,
}

/// Create every resource of `items` in `ns`, `concurrency` creates in flight (as `kubectl apply`
/// of a large file, or a GitOps sync, would). Each created object is also sent to `notify`.
pub async fn apply(
    client: &Client,
    ns: &str,
    items: &[Item],
    concurrency: usize,
    notify: Option<mpsc::UnboundedSender<(Item, String)>>,
) -> Applied {
    let api: Api<IamAccessKey> = Api::namespaced(client.clone(), ns);
    let created = Arc::new(Mutex::new(HashMap::new()));
    let started = Instant::now();
    stream::iter(items.iter().cloned())
        .for_each_concurrent(concurrency, |item| {
            let (api, created, notify) = (api.clone(), created.clone(), notify.clone());
            async move {
                let obj: IamAccessKey = serde_json::from_value(json!({
                    "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
                    "metadata": {"name": item.name},
                    "spec": {"userName": item.user},
                }))
                .expect("valid IamAccessKey");
                let out = api.create(&PostParams::default(), &obj).await.expect("create IamAccessKey");
                created.lock().unwrap().insert(item.name.clone(), Instant::now());
                if let Some(tx) = notify {
                    let _ = tx.send((item, out.metadata.uid.unwrap_or_default()));
                }
            }
        })
        .await;
    let created = std::mem::take(&mut *created.lock().unwrap());
    Applied { started, finished: Instant::now(), created }
}

fn is_ready(obj: &IamAccessKey) -> bool {
    let Some(status) = &obj.status else { return false };
    status.access_key_id.is_some() && status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Watches a namespace's IamAccessKeys and records when each first shows Ready=True with a key.
#[derive(Clone)]
pub struct ReadyWatch {
    ready: Arc<Mutex<HashMap<String, Instant>>>,
    count: watch::Receiver<usize>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl ReadyWatch {
    /// Starts watching; returns once the initial list is in.
    pub async fn start(client: &Client, ns: &str) -> ReadyWatch {
        let api: Api<IamAccessKey> = Api::namespaced(client.clone(), ns);
        let ready = Arc::new(Mutex::new(HashMap::new()));
        let (tx, count) = watch::channel(0usize);
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let r = ready.clone();
        let task = tokio::spawn(async move {
            let mut synced = Some(synced_tx);
            let mut events = watcher(api, watcher::Config::default()).default_backoff().boxed();
            while let Some(event) = events.next().await {
                let obj = match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(s) = synced.take() {
                            let _ = s.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                if is_ready(&obj) {
                    let now = Instant::now();
                    let name = obj.metadata.name.clone().unwrap_or_default();
                    let mut map = r.lock().unwrap();
                    if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(name) {
                        slot.insert(now);
                        tx.send_replace(map.len());
                    }
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(60), synced_rx).await;
        ReadyWatch { ready, count, task: Arc::new(task) }
    }

    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Wait until `n` resources were seen Ready; `false` on timeout.
    pub async fn wait_count(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.count.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c >= n)).await.is_ok_and(|r| r.is_ok())
    }

    pub async fn wait_name(&self, name: &str, timeout: Duration) -> Option<Instant> {
        let mut rx = self.count.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.ready.lock().unwrap().get(name) {
                return Some(*t);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    pub fn times(&self) -> HashMap<String, Instant> {
        self.ready.lock().unwrap().clone()
    }
}

impl Drop for ReadyWatch {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

/// What the resources of a namespace look like once converged.
pub struct Check {
    /// Resources whose Secret does not hold the key status names (or that have no Secret).
    pub mismatches: usize,
    /// Average JSON size of one IamAccessKey, and of its managedFields alone.
    pub object_bytes: f64,
    pub managed_fields_bytes: f64,
}

pub async fn check(client: &Client, ns: &str) -> Check {
    let keys: Api<IamAccessKey> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut held = HashMap::new();
    let mut lp = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")).limit(500);
    loop {
        let page = secrets.list(&lp).await.expect("list Secrets");
        for s in page.items {
            let id = s
                .data
                .as_ref()
                .and_then(|d| d.get("AWS_ACCESS_KEY_ID"))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned());
            held.insert(s.metadata.name.unwrap_or_default(), id);
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    let mut bad = 0;
    let (mut count, mut bytes, mut mf_bytes) = (0usize, 0usize, 0usize);
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = keys.list(&lp).await.expect("list IamAccessKeys");
        for k in page.items {
            count += 1;
            bytes += serde_json::to_vec(&k).map(|v| v.len()).unwrap_or(0);
            mf_bytes += serde_json::to_vec(&k.metadata.managed_fields).map(|v| v.len()).unwrap_or(0);
            let secret = k.spec.secret.name.clone().or(k.metadata.name.clone()).unwrap_or_default();
            let want = k.status.as_ref().and_then(|s| s.access_key_id.clone());
            if want.is_none() || held.get(&secret).cloned().flatten() != want {
                bad += 1;
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    let per = |b: usize| if count > 0 { b as f64 / count as f64 } else { 0.0 };
    Check { mismatches: bad, object_bytes: per(bytes), managed_fields_bytes: per(mf_bytes) }
}

/// Create `count` Secrets of `bytes` bytes of incompressible data each, unrelated to the
/// operator (no label of its), in `ns`. Returns how long it took.
pub async fn unrelated_secrets(client: &Client, ns: &str, count: usize, bytes: usize) -> Duration {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    stream::iter(0..count)
        .map(Ok::<usize, kube::Error>)
        .try_for_each_concurrent(16, |i| {
            let (api, done) = (api.clone(), done.clone());
            async move {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("unrelated-{i:06}")),
                        labels: Some(BTreeMap::from([("app".to_string(), "bench-unrelated".to_string())])),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([("blob".to_string(), ByteString(noise(i as u64, bytes)))])),
                    ..Default::default()
                };
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &secret).await {
                        Ok(_) => break,
                        Err(kube::Error::Api(s)) if s.is_already_exists() => break,
                        Err(e) if attempt < 4 => {
                            eprintln!("  unrelated secret {i}: {e}; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n % 10_000 == 0 {
                    eprintln!("  {n} unrelated Secrets ({:.0}s)", started.elapsed().as_secs_f64());
                }
                Ok(())
            }
        })
        .await
        .expect("create unrelated Secrets");
    started.elapsed()
}

/// Pseudo-random bytes (xorshift): etcd cannot compress them away.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The API server's request counters, keyed `VERB resource[/subresource]`.
pub async fn apiserver_requests(client: &Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).expect("request");
    let text = client.request_text(req).await.expect("apiserver /metrics");
    let samples = prom::parse(&text);
    prom::by(&samples, "apiserver_request_total", |s| {
        let resource = s.label("resource");
        if resource.is_empty() {
            return None;
        }
        let sub = s.label("subresource");
        let what = if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") };
        // Failed requests apart (a 404 of a Secret that does not exist yet is an observation).
        let code = s.label("code");
        let code = if code.starts_with('2') { String::new() } else { format!(" → {code}") };
        Some(format!("{} {what}{code}", s.label("verb")))
    })
}

/// etcd's database size in bytes (`etcd_mvcc_db_total_size_in_bytes`) and its quota.
pub async fn etcd_size(etcd_url: &str) -> (f64, f64) {
    let addr = etcd_url.trim_start_matches("http://");
    match prom::http_get(addr, "/metrics").await {
        Ok((200, body)) => {
            let s = prom::parse(&body);
            (
                prom::sum(&s, "etcd_mvcc_db_total_size_in_bytes", |_| true),
                prom::sum(&s, "etcd_server_quota_backend_bytes", |_| true),
            )
        }
        _ => (0.0, 0.0),
    }
}
