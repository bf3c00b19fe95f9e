//! Several AWS accounts: a policy rule may name a role in the account its users live in, which
//! the operator assumes (with its own identity) to manage their keys.
//!
//! Credentials are cached per role and namespace (one AssumeRole per namespace and hour, not per
//! resource) and refreshed before they expire; IAM's quota is per account, so each account has
//! its own rate limiter.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{AwsIam, IamApi, IamError, RateLimiter, aws::iam_config};
use crate::crd::AccountRole;

/// Credentials are replaced this long before they expire: a call signed just before expiry
/// must not arrive after it.
const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// STS's longest role session name.
const SESSION_NAME_MAX: usize = 64;
/// Session tags: CloudTrail in the target account shows the cluster and namespace that acted.
pub const CLUSTER_SESSION_TAG: &str = "iam-key-operator/cluster";
pub const NAMESPACE_SESSION_TAG: &str = "iam-key-operator/namespace";

/// The IAM of each account, by the role a rule names.
pub trait IamAccounts: Send + Sync {
    /// The IAM API signed by `role` (`None`: the operator's own identity) for a namespace's
    /// resources. Nothing is called until the first request: a role that cannot be assumed
    /// fails that request with [`IamError::AssumeRoleFailed`].
    fn iam(&self, role: Option<&AccountRole>, namespace: &str) -> Arc<dyn IamApi>;
}

/// The operator's rate settings (flags), applied to each account.
#[derive(Clone, Copy, Debug)]
pub enum RateSettings {
    /// `--iam-rate`: a fixed rate (0: unlimited).
    Fixed { rate: f64, burst: u32 },
    /// `--iam-rate-min`, `--iam-rate-max`.
    Adaptive { min: f64, max: f64, burst: u32 },
}

impl RateSettings {
    /// A limiter for one account; `ceiling` (a rule's `iamRateMax`) replaces the flags' ceiling
    /// (or fixed rate) there: the platform team knows what else uses that account's quota.
    pub fn limiter(self, ceiling: Option<u32>) -> RateLimiter {
        let ceiling = ceiling.map(f64::from);
        match self {
            RateSettings::Fixed { rate, burst } => RateLimiter::new(ceiling.unwrap_or(rate), burst),
            RateSettings::Adaptive { min, max, burst } => {
                let max = ceiling.unwrap_or(max);
                RateLimiter::adaptive(min.min(max), max, burst)
            }
        }
    }
}

/// Role ARN, external ID, namespace.
type SessionKey = (String, Option<String>, String);
/// The ceiling a limiter was made with, and the limiter.
type AccountLimiter = (Option<u32>, Arc<RateLimiter>);

pub struct Accounts {
    own: Arc<AwsIam>,
    sdk_config: aws_config::SdkConfig,
    rate: RateSettings,
    cluster: String,
    /// Per account id.
    limiters: Mutex<HashMap<String, AccountLimiter>>,
    sessions: Mutex<HashMap<SessionKey, Arc<RoleSession>>>,
}

impl Accounts {
    pub fn new(own: AwsIam, sdk_config: aws_config::SdkConfig, rate: RateSettings, cluster: &str) -> Self {
        Accounts {
            own: Arc::new(own),
            sdk_config,
            rate,
            cluster: cluster.to_owned(),
            limiters: Mutex::default(),
            sessions: Mutex::default(),
        }
    }

    fn limiter(&self, account: &str, ceiling: Option<u32>) -> Arc<RateLimiter> {
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        match limiters.get(account) {
            // No ceiling asked for (a role as status recorded it): whatever the rules set.
            Some((made_with, limiter)) if ceiling.is_none() || *made_with == ceiling => limiter.clone(),
            // A new account, or a rule changed its ceiling: a fresh limiter (it learns again).
            _ => {
                let limiter = Arc::new(self.rate.limiter(ceiling));
                limiters.insert(account.to_owned(), (ceiling, limiter.clone()));
                limiter
            }
        }
    }

    fn session(&self, role: &AccountRole, namespace: &str) -> Arc<RoleSession> {
        let key = (role.role_arn.clone(), role.external_id.clone(), namespace.to_owned());
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .entry(key)
            .or_insert_with(|| {
                Arc::new(RoleSession {
                    role: AccountRole { iam_rate_max: None, ..role.clone() },
                    name: session_name(&self.cluster, namespace),
                    tags: vec![
                        (CLUSTER_SESSION_TAG.to_owned(), self.cluster.clone()),
                        (NAMESPACE_SESSION_TAG.to_owned(), namespace.to_owned()),
                    ],
                    own: self.own.clone(),
                    iam_config: iam_config(&self.sdk_config),
                    cached: tokio::sync::Mutex::default(),
                })
            })
            .clone()
    }
}

