//! Prometheus metrics (`iam_key_operator_*`), served on `/metrics`.

use std::sync::{Mutex, atomic::AtomicU64};

use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, LabelSetEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct IamCallLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
    /// The account of a role a policy rule names; absent for the operator's own identity.
    pub account: Option<String>,
}

impl EncodeLabelSet for IamCallLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("operation", self.operation).encode(encoder.encode_label())?;
        ("outcome", self.outcome).encode(encoder.encode_label())?;
        if let Some(account) = &self.account {
            ("account", account.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabels {
    pub account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeWriteLabels {
    pub kind: &'static str,
    pub verb: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub iam_calls: Family<IamCallLabels, Counter>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub kube_writes: Family<KubeWriteLabels, Counter>,
    /// Resources reconciled again because a policy or a namespace changed, by cause.
    pub tenancy_wakes: Family<CauseLabels, Counter>,
    pub resources: ResourceGauges,
    /// The IAM/STS rate the limiter grants now (calls per second; 0: unlimited).
    pub iam_rate_limit: Gauge<f64, AtomicU64>,
    /// The same in each account a policy rule names a role in.
    pub account_iam_rate_limit: Family<AccountLabels, Gauge<f64, AtomicU64>>,
    /// New keys waiting to authenticate (their reconciles hold no slot meanwhile).
    pub keys_verifying: Gauge,
    /// How long after its creation a new key is first checked (learned from recent keys).
    pub verify_first_check: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("iam_key_operator");
        let iam_calls = Family::<IamCallLabels, Counter>::default();
        registry.register("iam_calls", "IAM and STS API calls by operation and outcome", iam_calls.clone());
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by result (ok, or the condition reason)", reconciles.clone());
        let buckets = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let reconcile_duration = Histogram::new(buckets);
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_duration.clone());
        let kube_writes = Family::<KubeWriteLabels, Counter>::default();
        registry.register("kube_writes", "Writes to the Kubernetes API by object kind and verb", kube_writes.clone());
        let tenancy_wakes = Family::<CauseLabels, Counter>::default();
        registry.register(
            "tenancy_wakes",
            "Resources reconciled again because a policy (cause policy), a namespace's labels (namespace) or a relist of either (relist) changed",
            tenancy_wakes.clone(),
        );
        let resources = ResourceGauges::register(&mut registry);
        let iam_rate_limit = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "iam_rate_limit",
            "IAM and STS calls per second the rate limiter grants now (adaptive: lowered when IAM throttles; 0: unlimited)",
            iam_rate_limit.clone(),
        );
        let account_iam_rate_limit = Family::<AccountLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "account_iam_rate_limit",
            "IAM and STS calls per second the rate limiter of an account a policy rule names a role in grants now",
            account_iam_rate_limit.clone(),
        );
        let keys_verifying = Gauge::default();
        registry.register(
            "keys_verifying",
            "New keys created and not yet accepted by STS (IAM is eventually consistent); none is published before",
            keys_verifying.clone(),
        );
        let verify_first_check = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "verify_first_check_seconds",
            "How long after its creation a new key is first checked against STS, learned from the keys before it",
            verify_first_check.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            iam_calls,
            reconciles,
            reconcile_duration,
            kube_writes,
            tenancy_wakes,
            resources,
            iam_rate_limit,
            account_iam_rate_limit,
            keys_verifying,
            verify_first_check,
        }
    }
}

impl Metrics {
    /// One IAM or STS call; `outcome` is `ok` or the error's `IamError::outcome`; `account`
    /// that of an assumed role (`None`: the operator's own identity).
    pub fn iam_call(&self, operation: &'static str, outcome: &'static str, account: Option<&str>) {
        let account = account.map(str::to_owned);
        self.iam_calls.get_or_create(&IamCallLabels { operation, outcome, account }).inc();
    }

    pub fn set_iam_rate_limit(&self, account: Option<&str>, rate: f64) {
        match account {
            None => {
                self.iam_rate_limit.set(rate);
            }
            Some(account) => {
                self.account_iam_rate_limit.get_or_create(&AccountLabels { account: account.to_owned() }).set(rate);
            }
        };
    }

