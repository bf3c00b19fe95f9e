//! The IAM and STS calls the operator makes, behind a trait, and their errors.
//!
//! `AwsIam` is the real implementation (aws-sdk-iam / aws-sdk-sts). The trait keeps the
//! controller independent of the SDK, so a test or a benchmark can wrap it (count, delay, fail).

pub mod accounts;
mod aws;
mod error;
pub mod propagation;
mod rate;

use std::{collections::BTreeMap, fmt};

use async_trait::async_trait;

pub use accounts::{Accounts, IamAccounts, RateSettings};
pub use aws::{AwsIam, sdk_config_from_env};
pub use error::IamError;
pub use propagation::Propagation;
pub use rate::RateLimiter;

use crate::crd::KeyStatus;
pub use crate::keys::{IamKey, KeyLastUsed};

/// An IAM user as the operator needs to know it.
#[derive(Clone, Debug, PartialEq)]
pub struct IamUser {
    pub arn: String,
    pub path: String,
    pub tags: BTreeMap<String, String>,
}

/// A key just created: the only moment its secret is known.
pub struct NewKey {
    pub key: IamKey,
    pub secret: SecretAccessKey,
}

/// The secret half of an access key. Deliberately no `Display`, and `Debug` is redacted, so it
/// cannot end up in a log line, an event or an error message by accident.
#[derive(Clone)]
pub struct SecretAccessKey(String);

impl SecretAccessKey {
    pub fn new(secret: String) -> Self {
        SecretAccessKey(secret)
    }

    /// The secret itself, for the Secret's data and for signing the verification request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretAccessKey(<redacted>)")
    }
}

/// Every IAM/STS call the operator makes. Each is one API request.
#[async_trait]
pub trait IamApi: Send + Sync {
    async fn get_user(&self, user: &str) -> Result<IamUser, IamError>;
    async fn list_access_keys(&self, user: &str) -> Result<Vec<IamKey>, IamError>;
    async fn create_access_key(&self, user: &str) -> Result<NewKey, IamError>;
    async fn update_access_key(&self, user: &str, key_id: &str, status: KeyStatus) -> Result<(), IamError>;
    async fn delete_access_key(&self, user: &str, key_id: &str) -> Result<(), IamError>;
    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError>;
    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError>;
    async fn access_key_last_used(&self, key_id: &str) -> Result<KeyLastUsed, IamError>;
    /// STS GetCallerIdentity signed with the given key: the ARN it authenticates as.
    async fn caller_identity(&self, key_id: &str, secret: &SecretAccessKey) -> Result<String, IamError>;
}
