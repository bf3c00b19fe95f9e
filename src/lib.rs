//! iam-key-operator: reconciles `IamAccessKey` resources into AWS IAM access keys and the
//! Kubernetes Secrets that hold them.
#![forbid(unsafe_code)]

pub mod controller;
pub mod crd;
pub mod error;
pub mod failpoint;
pub mod iam;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod plugin;
pub mod policy;
pub mod server;
pub mod telemetry;
pub mod template;