impl IamAccounts for Accounts {
    fn iam(&self, role: Option<&AccountRole>, namespace: &str) -> Arc<dyn IamApi> {
        match role {
            None => self.own.clone(),
            Some(role) => {
                let limiter = self.limiter(role.account_id(), role.iam_rate_max);
                Arc::new(self.own.in_account(self.session(role, namespace), limiter))
            }
        }
    }
}

/// `iko-<cluster>-<namespace>`, cut to STS's 64 characters (cluster and namespace names hold
/// only characters STS allows in a session name).
pub fn session_name(cluster: &str, namespace: &str) -> String {
    let mut name: String = format!("iko-{cluster}-{namespace}")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(*c))
        .collect();
    name.truncate(SESSION_NAME_MAX);
    name
}

/// Whether credentials that expire at `expires` may still sign a call made at `now`.
fn still_fresh(expires: SystemTime, now: SystemTime) -> bool {
    now + REFRESH_BEFORE < expires
}

/// One role's credentials for one namespace.
pub struct RoleSession {
    role: AccountRole,
    name: String,
    tags: Vec<(String, String)>,
    own: Arc<AwsIam>,
    iam_config: aws_sdk_iam::config::Builder,
    /// The client signed with the current credentials, and when they expire. Held across the
    /// AssumeRole, so that the reconciles of a namespace wait for one call instead of each
    /// making its own.
    cached: tokio::sync::Mutex<Option<(aws_sdk_iam::Client, SystemTime)>>,
}

impl RoleSession {
    pub fn role(&self) -> &AccountRole {
        &self.role
    }

    pub(super) async fn client(&self) -> Result<aws_sdk_iam::Client, IamError> {
        let mut cached = self.cached.lock().await;
        if let Some((client, expires)) = cached.as_ref()
            && still_fresh(*expires, SystemTime::now())
        {
            return Ok(client.clone());
        }
        let (credentials, expires) = self.own.assume_role(&self.role, &self.name, &self.tags).await?;
        tracing::debug!(role = %self.role.role_arn, session = %self.name, "assumed role");
        let client = aws_sdk_iam::Client::from_conf(self.iam_config.clone().credentials_provider(credentials).build());
        *cached = Some((client.clone(), expires));
        Ok(client)
    }

    /// Drop the credentials (refused: revoked or expired early).
    pub(super) fn forget(&self) {
        if let Ok(mut cached) = self.cached.try_lock() {
            *cached = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_bounded_and_use_stss_characters() {
        assert_eq!(session_name("prod", "team-a"), "iko-prod-team-a");
        let long = session_name("a-cluster.name_that-is-long", &"n".repeat(63));
        assert_eq!(long.len(), 64);
        assert!(long.starts_with("iko-a-cluster.name_that-is-long-nnn"));
    }

    #[test]
    fn credentials_are_replaced_five_minutes_before_they_expire() {
        let now = SystemTime::now();
        let minutes = |m: u64| Duration::from_secs(m * 60);
        assert!(still_fresh(now + minutes(60), now), "a new session");
        assert!(still_fresh(now + minutes(6), now));
        assert!(!still_fresh(now + minutes(4), now), "about to expire: assumed again");
        assert!(!still_fresh(now - minutes(1), now), "expired");
    }

    #[test]
    fn a_rule_ceiling_replaces_the_flags_rate() {
        let adaptive = RateSettings::Adaptive { min: 1.0, max: 50.0, burst: 20 };
        assert_eq!(adaptive.limiter(None).rate(), 25.0, "half the flags' ceiling to start");
        assert_eq!(adaptive.limiter(Some(10)).rate(), 5.0, "half the rule's ceiling");
        assert_eq!(adaptive.limiter(Some(100)).rate(), 50.0);
        let fixed = RateSettings::Fixed { rate: 20.0, burst: 20 };
        assert_eq!(fixed.limiter(Some(5)).rate(), 5.0);
        assert_eq!(fixed.limiter(None).rate(), 20.0);
        let unlimited = RateSettings::Fixed { rate: 0.0, burst: 20 };
        assert_eq!(unlimited.limiter(None).rate(), 0.0);
        assert_eq!(unlimited.limiter(Some(5)).rate(), 5.0);
    }
}
