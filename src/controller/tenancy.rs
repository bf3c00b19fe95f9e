//! The tenancy policies and namespace labels, cached (metadata of namespaces only), and a
//! signal on every policy change so that affected resources are reconciled again.

use std::{collections::BTreeMap, sync::Arc};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};
use tokio::sync::watch;

use crate::crd::IamAccessKeyPolicy;

#[derive(Clone)]
pub struct Tenancy {
    policies: Store<IamAccessKeyPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    changes: watch::Receiver<u64>,
}

impl Tenancy {
    /// Start caching policies and namespaces in the background.
    pub fn start(client: Client) -> Tenancy {
        let (policies, policy_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let (notify, changes) = watch::channel(0u64);
        let policy_api = Api::<IamAccessKeyPolicy>::all(client.clone());
        // Caches keep what decisions read: no field history, and only the labels of namespaces.
        let policy_events = watcher(policy_api, Default::default())
            .default_backoff()
            .modify(|p: &mut IamAccessKeyPolicy| p.metadata.managed_fields = None)
            .reflect(policy_writer);
        tokio::spawn(policy_events.for_each(move |_| {
            notify.send_modify(|n| *n += 1);
            futures::future::ready(())
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

    pub fn policies(&self) -> Vec<Arc<IamAccessKeyPolicy>> {
        self.policies.state()
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
