//! The one error type of the controller. Each variant knows its condition reason, its metric
//! label and whether retrying without a change can help.

use crate::{iam::IamError, plan::Blocked};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Iam(#[from] IamError),

    /// A Kubernetes API call failed: `call` names it ("writing the Secret"), the message is the
    /// API server's own (kube's `Display` of a refusal appends a debug dump of the whole
    /// `Status`), and the client's error stays the source.
    #[error("{call}: {}", kube_message(source))]
    Kube {
        call: &'static str,
        #[source]
        source: kube::Error,
    },

    /// The operator broke one of its own rules (a bug, not the resource's fault): reported as
    /// such rather than as a problem of the spec, and retried with the slow backoff.
    #[error("internal error: {0}; please report it")]
    Internal(String),

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

    /// Rules naming different AWS accounts allow the resource: nothing is done until one does.
    #[error("{0}")]
    AccountConflict(String),

    /// The policies now place a resource whose keys exist in one account in another: nothing is
    /// done in either until the keys are gone or the rules place it back.
    #[error("{0}")]
    AccountChanged(String),

    /// `spec.secret.template` does not render: refused before any IAM write.
    #[error("{0}")]
    InvalidTemplate(crate::template::TemplateError),

    /// Something about the resource itself makes it impossible to act on.
    #[error("{0}")]
    Invalid(String),

    /// Adding or removing the finalizer failed (`source` is the API call's error, if any).
    #[error("{what}{}", source.as_ref().map(|e| format!(": {}", kube_message(e))).unwrap_or_default())]
    Finalizer {
        what: &'static str,
        #[source]
        source: Option<kube::Error>,
    },
}

/// Names the Kubernetes API call a client error came from: `api.replace(..).await.context("writing the Secret")?`.
pub trait KubeContext<T> {
    fn context(self, call: &'static str) -> Result<T, Error>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn context(self, call: &'static str) -> Result<T, Error> {
        self.map_err(|source| Error::Kube { call, source })
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(e: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match e {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) => Error::Finalizer { what: "could not add the finalizer", source: Some(e) },
            F::RemoveFinalizer(e) => Error::Finalizer { what: "could not remove the finalizer", source: Some(e) },
            F::UnnamedObject => Error::Finalizer { what: "the object has no name", source: None },
            F::InvalidFinalizer => Error::Finalizer { what: "invalid finalizer", source: None },
        }
    }
}

/// A Kubernetes client error as a person reads it: for a refusal by the API server, its
/// message (`secrets "x" is forbidden: User "..." cannot update resource "secrets" ...`) with
/// the HTTP code and reason; otherwise the error and its causes. Never the request's object:
/// the API server's messages name fields and values of metadata, not a Secret's data.
pub fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            let code_reason = match (status.code, status.reason.as_str()) {
                (0, "") => String::new(),
                (0, reason) => format!(" ({reason})"),
                (code, "") => format!(" ({code})"),
                (code, reason) => format!(" ({code} {reason})"),
            };
            let message =
                if status.message.is_empty() { "the API server refused the request" } else { &status.message };
            format!("{message}{code_reason}")
        }
        other => {
            let mut message = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let text = cause.to_string();
                // kube's variants print their cause already ("HyperError: {cause}").
                if !message.ends_with(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
                source = cause.source();
            }
            message
        }
    }
}

