//! The tenancy policies and namespace labels, cached (metadata of namespaces only), and a
//! signal on every policy change so that affected resources are reconciled again. A change of
//! status alone (the operator's own policy status writes) is not a policy change.
//!
//! Policies arrive through `DeserializeGuard`: a stored policy the types cannot read (written
//! under an older schema, say) is reported and allows nothing, and the watch carries on with
//! the others.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{DeserializeGuard, PartialObjectMeta},
    runtime::{WatchStreamExt, events::EventType, reflector, reflector::Store, watcher},
};
use tokio::sync::watch;
use tracing::warn;

use super::events::Events;
use crate::crd::{FIELD_MANAGER, IamAccessKeyPolicy};

type WatchedPolicy = DeserializeGuard<IamAccessKeyPolicy>;

#[derive(Clone)]
pub struct Tenancy {
    policies: Store<WatchedPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    changes: watch::Receiver<u64>,
    /// Fires on policy changes and on namespaces appearing, going or changing labels: what
    /// the grants between namespaces depend on.
    grant_changes: watch::Receiver<u64>,
}

impl Tenancy {
    /// Start caching policies and namespaces in the background.
    pub fn start(client: Client) -> Tenancy {
        let (policies, policy_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let (notify, changes) = watch::channel(0u64);
        let (notify_grants, grant_changes) = watch::channel(0u64);
        let notify_grants = Arc::new(notify_grants);
        let policy_api = Api::<WatchedPolicy>::all(client.clone());
        // Caches keep what decisions read: no field history, and only the labels of namespaces.
        let policy_events = watcher(policy_api, Default::default())
            .default_backoff()
            .modify(|p: &mut WatchedPolicy| p.managed_fields_mut().clear())
            .reflect(policy_writer);
        let reporter = Arc::new(UnreadableReporter {
            events: Events::new(client.clone(), FIELD_MANAGER, std::env::var("POD_NAME").ok()),
            reported: Default::default(),
        });
        let mut generations = Generations::default();
        let policy_grants = notify_grants.clone();
        tokio::spawn(policy_events.for_each(move |event| {
            if event.as_ref().is_ok_and(|e| generations.changed_by(e)) {
                notify.send_modify(|n| *n += 1);
                policy_grants.send_modify(|n| *n += 1);
            }
            let reporter = reporter.clone();
            async move {
                if let Ok(watcher::Event::Apply(policy) | watcher::Event::InitApply(policy)) = event {
                    reporter.check(&policy).await;
                }
            }
        }));
        let ns_api: Api<PartialObjectMeta<Namespace>> = Api::all(client);
        let ns_events = watcher(ns_api, Default::default())
            .default_backoff()
            .modify(|ns: &mut PartialObjectMeta<Namespace>| {
                ns.metadata.managed_fields = None;
                ns.metadata.annotations = None;
            })
            .reflect(namespace_writer);
        let mut labels = NamespaceLabels::default();
        tokio::spawn(ns_events.for_each(move |event| {
            if event.as_ref().is_ok_and(|e| labels.changed_by(e)) {
                notify_grants.send_modify(|n| *n += 1);
            }
            futures::future::ready(())
        }));
        Tenancy { policies, namespaces, changes, grant_changes }
    }

    pub async fn wait_until_ready(&self) {
        let _ = self.policies.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }

    /// The policies that could be read; an unreadable one allows nothing.
    pub fn policies(&self) -> Vec<Arc<IamAccessKeyPolicy>> {
        readable(self.policies.state())
    }

    /// Every stored policy, also the unreadable ones.
    pub fn stored_policies(&self) -> Vec<Arc<WatchedPolicy>> {
        self.policies.state()
    }

    /// Every namespace's name and labels.
    pub fn namespaces(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.namespaces
            .state()
            .iter()
            .map(|ns| (ns.name_any(), ns.metadata.labels.clone().unwrap_or_default()))
            .collect()
    }

    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let key = reflector::ObjectRef::new(namespace);
        self.namespaces.get(&key).and_then(|ns| ns.metadata.labels.clone()).unwrap_or_default()
    }

    /// Fires after any change of a policy's spec (including a deletion).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        tokio_stream::wrappers::WatchStream::from_changes(self.changes.clone()).map(|_| ())
    }

    /// Changes of what grants depend on: policies, and namespaces with their labels.
    pub fn grant_changes(&self) -> watch::Receiver<u64> {
        self.grant_changes.clone()
    }
}

/// The generation of every policy seen: a policy event is a change when it adds or deletes a
/// policy or carries a new generation (status writes keep the generation). A relist ends with
/// a change, since deletions during a broken watch arrive as nothing but the new list.
#[derive(Default)]
struct Generations {
    seen: HashMap<String, Option<i64>>,
}

impl Generations {
    fn changed_by(&mut self, event: &watcher::Event<WatchedPolicy>) -> bool {
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let generation = p.meta().generation;
                self.seen.insert(p.name_any(), generation) != Some(generation)
            }
            watcher::Event::Delete(p) => {
                self.seen.remove(&p.name_any());
                true
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }
}

