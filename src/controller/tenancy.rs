//! The tenancy policies and namespace labels, cached (metadata of namespaces only), and a
//! signal on every policy change so that affected resources are reconciled again.
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

use super::{FIELD_MANAGER, events::Events};
use crate::crd::IamAccessKeyPolicy;

type WatchedPolicy = DeserializeGuard<IamAccessKeyPolicy>;

#[derive(Clone)]
pub struct Tenancy {
    policies: Store<WatchedPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    changes: watch::Receiver<u64>,
}

impl Tenancy {
    /// Start caching policies and namespaces in the background.
    pub fn start(client: Client) -> Tenancy {
        let (policies, policy_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let (notify, changes) = watch::channel(0u64);
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
        tokio::spawn(policy_events.for_each(move |event| {
            notify.send_modify(|n| *n += 1);
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
        tokio::spawn(ns_events.for_each(|_| futures::future::ready(())));
        Tenancy { policies, namespaces, changes }
    }

    pub async fn wait_until_ready(&self) {
        let _ = self.policies.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }

    /// The policies that could be read; an unreadable one allows nothing.
    pub fn policies(&self) -> Vec<Arc<IamAccessKeyPolicy>> {
        readable(self.policies.state())
    }

    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let key = reflector::ObjectRef::new(namespace);
        self.namespaces.get(&key).and_then(|ns| ns.metadata.labels.clone()).unwrap_or_default()
    }

    /// Fires after any change of a policy (including a deletion).
    pub fn changes(&self) -> impl Stream<Item = ()> + Send + 'static {
        tokio_stream::wrappers::WatchStream::from_changes(self.changes.clone()).map(|_| ())
    }
}

fn readable(watched: Vec<Arc<WatchedPolicy>>) -> Vec<Arc<IamAccessKeyPolicy>> {
    watched.iter().filter_map(|p| p.0.as_ref().ok()).map(|p| Arc::new(p.clone())).collect()
}

/// Reports each unreadable version of a policy once: a warning in the log and a Warning event.
struct UnreadableReporter {
    events: Events,
    /// Policy name -> resource version already reported.
    reported: std::sync::Mutex<HashMap<String, Option<String>>>,
}

impl UnreadableReporter {
    async fn check(&self, policy: &WatchedPolicy) {
        let DeserializeGuard(Err(invalid)) = policy else {
            return;
        };
        let name = policy.name_any();
        let version = policy.resource_version();
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
}
