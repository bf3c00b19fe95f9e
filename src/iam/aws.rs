//! `IamApi` over the AWS SDK. Endpoints come from the usual AWS configuration, so
//! `AWS_ENDPOINT_URL_IAM` / `AWS_ENDPOINT_URL_STS` point it at moto, LocalStack or a partition.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use aws_credential_types::Credentials;
use aws_sdk_iam::{error::ProvideErrorMetadata, types::StatusType};
use aws_smithy_runtime_api::client::{orchestrator::HttpResponse, result::SdkError};
use jiff::Timestamp;

use super::{
    IamApi, IamError, IamKey, IamUser, KeyLastUsed, NewKey, RateLimiter, SecretAccessKey, accounts::RoleSession,
    rate::Permit,
};
use crate::{
    crd::{AccountRole, KeyStatus},
    metrics::Metrics,
};

pub struct AwsIam {
    iam: IamClient,
    sts_config: aws_sdk_sts::config::Config,
    metrics: Arc<Metrics>,
    limiter: Arc<RateLimiter>,
    /// The account its metrics name: `None` for the operator's own identity.
    account: Option<String>,
}

/// Whose credentials sign the IAM calls.
enum IamClient {
    Own(aws_sdk_iam::Client),
    /// A role's, assumed (and refreshed) on demand.
    Role(Arc<RoleSession>),
}

impl AwsIam {
    pub fn new(sdk_config: &aws_config::SdkConfig, metrics: Arc<Metrics>, limiter: RateLimiter) -> Self {
        // No SDK retries: each call is exactly one request through the rate limiter, so
        // the limiter's rate bounds what IAM sees (and learns from every answer), and a CreateAccessKey whose response was lost is
        // never sent twice (a second, unrecorded key). The reconcile retries instead, with
        // per-resource backoff and under its pending-create marker.
        AwsIam {
            iam: IamClient::Own(aws_sdk_iam::Client::from_conf(iam_config(sdk_config).build())),
            sts_config: aws_sdk_sts::config::Builder::from(sdk_config)
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .build(),
            metrics,
            limiter: Arc::new(limiter),
            account: None,
        }
        .with_rate_gauge()
    }

    /// The same endpoints, signed with a role's credentials, paced by that account's limiter.
    pub(super) fn in_account(&self, session: Arc<RoleSession>, limiter: Arc<RateLimiter>) -> Self {
        AwsIam {
            account: Some(session.role().account_id().to_owned()),
            iam: IamClient::Role(session),
            sts_config: self.sts_config.clone(),
            metrics: self.metrics.clone(),
            limiter,
        }
        .with_rate_gauge()
    }

    fn with_rate_gauge(self) -> Self {
        self.metrics.set_iam_rate_limit(self.account.as_deref(), self.limiter.rate());
        self
    }

    async fn iam(&self) -> Result<aws_sdk_iam::Client, IamError> {
        match &self.iam {
            IamClient::Own(client) => Ok(client.clone()),
            IamClient::Role(session) => session.client().await,
        }
    }

    /// STS AssumeRole with the operator's own identity, through its own limiter: credentials
    /// for `role`, and when they expire. Their secret parts never leave the SDK's credentials
    /// (whose `Debug` is redacted).
    pub(super) async fn assume_role(
        &self,
        role: &AccountRole,
        session_name: &str,
        tags: &[(String, String)],
    ) -> Result<(Credentials, SystemTime), IamError> {
        let op = "AssumeRole";
        let permit = self.limiter.acquire().await;
        let sts = aws_sdk_sts::Client::from_conf(self.sts_config.clone());
        let tags: Result<Vec<_>, _> =
            tags.iter().map(|(k, v)| aws_sdk_sts::types::Tag::builder().key(k).value(v).build()).collect();
        let tags = tags.map_err(|e| IamError::Invalid { operation: op, message: e.to_string() })?;
        let result = sts
            .assume_role()
            .role_arn(&role.role_arn)
            .role_session_name(session_name)
            .set_external_id(role.external_id.clone())
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| sdk_error(op, e));
        let result = result.and_then(|out| {
            let c = out
                .credentials
                .ok_or_else(|| IamError::Unavailable { operation: op, message: "no credentials in response".into() })?;
            let expires = SystemTime::try_from(c.expiration).unwrap_or_else(|_| SystemTime::now());
            let creds = Credentials::new(
                c.access_key_id,
                c.secret_access_key,
                Some(c.session_token),
                Some(expires),
                "iam-key-operator-assume-role",
            );
            Ok((creds, expires))
        });
        self.record(op, permit, result)
            .map_err(|cause| IamError::AssumeRoleFailed { role_arn: role.role_arn.clone(), cause: Box::new(cause) })
    }

    /// Count the call's outcome and tell the rate limiter what IAM answered (a `Throttling`
    /// answer lowers an adaptive rate).
    fn record<T>(&self, operation: &'static str, permit: Permit, result: Result<T, IamError>) -> Result<T, IamError> {
        let error = result.as_ref().err();
        self.limiter.observe(permit, error.is_some_and(IamError::is_throttling));
        self.metrics.iam_call(operation, error.map_or("ok", IamError::outcome), self.account.as_deref());
        self.metrics.set_iam_rate_limit(self.account.as_deref(), self.limiter.rate());
        // Refused credentials may have been revoked or expired early: assume the role again next time.
        if let (IamClient::Role(session), Some(IamError::AccessDenied { .. })) = (&self.iam, error) {
            session.forget();
        }
        result
    }
}

