//! HTTP endpoints: `/metrics` (Prometheus), `/healthz` (process alive), `/readyz` (caches synced).
//!
//! With `--metrics-auth=kubernetes`, `/metrics` answers only a request whose bearer token the API
//! server authenticates (a TokenReview) and whose user the API server allows `get` on the
//! non-resource URL `/metrics` (a SubjectAccessReview): the check controller-runtime's
//! `filters.WithAuthenticationAndAuthorization` makes in kubebuilder's scaffolds. The probes stay
//! open, since the kubelet calls them without a token.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use axum::{
    Router,
    extract::State,
    http::{
        HeaderMap, StatusCode,
        header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
    },
    response::{IntoResponse, Response},
    routing::get,
};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The non-resource URL (and verb) a scraper must be allowed: what a ClusterRole grants with
/// `nonResourceURLs: ["/metrics"]`, `verbs: ["get"]`.
pub const METRICS_PATH: &str = "/metrics";
const METRICS_VERB: &str = "get";

/// How long an allowed token is trusted without asking the API server again. A scrape every 15s
/// then costs two API calls a minute; a revoked grant still reads metrics for up to this long.
const ALLOWED_TTL: Duration = Duration::from_secs(60);
/// How long a refusal (unauthenticated or forbidden) is remembered: short, so that a grant made
/// after a refused scrape takes effect soon.
const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Most tokens remembered at once; beyond that the entry closest to expiry is dropped.
const CACHE_ENTRIES: usize = 256;
/// The longest a review may take before the scrape fails with 500.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may read `/metrics` (`--metrics-auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuth {
    /// Anyone who can reach the port.
    #[default]
    None,
    /// A bearer token that the Kubernetes API server authenticates (TokenReview) for a user it
    /// allows `get` on the non-resource URL `/metrics` (SubjectAccessReview).
    Kubernetes,
}

pub type ReviewError = Box<dyn std::error::Error + Send + Sync>;

/// The two questions `/metrics` asks the API server.
#[async_trait]
pub trait AccessReviewer: Send + Sync {
    /// TokenReview: the user the token authenticates as, or `None` when it does not.
    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, ReviewError>;
    /// SubjectAccessReview: may this user `get` the non-resource URL `path`?
    async fn authorize(&self, user: &UserInfo, path: &str) -> Result<bool, ReviewError>;
}

/// [`AccessReviewer`] that asks the API server with the operator's own client (which needs
/// `create` on `tokenreviews` and `subjectaccessreviews`).
pub struct KubeReviewer(pub kube::Client);

#[async_trait]
impl AccessReviewer for KubeReviewer {
    async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: token.to_string(), audiences: None },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.0.clone()).create(&PostParams::default(), &review).await?;
        Ok(reviewed.status.filter(|s| s.authenticated == Some(true)).and_then(|s| s.user))
    }

    async fn authorize(&self, user: &UserInfo, path: &str) -> Result<bool, ReviewError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                groups: user.groups.clone(),
                uid: user.uid.clone(),
                extra: user.extra.clone(),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(METRICS_VERB.to_string()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.0.clone()).create(&PostParams::default(), &review).await?;
        Ok(reviewed.status.is_some_and(|s| s.allowed && s.denied != Some(true)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Unauthenticated,
    Forbidden { user: String },
}

/// Checks the bearer token of each `/metrics` request, remembering recent verdicts per token
/// (by its SHA-256, so that no token stays in memory after its request).
pub struct MetricsGate {
    reviewer: Box<dyn AccessReviewer>,
    cache: Mutex<HashMap<[u8; 32], (Verdict, Instant)>>,
}

impl MetricsGate {
    pub fn new(reviewer: impl AccessReviewer + 'static) -> Self {
        MetricsGate { reviewer: Box::new(reviewer), cache: Mutex::new(HashMap::new()) }
    }

    /// `Ok` when the request may read metrics; otherwise the response to send (401, 403, 500).
    async fn check(&self, headers: &HeaderMap) -> Result<(), Response> {
        let Some(token) = bearer_token(headers) else {
            return Err(unauthorized());
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let verdict = match self.cached(&key) {
            Some(v) => v,
            None => {
                let v = tokio::time::timeout(REVIEW_TIMEOUT, self.review(token))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                    .map_err(|e| {
                        tracing::warn!(error = %e, "could not review a /metrics request with the API server");
                        (StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error: could not review the token\n")
                            .into_response()
                    })?;
                self.remember(key, v.clone());
                v
            }
        };
        match verdict {
            Verdict::Allowed => Ok(()),
            Verdict::Unauthenticated => Err(unauthorized()),
            Verdict::Forbidden { user } => {
                tracing::debug!(%user, "refused /metrics: not allowed");
                Err((
                    StatusCode::FORBIDDEN,
                    format!("Forbidden: user {user:?} may not {METRICS_VERB} {METRICS_PATH}\n"),
                )
                    .into_response())
            }
        }
    }

    async fn review(&self, token: &str) -> Result<Verdict, ReviewError> {
        let Some(user) = self.reviewer.authenticate(token).await? else {
            return Ok(Verdict::Unauthenticated);
        };
        Ok(if self.reviewer.authorize(&user, METRICS_PATH).await? {
            Verdict::Allowed
        } else {
            Verdict::Forbidden { user: user.username.unwrap_or_default() }
        })
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Verdict> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).filter(|(_, expires)| Instant::now() < *expires).map(|(v, _)| v.clone())
    }

    fn remember(&self, key: [u8; 32], verdict: Verdict) {
        let now = Instant::now();
        let ttl = if verdict == Verdict::Allowed { ALLOWED_TTL } else { REFUSED_TTL };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(&key) {
            cache.retain(|_, (_, expires)| now < *expires);
            if cache.len() >= CACHE_ENTRIES
                && let Some(first) = cache.iter().min_by_key(|(_, (_, expires))| *expires).map(|(k, _)| *k)
            {
                cache.remove(&first);
            }
        }
        cache.insert(key, (verdict, now + ttl));
    }
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 6750).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, "Bearer")],
        "Unauthorized: /metrics needs a bearer token that the Kubernetes API server authenticates\n",
    )
        .into_response()
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    gate: Option<Arc<MetricsGate>>,
}