/// The labels of every namespace seen: a namespace event is a change when it adds or deletes a
/// namespace or changes its labels.
#[derive(Default)]
struct NamespaceLabels {
    seen: HashMap<String, Option<BTreeMap<String, String>>>,
}

impl NamespaceLabels {
    fn changed_by(&mut self, event: &watcher::Event<PartialObjectMeta<Namespace>>) -> bool {
        match event {
            watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => {
                let labels = ns.metadata.labels.clone();
                let previous = self.seen.insert(ns.name_any(), labels.clone());
                previous != Some(labels)
            }
            watcher::Event::Delete(ns) => {
                self.seen.remove(&ns.name_any());
                true
            }
            watcher::Event::Init => false,
            watcher::Event::InitDone => true,
        }
    }
}

fn readable(watched: Vec<Arc<WatchedPolicy>>) -> Vec<Arc<IamAccessKeyPolicy>> {
    watched.iter().filter_map(|p| p.0.as_ref().ok()).map(|p| Arc::new(p.clone())).collect()
}

/// Reports each unreadable version of a policy once: a warning in the log and a Warning event.
/// A version is a generation: the operator's own status writes do not make a new one.
struct UnreadableReporter {
    events: Events,
    /// Policy name -> generation already reported.
    reported: std::sync::Mutex<HashMap<String, Option<i64>>>,
}

impl UnreadableReporter {
    async fn check(&self, policy: &WatchedPolicy) {
        let DeserializeGuard(Err(invalid)) = policy else {
            return;
        };
        let name = policy.name_any();
        let version = policy.meta().generation;
        {
            let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            if reported.get(&name) == Some(&version) {
                return;
            }
            reported.insert(name.clone(), version);
        }
        let message = format!(
            "the stored IamAccessKeyPolicy {name:?} cannot be read ({}): it allows nothing until it is fixed or deleted",
            invalid.error
        );
        warn!(policy = %name, error = %invalid.error, "{message}");
        let regarding = policy.object_ref(&());
        if let Err(e) = self.events.publish(&regarding, EventType::Warning, "InvalidPolicy", "Read", message).await {
            warn!(policy = %name, error = %e, "could not publish the event about an unreadable policy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_policy_allows_nothing_and_the_others_still_count() {
        let good: IamAccessKeyPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
            "metadata": {"name": "good"}, "spec": {"rules": [{"namespaces": ["a"], "userNames": ["u"]}]},
        }))
        .unwrap();
        let bad: WatchedPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
            "metadata": {"name": "bad"},
            "spec": {"rules": [{"namespaces": ["b"], "userNames": ["u"], "maxKeyAge": "99999999999999999999d"}]},
        }))
        .unwrap();
        assert!(bad.0.is_err(), "the guard holds the error instead of failing");
        let readable = readable(vec![Arc::new(DeserializeGuard(Ok(good))), Arc::new(bad)]);
        assert_eq!(readable.iter().map(|p| p.name_any()).collect::<Vec<_>>(), ["good"]);
    }

    #[test]
    fn a_status_write_is_no_policy_change_and_a_spec_change_is() {
        let policy = |generation: i64, status: serde_json::Value| -> WatchedPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
                "metadata": {"name": "p", "generation": generation},
                "spec": {"rules": [{"namespaces": ["a"], "userNames": ["u"]}]},
                "status": status,
            }))
            .unwrap()
        };
        let mut generations = Generations::default();
        assert!(!generations.changed_by(&watcher::Event::Init));
        assert!(generations.changed_by(&watcher::Event::InitApply(policy(1, serde_json::Value::Null))));
        assert!(generations.changed_by(&watcher::Event::InitDone), "the first list is complete");
        let status = serde_json::json!({"observedGeneration": 1});
        assert!(!generations.changed_by(&watcher::Event::Apply(policy(1, status.clone()))), "status only");
        assert!(generations.changed_by(&watcher::Event::Apply(policy(2, status.clone()))), "spec");
        assert!(generations.changed_by(&watcher::Event::Delete(policy(2, status))));
    }

    #[test]
    fn namespaces_change_grants_when_they_come_go_or_change_labels() {
        let ns = |labels: &[(&str, &str)], annotations: &[(&str, &str)]| {
            let mut ns = PartialObjectMeta::<Namespace>::default();
            ns.metadata.name = Some("a".into());
            let map = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            ns.metadata.labels = Some(map(labels));
            ns.metadata.annotations = Some(map(annotations));
            ns
        };
        let mut labels = NamespaceLabels::default();
        assert!(labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "data")], &[]))));
        assert!(!labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "data")], &[("x", "y")]))));
        assert!(labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "web")], &[]))));
        assert!(labels.changed_by(&watcher::Event::Delete(ns(&[("tier", "web")], &[]))));
    }
}
