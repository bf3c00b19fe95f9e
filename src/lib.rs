//! iam-key-operator: reconciles `IamAccessKey` resources into AWS IAM access keys and the
//! Kubernetes Secrets that hold them.
#![forbid(unsafe_code)]

pub mod crd;
pub mod iam;
pub mod metrics;
pub mod plan;