/// No SDK retries (see [`AwsIam::new`]).
pub(super) fn iam_config(sdk_config: &aws_config::SdkConfig) -> aws_sdk_iam::config::Builder {
    aws_sdk_iam::config::Builder::from(sdk_config).retry_config(aws_config::retry::RetryConfig::disabled())
}

/// The standard AWS configuration (env, profile, IRSA / Pod Identity); IAM is global, so the
/// region only matters for STS and defaults to us-east-1.
pub async fn sdk_config_from_env() -> aws_config::SdkConfig {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    if config.region().is_some() {
        return config;
    }
    config.into_builder().region(aws_config::Region::new("us-east-1")).build()
}

fn sdk_error<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> IamError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    // IAM-compatible endpoints (moto, LocalStack) sometimes wrap errors in a shape the SDK does
    // not parse (`<Errors><Error>`); read code and message from the body then.
    let body = err.raw_response().and_then(|r| r.body().bytes()).map(String::from_utf8_lossy);
    let from_body = |tag: &str| body.as_deref().and_then(|b| xml_text(b, tag));
    let code = err.code().map(str::to_owned).or_else(|| from_body("Code"));
    let message = match err.message().map(str::to_owned).or_else(|| from_body("Message")) {
        Some(m) => m,
        // Transport failures carry no AWS message; the source chain says what happened.
        None => error_chain(&err),
    };
    IamError::from_code(operation, code.as_deref(), status, message)
}

