//! The one error type of the controller. Each variant knows its condition reason, its metric
//! label and whether retrying without a change can help.

use crate::{iam::IamError, plan::Blocked};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Iam(#[from] IamError),

    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// Waiting for something outside to change (user created, Secret removed, slot freed...).
    #[error("{message}")]
    Blocked { blocked: Blocked, message: String },

    /// The new key never authenticated as the user; it was deleted unpublished.
    #[error(
        "new access key {access_key_id} did not authenticate as {user_arn} (STS GetCallerIdentity answered {answer}); it was deleted and will be retried"
    )]
    VerifyFailed { access_key_id: String, user_arn: String, answer: String },

    /// No tenancy policy allows this namespace to manage this IAM user.
    #[error("{0}")]
    NotAuthorized(String),

    /// A policy allows the resource, but not its settings (say, a rotation interval shorter than
    /// the policy's minimum).
    #[error("{0}")]
    PolicyViolation(String),

    /// Something about the resource itself makes it impossible to act on.
    #[error("{0}")]
    Invalid(String),

    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// The `Ready` condition's reason (also the metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Iam(e) => match e {
                IamError::NotFound { .. } => "IamNotFound",
                IamError::LimitExceeded { .. } => "KeyLimitExceeded",
                IamError::AccessDenied { .. } => "NotAuthorized",
                IamError::Throttled { .. } => "Throttled",
                IamError::Unavailable { .. } => "IamUnavailable",
                IamError::Invalid { .. } => "IamRejected",
            },
            Error::Kube(_) => "KubernetesError",
            Error::Blocked { blocked, .. } => match blocked {
                Blocked::Paused => "Paused",
                Blocked::UserNotFound => "UserNotFound",
                Blocked::UserClaimed { .. } => "UserClaimed",
                Blocked::SecretConflict => "SecretConflict",
                Blocked::KeyLimitExceeded { .. } => "KeyLimitExceeded",
                Blocked::KeyUnused { .. } => "DeactivatedUnused",
            },
            Error::VerifyFailed { .. } => "KeyVerificationFailed",
            Error::NotAuthorized(_) => "NotAuthorized",
            Error::PolicyViolation(_) => "PolicyViolation",
            Error::Invalid(_) => "InvalidSpec",
            Error::Finalizer(_) => "FinalizerError",
        }
    }

    /// Whether the same attempt can succeed later with nobody changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Iam(e) => e.is_retryable(),
            Error::Kube(_) | Error::VerifyFailed { .. } | Error::Finalizer(_) => true,
            Error::Blocked { .. } | Error::Invalid(_) | Error::NotAuthorized(_) | Error::PolicyViolation(_) => false,
        }
    }
}
