//! IAM failures, classified by what the controller should do about them.

/// An IAM or STS call that failed. Messages come from AWS and never contain secret material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IamError {
    /// The user or key does not exist (IAM `NoSuchEntity`).
    #[error("{operation}: not found: {message}")]
    NotFound { operation: &'static str, message: String },
    /// IAM refuses a third key (`LimitExceeded`).
    #[error("{operation}: limit exceeded: {message}")]
    LimitExceeded { operation: &'static str, message: String },
    /// The operator's identity may not do this (`AccessDenied`, bad credentials).
    #[error("{operation}: not authorized: {message}")]
    AccessDenied { operation: &'static str, message: String },
    /// IAM asks us to slow down (`Throttling`).
    #[error("{operation}: throttled: {message}")]
    Throttled { operation: &'static str, message: String },
    /// IAM could not be reached or failed on its side (timeouts, 5xx).
    #[error("{operation}: IAM unavailable: {message}")]
    Unavailable { operation: &'static str, message: String },
    /// IAM refused a write because the entity is changing right now: another request to change
    /// it is in flight (`ConcurrentModification`), or it cannot be changed for a while
    /// (`EntityTemporarilyUnmodifiable`, e.g. a user deleted and created again). IAM says to
    /// wait and send the request again; nobody has to change anything.
    #[error("{operation}: IAM entity busy: {message}")]
    Busy { operation: &'static str, message: String },
    /// IAM refused the request's content (`ValidationError`, `InvalidInput`, ...).
    #[error("{operation}: refused by IAM: {message}")]
    Invalid { operation: &'static str, message: String },
    /// STS AssumeRole into a rule's role failed: `cause` is how (refused, throttled, ...), its
    /// message STS's own (it names the role and the operator's identity, never credentials).
    #[error("cannot assume role {role_arn}: {cause}")]
    AssumeRoleFailed { role_arn: String, cause: Box<IamError> },
}

impl IamError {
    /// The `Ready` condition's reason for a reconcile this error ended.
    pub fn reason(&self) -> &'static str {
        match self {
            IamError::NotFound { .. } => "IamNotFound",
            IamError::LimitExceeded { .. } => "KeyLimitExceeded",
            IamError::AccessDenied { .. } => "NotAuthorized",
            IamError::Throttled { .. } => "Throttled",
            IamError::Unavailable { .. } => "IamUnavailable",
            IamError::Busy { .. } => "IamBusy",
            IamError::Invalid { .. } => "IamRejected",
            IamError::AssumeRoleFailed { .. } => "AssumeRoleFailed",
        }
    }

    /// The `outcome` label of `iam_key_operator_iam_calls_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            IamError::NotFound { .. } => "not_found",
            IamError::LimitExceeded { .. } => "limit_exceeded",
            IamError::AccessDenied { .. } => "access_denied",
            IamError::Throttled { .. } => "throttled",
            IamError::Unavailable { .. } => "unavailable",
            IamError::Busy { .. } => "busy",
            IamError::Invalid { .. } => "invalid",
            IamError::AssumeRoleFailed { cause, .. } => cause.outcome(),
        }
    }

    /// Whether trying the same call again later can succeed without anyone changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            // Refused: nearly always a trust or permission policy to fix. STS throttled or
            // down: transient, like any other call.
            IamError::AssumeRoleFailed { cause, .. } => cause.is_retryable(),
            _ => matches!(self, IamError::Throttled { .. } | IamError::Unavailable { .. } | IamError::Busy { .. }),
        }
    }

    /// Whether IAM asked the caller to slow down: what the adaptive rate limiter learns from.
    pub fn is_throttling(&self) -> bool {
        matches!(self, IamError::Throttled { .. })
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, IamError::NotFound { .. })
    }

    /// Classify by the AWS error code (and HTTP status when there is no code).
    pub fn from_code(operation: &'static str, code: Option<&str>, http_status: Option<u16>, message: String) -> Self {
        match code {
            Some("NoSuchEntity") => IamError::NotFound { operation, message },
            Some("LimitExceeded") => IamError::LimitExceeded { operation, message },
            Some(
                "AccessDenied"
                | "AccessDeniedException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "UnrecognizedClientException"
                | "ExpiredToken",
            ) => IamError::AccessDenied { operation, message },
            Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded" | "TooManyRequestsException") => {
                IamError::Throttled { operation, message }
            }
            // Both come with HTTP 409; the SDK names them with an `Exception` suffix sometimes.
            Some(
                "ConcurrentModification"
                | "ConcurrentModificationException"
                | "EntityTemporarilyUnmodifiable"
                | "EntityTemporarilyUnmodifiableException",
            ) => IamError::Busy { operation, message },
            Some("ServiceFailure" | "ServiceUnavailable" | "InternalFailure" | "InternalError") => {
                IamError::Unavailable { operation, message }
            }
            _ if http_status.is_some_and(|s| s >= 500) => IamError::Unavailable { operation, message },
            _ if http_status == Some(429) => IamError::Throttled { operation, message },
            // A refusal whose body could not be read is still a refusal.
            None if http_status == Some(403) => IamError::AccessDenied { operation, message },
            Some(_) => IamError::Invalid { operation, message },
            None => IamError::Unavailable { operation, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_aws_codes_by_what_retrying_can_do() {
        let e = |code, status| IamError::from_code("Op", code, status, "m".into());
        assert!(e(Some("NoSuchEntity"), Some(404)).is_not_found());
        assert!(e(Some("Throttling"), Some(400)).is_retryable());
        assert!(e(None, Some(503)).is_retryable());
        assert!(e(Some("SomethingNew"), Some(500)).is_retryable());
        assert!(!e(Some("AccessDenied"), Some(403)).is_retryable());
        assert!(!e(Some("LimitExceeded"), Some(409)).is_retryable());
        assert!(matches!(e(Some("ValidationError"), Some(400)), IamError::Invalid { .. }));
        assert!(matches!(e(None, None), IamError::Unavailable { .. }));
        assert!(matches!(e(None, Some(403)), IamError::AccessDenied { .. }), "unreadable refusal");
        let assume =
            |cause| IamError::AssumeRoleFailed { role_arn: "arn:aws:iam::2:role/r".into(), cause: Box::new(cause) };
        assert!(!assume(e(Some("AccessDenied"), Some(403))).is_retryable(), "a role refused waits for a fix");
        assert!(assume(e(Some("Throttling"), Some(400))).is_retryable(), "STS throttled is transient");
    }

    #[test]
    fn concurrent_modification_and_temporarily_unmodifiable_are_transient() {
        // Real IAM answers both with HTTP 409 and asks to try again later; they used to fall
        // into `Invalid` (reason IamRejected: a person must act), which they are not.
        let e = |code: &str| IamError::from_code("TagUser", Some(code), Some(409), "m".into());
        for code in [
            "ConcurrentModification",
            "ConcurrentModificationException",
            "EntityTemporarilyUnmodifiable",
            "EntityTemporarilyUnmodifiableException",
        ] {
            let err = e(code);
            assert!(matches!(err, IamError::Busy { operation: "TagUser", .. }), "{code}: {err:?}");
            assert!(err.is_retryable(), "{code} is retried");
            assert!(!err.is_throttling(), "{code} does not slow the rate down");
        }
        assert_eq!(e("ConcurrentModification").to_string(), "TagUser: IAM entity busy: m");
        // Other 409s stay what they were.
        assert!(matches!(e("LimitExceeded"), IamError::LimitExceeded { .. }));
        assert!(matches!(e("EntityAlreadyExists"), IamError::Invalid { .. }));
        assert!(e("Throttling").is_throttling());
    }
}