    pub fn kube_write(&self, kind: &'static str, verb: &'static str) {
        self.kube_writes.get_or_create(&KubeWriteLabels { kind, verb }).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// What one resource looks like after a reconcile, for the per-resource gauges.
pub struct ResourceSnapshot {
    pub ready_reason: String,
    pub keys: usize,
    pub key_age_seconds: Option<f64>,
    pub last_used_timestamp: Option<f64>,
    /// When IAM created the current key, in Unix seconds.
    pub key_created_timestamp: Option<f64>,
    /// `status.nextRotationAt` in Unix seconds: set when a schedule or a policy's `maxKeyAge` applies.
    pub next_rotation_timestamp: Option<f64>,
    pub rotation_overdue: bool,
}

/// Per-resource gauges. Their series are removed when the resource goes.
pub struct ResourceGauges {
    pub condition: Family<ConditionLabels, Gauge>,
    pub keys: Family<ResourceLabels, Gauge>,
    pub key_age: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub last_used: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub key_created: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub next_rotation: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    pub rotation_overdue: Family<ResourceLabels, Gauge>,
    pub rotations: Family<ReasonLabels, Counter>,
    reasons: Mutex<std::collections::HashMap<ResourceLabels, String>>,
}

impl ResourceGauges {
    fn register(registry: &mut Registry) -> Self {
        let gauges = ResourceGauges {
            condition: Family::default(),
            keys: Family::default(),
            key_age: Family::default(),
            last_used: Family::default(),
            key_created: Family::default(),
            next_rotation: Family::default(),
            rotation_overdue: Family::default(),
            rotations: Family::default(),
            reasons: Mutex::default(),
        };
        registry.register("condition", "1 per resource, labelled with its Ready reason", gauges.condition.clone());
        registry.register("keys_managed", "IAM access keys a resource owns", gauges.keys.clone());
        registry.register("key_age_seconds", "Age of the current key at the last reconcile", gauges.key_age.clone());
        registry.register(
            "key_last_used_timestamp_seconds",
            "Last use of the current key, as IAM reported it",
            gauges.last_used.clone(),
        );
        registry.register(
            "key_created_timestamp_seconds",
            "When IAM created the current key, in Unix seconds",
            gauges.key_created.clone(),
        );
        registry.register(
            "next_rotation_timestamp_seconds",
            "When the current key is due for rotation (status.nextRotationAt), in Unix seconds",
            gauges.next_rotation.clone(),
        );
        registry.register(
            "rotation_overdue",
            "1 when a due rotation has not happened",
            gauges.rotation_overdue.clone(),
        );
        registry.register("rotations", "New keys issued, by reason", gauges.rotations.clone());
        gauges
    }

    pub fn observe(&self, namespace: &str, name: &str, s: &ResourceSnapshot) {
        let labels = ResourceLabels { namespace: namespace.into(), name: name.into() };
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = reasons.insert(labels.clone(), s.ready_reason.clone())
            && old != s.ready_reason
        {
            self.condition.remove(&ConditionLabels { namespace: namespace.into(), name: name.into(), reason: old });
        }
        let condition =
            ConditionLabels { namespace: namespace.into(), name: name.into(), reason: s.ready_reason.clone() };
        self.condition.get_or_create(&condition).set(1);
        self.keys.get_or_create(&labels).set(s.keys as i64);
        set_or_remove(&self.key_age, &labels, s.key_age_seconds);
        set_or_remove(&self.last_used, &labels, s.last_used_timestamp);
        set_or_remove(&self.key_created, &labels, s.key_created_timestamp);
        set_or_remove(&self.next_rotation, &labels, s.next_rotation_timestamp);
        self.rotation_overdue.get_or_create(&labels).set(i64::from(s.rotation_overdue));
    }

    pub fn forget(&self, namespace: &str, name: &str) {
        let labels = ResourceLabels { namespace: namespace.into(), name: name.into() };
        if let Some(reason) = self.reasons.lock().unwrap_or_else(|e| e.into_inner()).remove(&labels) {
            self.condition.remove(&ConditionLabels { namespace: namespace.into(), name: name.into(), reason });
        }
        self.keys.remove(&labels);
        self.key_age.remove(&labels);
        self.last_used.remove(&labels);
        self.key_created.remove(&labels);
        self.next_rotation.remove(&labels);
        self.rotation_overdue.remove(&labels);
    }
}

/// A per-resource gauge holds a value, or has no series at all when there is none.
fn set_or_remove(family: &Family<ResourceLabels, Gauge<f64, AtomicU64>>, labels: &ResourceLabels, value: Option<f64>) {
    match value {
        Some(v) => drop(family.get_or_create(labels).set(v)),
        None => drop(family.remove(labels)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the one sample of `name` for `app` in namespace `ns`, if any.
    fn sample(page: &str, name: &str) -> Option<f64> {
        let prefix = format!("iam_key_operator_{name}{{namespace=\"ns\",name=\"app\"}} ");
        page.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().expect("a number"))
    }

    fn snapshot(created: Option<f64>, next_rotation: Option<f64>) -> ResourceSnapshot {
        ResourceSnapshot {
            ready_reason: "Ready".into(),
            keys: 1,
            key_age_seconds: created.map(|_| 60.0),
            last_used_timestamp: None,
            key_created_timestamp: created,
            next_rotation_timestamp: next_rotation,
            rotation_overdue: false,
        }
    }

    #[test]
    fn timestamp_gauges_follow_the_snapshot_and_go_with_the_resource() {
        let metrics = Metrics::default();
        let gauges = &metrics.resources;
        // A created date with sub-second precision, and a rotation 30 days later.
        gauges.observe("ns", "app", &snapshot(Some(1_767_225_600.25), Some(1_769_817_600.0)));
        let page = metrics.render();
        assert!(page.contains("# TYPE iam_key_operator_key_created_timestamp_seconds gauge"), "{page}");
        assert!(page.contains("# TYPE iam_key_operator_next_rotation_timestamp_seconds gauge"), "{page}");
        assert_eq!(sample(&page, "key_created_timestamp_seconds"), Some(1_767_225_600.25));
        assert_eq!(sample(&page, "next_rotation_timestamp_seconds"), Some(1_769_817_600.0));

        // A new key after a rotation; no schedule any more.
        gauges.observe("ns", "app", &snapshot(Some(1_769_817_700.0), None));
        let page = metrics.render();
        assert_eq!(sample(&page, "key_created_timestamp_seconds"), Some(1_769_817_700.0));
        assert_eq!(sample(&page, "next_rotation_timestamp_seconds"), None, "{page}");

        // No current key (a lost key being replaced): no creation date either.
        gauges.observe("ns", "app", &snapshot(None, Some(1_769_817_600.0)));
        let page = metrics.render();
        assert_eq!(sample(&page, "key_created_timestamp_seconds"), None, "{page}");
        assert_eq!(sample(&page, "next_rotation_timestamp_seconds"), Some(1_769_817_600.0));

        gauges.observe("ns", "app", &snapshot(Some(1_769_817_700.0), Some(1_772_409_700.0)));
        gauges.forget("ns", "app");
        let page = metrics.render();
        assert!(!page.contains("name=\"app\""), "series left after the resource went:\n{page}");
    }
}
