//! The tenancy policies and namespace labels, cached (metadata of namespaces only), and what
//! each change may have changed the decision for, so that only those resources are reconciled
//! again: a policy edit in a cluster of 5,000 keys costs IAM calls for the keys it governs, not
//! for all of them. A change of status alone (the operator's own policy status writes) is not
//! a policy change.
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
use tokio::sync::{broadcast, watch};
use tracing::warn;

use super::events::Events;
use crate::{
    crd::{FIELD_MANAGER, IamAccessKeyPolicy, PolicyRule},
    policy::{NamespaceFacts, namespace_matches},
};

type WatchedPolicy = DeserializeGuard<IamAccessKeyPolicy>;

#[derive(Clone)]
pub struct Tenancy {
    policies: Store<WatchedPolicy>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    affected: broadcast::Sender<Affected>,
    /// Fires on policy changes and on namespaces appearing, going or changing labels: what
    /// the grants between namespaces depend on.
    grant_changes: watch::Receiver<u64>,
}

impl Tenancy {
    /// Start caching policies and namespaces in the background.
    pub fn start(client: Client) -> Tenancy {
        let (policies, policy_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        // Changes come in bursts (a relist, an Argo CD sync); a subscriber that falls behind
        // gets `Everything` instead of what it missed.
        let (affected, _) = broadcast::channel(1024);
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
        let mut versions = PolicyVersions::default();
        let policy_grants = notify_grants.clone();
        let policy_affected = affected.clone();
        tokio::spawn(policy_events.for_each(move |event| {
            if let Some(change) = event.as_ref().ok().and_then(|e| versions.changed_by(e)) {
                let _ = policy_affected.send(change);
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
        let namespace_affected = affected.clone();
        tokio::spawn(ns_events.for_each(move |event| {
            if let Some(change) = event.as_ref().ok().and_then(|e| labels.changed_by(e)) {
                let _ = namespace_affected.send(change);
                notify_grants.send_modify(|n| *n += 1);
            }
            futures::future::ready(())
        }));
        Tenancy { policies, namespaces, affected, grant_changes }
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

    /// After each change of a policy's spec (including a deletion) or of a namespace's labels:
    /// whose decision it may have changed.
    pub fn changes(&self) -> impl Stream<Item = Affected> + Send + 'static {
        tokio_stream::wrappers::BroadcastStream::new(self.affected.subscribe())
            .map(|change| change.unwrap_or(Affected::Everything))
    }

    /// Whether a resource in `namespace` is among the `affected`.
    pub fn affects(&self, affected: &Affected, namespace: &str) -> bool {
        affected.covers(&NamespaceFacts { name: namespace, labels: &self.namespace_labels(namespace) })
    }

    /// Changes of what grants depend on: policies, and namespaces with their labels.
    pub fn grant_changes(&self) -> watch::Receiver<u64> {
        self.grant_changes.clone()
    }
}

/// The resources a tenancy change may have changed the decision for. A decision reads only the
/// rules whose namespaces match the resource's, and the labels of its namespace.
#[derive(Clone, Debug, PartialEq)]
pub enum Affected {
    /// After a relist (deletions during a broken watch arrive as nothing but the new list):
    /// every resource.
    Everything,
    /// The resources in the namespaces these rules match: a policy's rules before and after.
    RulesFor(Vec<PolicyRule>),
    /// The resources in this namespace: it came, went or changed its labels.
    Namespace(String),
}

impl Affected {
    /// The `cause` label of `iam_key_operator_tenancy_wakes_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            Affected::Everything => "relist",
            Affected::RulesFor(_) => "policy",
            Affected::Namespace(_) => "namespace",
        }
    }

    pub fn covers(&self, ns: &NamespaceFacts) -> bool {
        match self {
            Affected::Everything => true,
            Affected::RulesFor(rules) => rules.iter().any(|rule| namespace_matches(rule, ns)),
            Affected::Namespace(name) => name == ns.name,
        }
    }
}

/// The generation and rules of every policy seen (an unreadable one has none: it allows
/// nothing): a policy event is a change when it adds or deletes a policy or carries a new
/// generation (status writes keep the generation); it affects the namespaces its rules matched
/// before and match now.
#[derive(Default)]
struct PolicyVersions {
    seen: HashMap<String, (Option<i64>, Vec<PolicyRule>)>,
}

impl PolicyVersions {
    fn changed_by(&mut self, event: &watcher::Event<WatchedPolicy>) -> Option<Affected> {
        let (before, after) = match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                let rules = p.0.as_ref().map(|p| p.spec.rules.clone()).unwrap_or_default();
                let version = (p.meta().generation, rules);
                let before = self.seen.insert(p.name_any(), version.clone());
                if before.as_ref().is_some_and(|(generation, _)| *generation == version.0) {
                    return None;
                }
                (before.map(|(_, rules)| rules).unwrap_or_default(), version.1)
            }
            watcher::Event::Delete(p) => {
                (self.seen.remove(&p.name_any()).map(|(_, rules)| rules).unwrap_or_default(), vec![])
            }
            watcher::Event::Init => return None,
            watcher::Event::InitDone => return Some(Affected::Everything),
        };
        Some(Affected::RulesFor([before, after].concat()))
    }
}

/// The labels of every namespace seen: a namespace event is a change when it adds or deletes a
/// namespace or changes its labels.
#[derive(Default)]
struct NamespaceLabels {
    seen: HashMap<String, Option<BTreeMap<String, String>>>,
}

impl NamespaceLabels {
    fn changed_by(&mut self, event: &watcher::Event<PartialObjectMeta<Namespace>>) -> Option<Affected> {
        let name = match event {
            watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => {
                let labels = ns.metadata.labels.clone();
                let previous = self.seen.insert(ns.name_any(), labels.clone());
                (previous != Some(labels)).then(|| ns.name_any())?
            }
            watcher::Event::Delete(ns) => {
                self.seen.remove(&ns.name_any());
                ns.name_any()
            }
            watcher::Event::Init => return None,
            watcher::Event::InitDone => return Some(Affected::Everything),
        };
        Some(Affected::Namespace(name))
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

    fn rule(namespaces: &[&str]) -> PolicyRule {
        serde_json::from_value(serde_json::json!({"namespaces": namespaces, "userNames": ["u"]})).unwrap()
    }

    #[test]
    fn a_status_write_is_no_policy_change_and_a_spec_change_affects_the_namespaces_before_and_after() {
        let policy = |generation: i64, namespaces: &[&str], status: serde_json::Value| -> WatchedPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
                "metadata": {"name": "p", "generation": generation},
                "spec": {"rules": [{"namespaces": namespaces, "userNames": ["u"]}]},
                "status": status,
            }))
            .unwrap()
        };
        let mut versions = PolicyVersions::default();
        assert_eq!(versions.changed_by(&watcher::Event::Init), None);
        let created = versions.changed_by(&watcher::Event::InitApply(policy(1, &["a"], serde_json::Value::Null)));
        assert_eq!(created, Some(Affected::RulesFor(vec![rule(&["a"])])));
        assert_eq!(versions.changed_by(&watcher::Event::InitDone), Some(Affected::Everything), "a relist");
        let status = serde_json::json!({"observedGeneration": 1});
        assert_eq!(versions.changed_by(&watcher::Event::Apply(policy(1, &["a"], status.clone()))), None, "status only");
        let moved = versions.changed_by(&watcher::Event::Apply(policy(2, &["team-*"], status.clone())));
        assert_eq!(moved, Some(Affected::RulesFor(vec![rule(&["a"]), rule(&["team-*"])])), "before and after");
        let deleted = versions.changed_by(&watcher::Event::Delete(policy(2, &["team-*"], status)));
        assert_eq!(deleted, Some(Affected::RulesFor(vec![rule(&["team-*"])])));
    }

    #[test]
    fn an_unreadable_policy_allows_nothing_so_it_affects_what_it_allowed_before() {
        let policy = |generation: i64, max_key_age: &str| -> WatchedPolicy {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
                "metadata": {"name": "p", "generation": generation},
                "spec": {"rules": [{"namespaces": ["b"], "userNames": ["u"], "maxKeyAge": max_key_age}]},
            }))
            .unwrap()
        };
        let mut versions = PolicyVersions::default();
        let unreadable = versions.changed_by(&watcher::Event::Apply(policy(1, "99999999999999999999d")));
        assert_eq!(unreadable, Some(Affected::RulesFor(vec![])), "allowed nothing, allows nothing");
        let Some(Affected::RulesFor(fixed)) = versions.changed_by(&watcher::Event::Apply(policy(2, "90d"))) else {
            panic!("a fix is a change");
        };
        assert_eq!(fixed.len(), 1);
        let broken = versions.changed_by(&watcher::Event::Apply(policy(3, "99999999999999999999d")));
        assert_eq!(broken, Some(Affected::RulesFor(fixed)), "what the readable version allowed");
    }

    #[test]
    fn a_change_affects_the_namespaces_its_rules_match() {
        let labels: BTreeMap<String, String> = [("tier".to_string(), "data".to_string())].into();
        let none = BTreeMap::new();
        let ns = |name, labels| NamespaceFacts { name, labels };
        let by_name = Affected::RulesFor(vec![rule(&["team-*"])]);
        assert!(by_name.covers(&ns("team-a", &none)));
        assert!(!by_name.covers(&ns("other", &labels)));
        let selector: PolicyRule = serde_json::from_value(
            serde_json::json!({"namespaceSelector": {"matchLabels": {"tier": "data"}}, "userNames": ["u"]}),
        )
        .unwrap();
        let by_labels = Affected::RulesFor(vec![selector]);
        assert!(by_labels.covers(&ns("other", &labels)));
        assert!(!by_labels.covers(&ns("other", &none)));
        assert!(Affected::Namespace("a".into()).covers(&ns("a", &none)));
        assert!(!Affected::Namespace("a".into()).covers(&ns("ab", &none)));
        assert!(Affected::Everything.covers(&ns("any", &none)));
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
        let a = Some(Affected::Namespace("a".into()));
        assert_eq!(labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "data")], &[]))), a);
        assert_eq!(labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "data")], &[("x", "y")]))), None);
        assert_eq!(labels.changed_by(&watcher::Event::Apply(ns(&[("tier", "web")], &[]))), a);
        assert_eq!(labels.changed_by(&watcher::Event::Delete(ns(&[("tier", "web")], &[]))), a);
        assert_eq!(labels.changed_by(&watcher::Event::InitDone), Some(Affected::Everything));
    }
}