/// Serves the endpoints; `gate` guards `/metrics` (`None`: open).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    gate: Option<MetricsGate>,
) -> std::io::Result<()> {
    let auth = if gate.is_some() { "TokenReview + SubjectAccessReview" } else { "none" };
    let app = Router::new()
        .route(METRICS_PATH, get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, ready, gate: gate.map(Arc::new) });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, metrics_auth = auth, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app).await
}

async fn render_metrics(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(gate) = &s.gate
        && let Err(refusal) = gate.check(&headers).await
    {
        return refusal;
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.render()).into_response()
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced yet")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use axum::http::HeaderValue;

    use super::*;

    /// Tokens `user-<name>` authenticate as `<name>`; `<name>` starting with `reader` may get
    /// `/metrics`; `broken` fails the review.
    #[derive(Default)]
    struct Fake {
        token_reviews: AtomicUsize,
        access_reviews: AtomicUsize,
    }

    #[async_trait]
    impl AccessReviewer for Arc<Fake> {
        async fn authenticate(&self, token: &str) -> Result<Option<UserInfo>, ReviewError> {
            self.token_reviews.fetch_add(1, Ordering::SeqCst);
            if token == "broken" {
                return Err("connection refused".into());
            }
            Ok(token.strip_prefix("user-").map(|name| UserInfo { username: Some(name.into()), ..UserInfo::default() }))
        }

        async fn authorize(&self, user: &UserInfo, path: &str) -> Result<bool, ReviewError> {
            self.access_reviews.fetch_add(1, Ordering::SeqCst);
            assert_eq!(path, "/metrics");
            Ok(user.username.as_deref().is_some_and(|u| u.starts_with("reader")))
        }
    }

    fn gate() -> (MetricsGate, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        (MetricsGate::new(fake.clone()), fake)
    }

    fn with_auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).expect("header"));
        h
    }

    async fn status(gate: &MetricsGate, headers: &HeaderMap) -> u16 {
        match gate.check(headers).await {
            Ok(()) => 200,
            Err(r) => r.status().as_u16(),
        }
    }

    #[tokio::test]
    async fn no_token_is_401_without_asking_the_api_server() {
        let (gate, fake) = gate();
        for headers in
            [HeaderMap::new(), with_auth("Bearer "), with_auth("Basic dXNlcjpwYXNz"), with_auth("user-reader")]
        {
            let refusal = gate.check(&headers).await.expect_err("refused");
            assert_eq!(refusal.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(refusal.headers()[WWW_AUTHENTICATE], "Bearer");
        }
        assert_eq!(fake.token_reviews.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn verdicts_follow_the_reviews() {
        let (gate, fake) = gate();
        assert_eq!(status(&gate, &with_auth("Bearer garbage")).await, 401, "not authenticated");
        assert_eq!(fake.access_reviews.load(Ordering::SeqCst), 0, "no access review without a user");
        assert_eq!(status(&gate, &with_auth("Bearer user-tenant")).await, 403);
        assert_eq!(status(&gate, &with_auth("Bearer user-reader")).await, 200);
        assert_eq!(status(&gate, &with_auth("bearer  user-reader2 ")).await, 200, "scheme is case-insensitive");
        assert_eq!(status(&gate, &with_auth("Bearer broken")).await, 500, "a failed review");
    }

    #[tokio::test(start_paused = true)]
    async fn verdicts_are_cached_briefly_and_errors_not_at_all() {
        let (gate, fake) = gate();
        let reader = with_auth("Bearer user-reader");
        let tenant = with_auth("Bearer user-tenant");
        let reviews = || (fake.token_reviews.load(Ordering::SeqCst), fake.access_reviews.load(Ordering::SeqCst));
        for _ in 0..4 {
            assert_eq!(status(&gate, &reader).await, 200);
            assert_eq!(status(&gate, &tenant).await, 403);
        }
        assert_eq!(reviews(), (2, 2), "one review of each token");
        tokio::time::advance(REFUSED_TTL + Duration::from_secs(1)).await;
        assert_eq!(status(&gate, &reader).await, 200);
        assert_eq!(status(&gate, &tenant).await, 403);
        assert_eq!(reviews(), (3, 3), "a refusal is reviewed again sooner than an allowed token");
        tokio::time::advance(ALLOWED_TTL).await;
        assert_eq!(status(&gate, &reader).await, 200);
        assert_eq!(reviews(), (4, 4));
        for _ in 0..2 {
            assert_eq!(status(&gate, &with_auth("Bearer broken")).await, 500);
        }
        assert_eq!(reviews().0, 6, "a failed review is not remembered");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let (gate, _) = gate();
        for i in 0..CACHE_ENTRIES + 50 {
            assert_eq!(status(&gate, &with_auth(&format!("Bearer user-reader{i}"))).await, 200);
        }
        let cache = gate.cache.lock().expect("lock");
        assert_eq!(cache.len(), CACHE_ENTRIES);
        assert!(!cache.values().any(|(v, _)| *v != Verdict::Allowed));
    }
}