/// The text of the first `<tag>` element.
fn xml_text(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..end].to_owned())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn timestamp(dt: &aws_smithy_types::DateTime) -> Timestamp {
    Timestamp::new(dt.secs(), dt.subsec_nanos() as i32).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn key_status(s: Option<&StatusType>) -> KeyStatus {
    match s {
        Some(StatusType::Active) => KeyStatus::Active,
        _ => KeyStatus::Inactive,
    }
}

fn status_type(s: KeyStatus) -> StatusType {
    match s {
        KeyStatus::Active => StatusType::Active,
        KeyStatus::Inactive => StatusType::Inactive,
    }
}

#[async_trait]
impl IamApi for AwsIam {
    async fn get_user(&self, user: &str) -> Result<IamUser, IamError> {
        let op = "GetUser";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam.get_user().user_name(user).send().await.map_err(|e| sdk_error(op, e));
        let result = result.and_then(|out| {
            let u = out
                .user
                .ok_or_else(|| IamError::Unavailable { operation: op, message: "no user in response".into() })?;
            let tags: BTreeMap<String, String> =
                u.tags().iter().map(|t| (t.key().to_owned(), t.value().to_owned())).collect();
            Ok(IamUser { arn: u.arn().to_owned(), path: u.path().to_owned(), tags })
        });
        self.record(op, permit, result)
    }

    async fn list_access_keys(&self, user: &str) -> Result<Vec<IamKey>, IamError> {
        let op = "ListAccessKeys";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        // A user has at most two keys: one page always holds them all.
        let result = iam.list_access_keys().user_name(user).send().await.map_err(|e| sdk_error(op, e));
        let result = result.map(|out| {
            out.access_key_metadata()
                .iter()
                .filter_map(|k| {
                    Some(IamKey {
                        access_key_id: k.access_key_id()?.to_owned(),
                        status: key_status(k.status()),
                        create_date: k.create_date().map(timestamp).unwrap_or(Timestamp::UNIX_EPOCH),
                    })
                })
                .collect()
        });
        self.record(op, permit, result)
    }

    async fn create_access_key(&self, user: &str) -> Result<NewKey, IamError> {
        let op = "CreateAccessKey";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam.create_access_key().user_name(user).send().await.map_err(|e| sdk_error(op, e));
        let result = result.and_then(|out| {
            let k = out
                .access_key
                .ok_or_else(|| IamError::Unavailable { operation: op, message: "no key in response".into() })?;
            Ok(NewKey {
                key: IamKey {
                    access_key_id: k.access_key_id().to_owned(),
                    status: key_status(Some(k.status())),
                    create_date: k.create_date().map(timestamp).unwrap_or_else(Timestamp::now),
                },
                secret: SecretAccessKey::new(k.secret_access_key().to_owned()),
            })
        });
        self.record(op, permit, result)
    }

    async fn update_access_key(&self, user: &str, key_id: &str, status: KeyStatus) -> Result<(), IamError> {
        let op = "UpdateAccessKey";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam
            .update_access_key()
            .user_name(user)
            .access_key_id(key_id)
            .status(status_type(status))
            .send()
            .await
            .map(drop)
            .map_err(|e| sdk_error(op, e));
        self.record(op, permit, result)
    }

    async fn delete_access_key(&self, user: &str, key_id: &str) -> Result<(), IamError> {
        let op = "DeleteAccessKey";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam
            .delete_access_key()
            .user_name(user)
            .access_key_id(key_id)
            .send()
            .await
            .map(drop)
            .map_err(|e| sdk_error(op, e));
        self.record(op, permit, result)
    }

    async fn tag_user(&self, user: &str, tags: &[(String, String)]) -> Result<(), IamError> {
        let op = "TagUser";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let tags: Result<Vec<_>, _> =
            tags.iter().map(|(k, v)| aws_sdk_iam::types::Tag::builder().key(k).value(v).build()).collect();
        // A tag without key or value is a bug of ours, not an IAM call.
        let tags = tags.map_err(|e| IamError::Invalid { operation: op, message: e.to_string() })?;
        let result = iam.tag_user().user_name(user).set_tags(Some(tags)).send().await;
        self.record(op, permit, result.map(drop).map_err(|e| sdk_error(op, e)))
    }

    async fn untag_user(&self, user: &str, keys: &[String]) -> Result<(), IamError> {
        let op = "UntagUser";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam
            .untag_user()
            .user_name(user)
            .set_tag_keys(Some(keys.to_vec()))
            .send()
            .await
            .map(drop)
            .map_err(|e| sdk_error(op, e));
        self.record(op, permit, result)
    }

    async fn access_key_last_used(&self, key_id: &str) -> Result<KeyLastUsed, IamError> {
        let op = "GetAccessKeyLastUsed";
        let iam = self.iam().await?;
        let permit = self.limiter.acquire().await;
        let result = iam.get_access_key_last_used().access_key_id(key_id).send().await.map_err(|e| sdk_error(op, e));
        let result = result.map(|out| match out.access_key_last_used {
            None => KeyLastUsed::default(),
            Some(u) => {
                // IAM reports "N/A" for service and region of a key never used.
                let known = |s: &str| (!s.is_empty() && s != "N/A").then(|| s.to_owned());
                KeyLastUsed {
                    date: u.last_used_date().map(timestamp),
                    service_name: known(u.service_name()),
                    region: known(u.region()),
                }
            }
        });
        self.record(op, permit, result)
    }

    async fn caller_identity(&self, key_id: &str, secret: &SecretAccessKey) -> Result<String, IamError> {
        let op = "GetCallerIdentity";
        let permit = self.limiter.acquire().await;
        let creds = Credentials::new(key_id, secret.expose(), None, None, "iam-key-operator-verify");
        let config = self.sts_config.to_builder().credentials_provider(creds).build();
        let sts = aws_sdk_sts::Client::from_conf(config);
        let result = sts.get_caller_identity().send().await.map_err(|e| sdk_error(op, e));
        let result = result.and_then(|out| {
            out.arn.ok_or_else(|| IamError::Unavailable { operation: op, message: "no ARN in response".into() })
        });
        self.record(op, permit, result)
    }
}
