//! The custom resources: `IamAccessKey` (namespaced) and `IamAccessKeyPolicy` (cluster-scoped).

mod access_key;
mod duration;
mod policy;

pub use access_key::*;
pub use duration::{BOUNDARY_CASES, DURATION_PATTERN, Duration, MAX_DURATION_LEN, ParseDurationError};
pub use policy::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD this operator serves, in install order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![IamAccessKey::crd(), IamAccessKeyPolicy::crd()]
}

/// The CRDs as one multi-document YAML stream (what `iam-key-operator crd` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
