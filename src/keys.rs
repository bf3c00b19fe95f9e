//! Plain data about IAM access keys, as IAM reports it: shared by the IAM adapter (`iam`), which
//! reads it, and the planner (`plan`), which reasons about it without any I/O.

use jiff::Timestamp;

use crate::crd::KeyStatus;

/// An access key as ListAccessKeys reports it (no secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IamKey {
    pub access_key_id: String,
    pub status: KeyStatus,
    pub create_date: Timestamp,
}

/// Last use of a key, from GetAccessKeyLastUsed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyLastUsed {
    pub date: Option<Timestamp>,
    pub service_name: Option<String>,
    pub region: Option<String>,
}
