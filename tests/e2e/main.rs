//! The integration tests: one binary, one module per concern, against the real parts (a
//! kube-apiserver + etcd built from their Go modules, moto for IAM, Argo CD's gopher-lua), with
//! the operator run as the chart installs it. Tests in a module share one environment
//! (`testenv::shared()`); those that kill it or count the operator's calls start their own.
//!
//! ```sh
//! cargo test --features failpoints --test e2e                # all of them (what `make test` runs)
//! cargo test --features failpoints --test e2e rotation::     # one module
//! ```

mod etcd;
mod support;

mod accounts;
mod admission;
mod adoption;
mod argocd;
mod chart;
mod crash;
mod crd;
mod faults;
mod harness;
mod iam_policy;
mod operations;
mod plugin;
mod recipes;
mod reconcile;
mod rotation;
mod secrecy;
mod soak;
mod templates;
mod tenancy;
mod tenant_escapes;
mod upgrade;