impl Error {
    /// The `Ready` condition's reason (also the metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Iam(e) => e.reason(),
            Error::Kube { .. } => "KubernetesError",
            Error::Internal(_) => "InternalError",
            Error::Blocked { blocked, .. } => match blocked {
                Blocked::Paused => "Paused",
                Blocked::UserNotFound => "UserNotFound",
                Blocked::UserClaimed { .. } => "UserClaimed",
                Blocked::SecretConflict => "SecretConflict",
                Blocked::KeyLimitExceeded { .. } => "KeyLimitExceeded",
                Blocked::KeyUnused { .. } => "DeactivatedUnused",
                Blocked::AdoptionRefused(_) => "AdoptionRefused",
                Blocked::MergeNotAllowed { .. } => "MergeNotAllowed",
                Blocked::SecretNotFound => "SecretNotFound",
            },
            Error::VerifyFailed { .. } => "KeyVerificationFailed",
            Error::NotAuthorized(_) => "NotAuthorized",
            Error::PolicyViolation(_) => "PolicyViolation",
            Error::AccountConflict(_) => "AccountConflict",
            Error::AccountChanged(_) => "AccountChanged",
            Error::Invalid(_) => "InvalidSpec",
            Error::InvalidTemplate(_) => "InvalidTemplate",
            Error::Finalizer { .. } => "FinalizerError",
        }
    }

    /// Whether the same attempt can succeed later with nobody changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Iam(e) => e.is_retryable(),
            Error::Kube { .. } | Error::VerifyFailed { .. } | Error::Finalizer { .. } => true,
            // A bug: retried with the slow backoff, and shown as needing a person.
            Error::Blocked { .. }
            | Error::Invalid(_)
            | Error::InvalidTemplate(_)
            | Error::NotAuthorized(_)
            | Error::PolicyViolation(_)
            | Error::AccountConflict(_)
            | Error::AccountChanged(_)
            | Error::Internal(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use kube::core::{Status, response::StatusDetails};

    use super::*;

    fn forbidden() -> kube::Error {
        let message = r#"secrets "app-aws" is forbidden: User "system:serviceaccount:iko:iko" cannot update resource "secrets" in API group "" in the namespace "team-a""#;
        let details = StatusDetails {
            name: "app-aws".into(),
            group: String::new(),
            kind: "secrets".into(),
            uid: String::new(),
            causes: vec![],
            retry_after_seconds: 0,
        };
        kube::Error::Api(Status::failure(message, "Forbidden").with_code(403).with_details(details).boxed())
    }

    #[test]
    fn a_refusal_reads_as_the_api_servers_message_with_code_and_reason() {
        let err = Err::<(), _>(forbidden()).context("replacing the Secret").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"replacing the Secret: secrets "app-aws" is forbidden: User "system:serviceaccount:iko:iko" cannot update resource "secrets" in API group "" in the namespace "team-a" (403 Forbidden)"#
        );
        assert_eq!(err.reason(), "KubernetesError");
        // The client's error is kept as the source, not flattened into the message.
        let source = err.source().expect("source").downcast_ref::<kube::Error>().expect("a kube::Error");
        assert!(matches!(source, kube::Error::Api(s) if s.code == 403));
    }

    #[test]
    fn a_broken_rule_of_the_operator_is_not_blamed_on_the_spec() {
        let err = Error::Internal("the policy decision asked for the user's details twice".into());
        assert_eq!(err.reason(), "InternalError");
        assert!(err.to_string().starts_with("internal error: "), "{err}");
    }

    #[test]
    fn no_debug_dump_of_the_status() {
        for err in [
            Error::Kube { call: "writing the status", source: forbidden() },
            Error::from(kube::runtime::finalizer::Error::AddFinalizer(forbidden())),
        ] {
            let text = err.to_string();
            for dump in ["Status {", "StatusDetails", "Some(", "ApiError", "Failure", "retry_after_seconds"] {
                assert!(!text.contains(dump), "{dump:?} in {text}");
            }
        }
    }

    #[test]
    fn sparse_statuses_and_other_client_errors_stay_readable() {
        let bare = kube::Error::Api(Status::failure("", "").with_code(500).boxed());
        assert_eq!(kube_message(&bare), "the API server refused the request (500)");
        let no_code = kube::Error::Api(Status::failure("etcdserver: request timed out", "Timeout").boxed());
        assert_eq!(kube_message(&no_code), "etcdserver: request timed out (Timeout)");
        let serde = serde_json::from_str::<u8>("x").unwrap_err();
        let err = Error::Kube { call: "reading the Secret", source: kube::Error::SerdeError(serde) };
        assert_eq!(
            err.to_string(),
            "reading the Secret: Error deserializing response: expected value at line 1 column 1"
        );
    }

    #[test]
    fn finalizer_failures_name_the_step_and_keep_the_cause() {
        use kube::runtime::finalizer::Error as F;
        let err = Error::from(F::RemoveFinalizer(forbidden()));
        assert!(
            err.to_string().starts_with(r#"could not remove the finalizer: secrets "app-aws" is forbidden: "#),
            "{err}"
        );
        assert!(err.to_string().ends_with("(403 Forbidden)"), "{err}");
        assert_eq!(err.reason(), "FinalizerError");
        assert!(err.source().is_some_and(|s| s.is::<kube::Error>()));
        // The reconcile's own error passes through unchanged.
        let inner = Error::from(F::ApplyFailed(Error::Invalid("bad".into())));
        assert!(matches!(inner, Error::Invalid(m) if m == "bad"));
        assert_eq!(Error::from(F::<Error>::UnnamedObject).to_string(), "the object has no name");
    }
}
