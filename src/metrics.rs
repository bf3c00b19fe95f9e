//! Prometheus metrics (`iam_key_operator_*`), served on `/metrics`.

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::iam::IamError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IamCallLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
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
        Metrics { registry: Mutex::new(registry), iam_calls, reconciles, reconcile_duration, kube_writes }
    }
}

impl Metrics {
    pub fn iam_call(&self, operation: &'static str, error: Option<&IamError>) {
        let outcome = match error {
            None => "ok",
            Some(IamError::NotFound { .. }) => "not_found",
            Some(IamError::LimitExceeded { .. }) => "limit_exceeded",
            Some(IamError::AccessDenied { .. }) => "access_denied",
            Some(IamError::Throttled { .. }) => "throttled",
            Some(IamError::Unavailable { .. }) => "unavailable",
            Some(IamError::Invalid { .. }) => "invalid",
        };
        self.iam_calls.get_or_create(&IamCallLabels { operation, outcome }).inc();
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
