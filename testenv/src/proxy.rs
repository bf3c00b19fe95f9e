//! A fault-injecting HTTP/1.1 proxy between the operator and moto, for the fault tests and the
//! benchmarks.
//!
//! The operator reaches IAM and STS through `AWS_ENDPOINT_URL_IAM` / `AWS_ENDPOINT_URL_STS`;
//! point both at [`FaultProxy::url`] (see [`FaultProxy::operator_env`]). Every request is an
//! AWS query-protocol call (a POST whose form body holds `Action=...`); the proxy records each
//! one (when, which action, which user, what it did with it) and, depending on the [`Faults`]
//! set at that moment, forwards it to moto or answers it itself:
//!
//! - `throttle`: IAM's `Throttling` error (HTTP 400, `Sender`), without reaching moto;
//! - `server_error`: HTTP 500 `InternalFailure` or 503 `ServiceUnavailable`, without reaching moto;
//! - `drop_response`: forwarded (moto acts on it), then the connection is closed without an
//!   answer — the nastiest network fault, since the caller cannot know whether the call happened;
//! - `delay`: added before forwarding;
//! - `refuse`: an outage — the listening socket is closed (connections are refused) and open
//!   connections are closed; when it ends the same port listens again;
//! - `reject_user`: calls naming that user get the `ValidationError` IAM gives for a user name it
//!   refuses (moto accepts any name, so this stands in for IAM's own validation);
//! - `lose_first_response_of`: the first call of that action for each user reaches IAM and its
//!   response is lost (a deterministic `drop_response`);
//! - `alternate_errors`: every call naming a user fails, alternately `Throttling` and 503;
//! - `corrupt_new_secrets`: `CreateAccessKey` reaches IAM, and the secret in its answer has its
//!   last character changed (a key whose secret is wrong must never be published);
//! - `latency`: every call takes a random time in a range (real IAM answers in tens to hundreds
//!   of milliseconds, moto in about one);
//! - `account_rps`: IAM's account-wide request quota, a token bucket shared by every caller of
//!   the proxy: calls above it get `Throttling`;
//! - `new_key_refused_for`: a key `CreateAccessKey` made is refused (`InvalidClientTokenId`, as
//!   STS answers) for a random time after its creation, as IAM's eventual consistency does;
//! - `concurrent_writes_conflict`: a write naming a user while another write naming that user is
//!   in flight gets `ConcurrentModification` (409), as IAM answers;
//! - `busy`: a fraction of writes gets `ConcurrentModification` or `EntityTemporarilyUnmodifiable`
//!   (409), alternately.
//!
//! [`Faults::aws_like`] combines the last five into a profile of real IAM.
//!
//! Always, as real IAM does and moto does not: a call signed with an Inactive access key is
//! refused with `InvalidClientTokenId` (403). The key's status is looked up in the shared moto
//! with the admin identity, for every key but the operator's own and the admin's.
//!
//! The server side is a small hand-written HTTP/1.1 reader (keep-alive, `Content-Length` or
//! chunked bodies); the upstream side is reqwest. Nothing here is tied to moto beyond its URL.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the proxy does to the calls it receives. The default forwards everything untouched.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Fraction (0..=1) of calls answered with `Throttling` (HTTP 400).
    pub throttle: f64,
    /// Fraction of calls answered with HTTP 500 `InternalFailure` or 503 `ServiceUnavailable`
    /// (alternately).
    pub server_error: f64,
    /// Fraction of calls forwarded to moto whose response is then lost (connection closed).
    pub drop_response: f64,
    /// Added before forwarding each call.
    pub delay: Duration,
    /// Refuse connections: the port is closed while this holds.
    pub refuse: bool,
    /// Calls whose `UserName` is this get IAM's `ValidationError`.
    pub reject_user: Option<String>,
    /// If not empty: `throttle`, `server_error`, `drop_response` and `delay` apply only to
    /// these actions.
    pub only: Vec<String>,
    /// Actions spared by `throttle`, `server_error`, `drop_response` and `delay`.
    pub except: Vec<String>,
    /// The first call of this action for each user reaches IAM, and its response is lost.
    pub lose_first_response_of: Option<String>,
    /// Every call naming a user fails, alternately with `Throttling` and 503 (per user), so that
    /// each failed operation (three SDK attempts) ends with another error than the one before.
    pub alternate_errors: bool,
    /// `CreateAccessKey` answers carry a wrong secret (last character changed).
    pub corrupt_new_secrets: bool,
    /// Every call (answered by the proxy or forwarded) takes a time drawn uniformly from this
    /// range before it is answered.
    pub latency: Option<(Duration, Duration)>,
    /// The account's request quota (calls per second): a token bucket holding one second of it,
    /// shared by everything that calls through the proxy (IAM and STS alike); a call that finds
    /// it empty gets `Throttling` and takes no token.
    pub account_rps: Option<f64>,
    /// A key `CreateAccessKey` returned is refused (`InvalidClientTokenId`, 403, in STS's error
    /// shape) for a time drawn uniformly from this range after its creation.
    pub new_key_refused_for: Option<(Duration, Duration)>,
    /// A write naming a user while another write naming that user is in flight gets
    /// `ConcurrentModification` (409) without reaching moto.
    pub concurrent_writes_conflict: bool,
    /// Fraction of writes ([`WRITE_ACTIONS`]) answered with `ConcurrentModification` or
    /// `EntityTemporarilyUnmodifiable` (409, alternately) without reaching moto.
    pub busy: f64,
}

/// The calls that change IAM: what `busy` and `concurrent_writes_conflict` apply to.
pub const WRITE_ACTIONS: &[&str] = &["CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "TagUser", "UntagUser"];

/// Latency of each call in [`Faults::aws_like`]: real IAM answers control-plane calls in tens to
/// a few hundreds of milliseconds (measured from inside AWS regions; moto answers in ~1 ms).
pub const AWS_LATENCY: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(150));
/// How long a new key is refused in [`Faults::aws_like`]. AWS documents no figure: IAM is
/// eventually consistent and "changes ... may take time to propagate"; seconds is what keys are
/// commonly seen to take. Chosen so that verification waits and retries (the operator polls at
/// 0.25, 0.75, 1.75, 3.75, 7.75, 12.75 s), within its default 60 s verify timeout.
pub const AWS_NEW_KEY_REFUSED_FOR: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(12));
/// Fraction of writes refused with `ConcurrentModification` / `EntityTemporarilyUnmodifiable` in
/// [`Faults::aws_like`]: rare, as on a real account where other tools write now and then.
pub const AWS_BUSY_WRITES: f64 = 0.02;

impl Faults {
    pub fn none() -> Self {
        Faults::default()
    }

    pub fn throttle(fraction: f64) -> Self {
        Faults { throttle: fraction, ..Faults::default() }
    }

    pub fn outage() -> Self {
        Faults { refuse: true, ..Faults::default() }
    }

    /// A profile of real IAM, as far as the operator can tell it from moto:
    ///
    /// - every call takes [`AWS_LATENCY`] (uniform);
    /// - IAM is eventually consistent: a new access key is refused (`InvalidClientTokenId`, 403,
    ///   as STS answers) for [`AWS_NEW_KEY_REFUSED_FOR`] after `CreateAccessKey`. AWS: "IAM ...
    ///   achieves high availability by replicating data across multiple servers ... changes that
    ///   I make are not always immediately visible", IAM User Guide, Troubleshooting IAM,
    ///   <https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_general.html#troubleshoot_general_eventual-consistency>;
    /// - account-level throttling above `throttle_rps` calls per second, shared by every caller,
    ///   answered `Throttling` (HTTP 400, `<Type>Sender</Type>`, "Rate exceeded") as IAM does.
    ///   AWS: IAM and STS calls of an account "contribute to a maximum rate quota for your AWS
    ///   account", which cannot be increased; the error is "Throttling: Rate exceeded, status
    ///   code: 400" (<https://repost.aws/knowledge-center/iam-sts-throttling-error>). The quota
    ///   itself is not published; the test picks it;
    /// - the transient refusals moto never makes: `ConcurrentModification` (409) for a write to a
    ///   user while another write to it is in flight ("multiple requests to change this object
    ///   were submitted simultaneously. Wait a few minutes and submit your request again"), and
    ///   [`AWS_BUSY_WRITES`] of writes refused with it or `EntityTemporarilyUnmodifiable` (409,
    ///   "likely to succeed if you try again after waiting several minutes"); both as the IAM API
    ///   reference describes its errors (e.g. botocore's IAM exceptions,
    ///   <https://docs.aws.amazon.com/botocore/latest/reference/services/iam/client/exceptions/ConcurrentModificationException.html>).
    pub fn aws_like(throttle_rps: f64) -> Self {
        Faults {
            latency: Some(AWS_LATENCY),
            account_rps: Some(throttle_rps),
            new_key_refused_for: Some(AWS_NEW_KEY_REFUSED_FOR),
            concurrent_writes_conflict: true,
            busy: AWS_BUSY_WRITES,
            ..Faults::default()
        }
    }
}

/// What the proxy did with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Forwarded to moto; its HTTP status.
    Forwarded(u16),
    Throttled,
    ServerError(u16),
    /// Forwarded to moto, response not delivered.
    Dropped,
    /// Answered with `ValidationError` (reject_user).
    Rejected,
    /// moto could not be reached: answered 502.
    UpstreamFailed,
    /// Signed with an Inactive key: answered `InvalidClientTokenId` without reaching moto.
    InactiveKey,
    /// Signed with a key created less than its `new_key_refused_for` ago: `InvalidClientTokenId`.
    NewKeyRefused,
    /// A write answered `ConcurrentModification` or `EntityTemporarilyUnmodifiable` (409).
    Busy,
}

impl Outcome {
    /// Whether moto saw (and acted on) the call.
    pub fn reached_iam(self) -> bool {
        matches!(self, Outcome::Forwarded(_) | Outcome::Dropped)
    }
}

/// One call as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Call {
    /// When it arrived (complete request read).
    pub at: Instant,
    /// The query-protocol `Action`, e.g. `CreateAccessKey`, `GetCallerIdentity`.
    pub action: String,
    pub user: Option<String>,
    /// The access key the call is about: `AccessKeyId`, or the first tag key of `TagUser` /
    /// `UntagUser` (per-key tags are named after the key).
    pub key: Option<String>,
    pub outcome: Outcome,
}

struct State {
    upstream: String,
    client: reqwest::Client,
    faults: watch::Sender<Faults>,
    calls: Mutex<Vec<Call>>,
    started: Instant,
    /// Counter to alternate 500 and 503.
    errors: std::sync::atomic::AtomicU64,
    /// (action, user) pairs whose first response was lost already.
    lost_once: Mutex<std::collections::HashSet<(String, String)>>,
    /// Calls per user, for `alternate_errors`.
    per_user: Mutex<std::collections::HashMap<String, u64>>,
    /// Looks up key statuses in the shared moto.
    admin: aws_sdk_iam::Client,
    /// Keys never checked for being Inactive: the operator's and the admin's.
    trusted_keys: Vec<String>,
    /// Every secret access key a CreateAccessKey answer carried (as IAM sent it, and as
    /// delivered), for scans that the secret appears nowhere it should not.
    secrets: Mutex<Vec<String>>,
    /// The account's token bucket (`account_rps`): tokens, last refill.
    account: Mutex<Option<(f64, Instant)>>,
    /// Keys created through the proxy and when they start being accepted.
    new_keys: Mutex<std::collections::HashMap<String, Instant>>,
    /// Writes in flight per user (`concurrent_writes_conflict`).
    writing: Mutex<std::collections::HashMap<String, usize>>,
}

impl State {
    /// Take a token of the account's bucket, if there is one.
    fn account_token(&self, rps: f64) -> bool {
        let mut bucket = self.account.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, last) = bucket.get_or_insert((rps, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rps).min(rps.max(1.0));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a key is still refused for being new.
    fn too_new(&self, id: &str) -> bool {
        let keys = self.new_keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(id).is_some_and(|until| Instant::now() < *until)
    }
}

/// A write to a user in flight; the count drops with it.
struct Writing<'a> {
    state: &'a State,
    user: String,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut writing = self.state.writing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = writing.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                writing.remove(&self.user);
            }
        }
    }
}

/// A time drawn uniformly from `[lo, hi]`.
fn uniform((lo, hi): (Duration, Duration)) -> Duration {
    lo + hi.saturating_sub(lo).mul_f64(rand::random::<f64>())
}

/// The running proxy. Stops (and frees its port) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to the environment's moto. Calls signed by a
    /// `trusted` key (the operator's own) or by the admin key are never looked up for being
    /// Inactive.
    pub async fn start(env: &crate::TestEnv, trusted: &[&str]) -> FaultProxy {
        let upstream = env.iam_endpoint();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let client = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("reqwest client");
        let state = Arc::new(State {
            upstream: upstream.trim_end_matches('/').to_string(),
            client,
            faults: watch::channel(Faults::default()).0,
            calls: Mutex::new(Vec::new()),
            started: Instant::now(),
            errors: std::sync::atomic::AtomicU64::new(0),
            lost_once: Mutex::default(),
            per_user: Mutex::default(),
            secrets: Mutex::default(),
            account: Mutex::default(),
            new_keys: Mutex::default(),
            writing: Mutex::default(),
            admin: env.iam_client(),
            trusted_keys: trusted
                .iter()
                .map(|k| k.to_string())
                .chain([env.admin_credentials().0.to_string()])
                .collect(),
        });
        let task = tokio::spawn(accept_loop(listener, addr, state.clone()));
        FaultProxy { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Environment that makes the operator call IAM and STS through this proxy.
    pub fn operator_env(&self) -> Vec<(String, String)> {
        vec![("AWS_ENDPOINT_URL_IAM".into(), self.url()), ("AWS_ENDPOINT_URL_STS".into(), self.url())]
    }

    /// Replace the faults in effect (takes effect for the next call; `refuse` at once).
    pub fn set(&self, faults: Faults) {
        self.state.faults.send_replace(faults);
    }

    pub fn faults(&self) -> Faults {
        self.state.faults.borrow().clone()
    }

    /// When the proxy started.
    pub fn started(&self) -> Instant {
        self.state.started
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every secret access key IAM handed out through this proxy (and its corrupted form, when
    /// `corrupt_new_secrets` changed it), whether or not the operator ever published it.
    pub fn secrets_seen(&self) -> Vec<String> {
        self.state.secrets.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Calls that arrived at or after `since`.
    pub fn calls_since(&self, since: Instant) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.at >= since).collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Calls per action.
pub fn by_action(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for c in calls {
        *out.entry(c.action.clone()).or_insert(0) += 1;
    }
    out
}

/// Calls per outcome.
pub fn by_outcome(calls: &[Call]) -> BTreeMap<Outcome, usize> {
    let mut out = BTreeMap::new();
    for c in calls {
        *out.entry(c.outcome).or_insert(0) += 1;
    }
    out
}

/// The largest number of calls that arrived within any window of length `window` (sliding,
/// not aligned to whole seconds), and when that window started.
pub fn max_in_window(calls: &[Call], window: Duration) -> (usize, Option<Instant>) {
    let mut times: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    times.sort();
    let (mut best, mut best_at, mut lo) = (0, None, 0);
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= window {
            lo += 1;
        }
        if hi + 1 - lo > best {
            best = hi + 1 - lo;
            best_at = Some(times[lo]);
        }
    }
    (best, best_at)
}

/// Calls per whole second since `origin` (index = second).
pub fn per_second(calls: &[Call], origin: Instant) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for c in calls {
        let s = c.at.saturating_duration_since(origin).as_secs() as usize;
        if out.len() <= s {
            out.resize(s + 1, 0);
        }
        out[s] += 1;
    }
    out
}

async fn accept_loop(first: TcpListener, addr: SocketAddr, state: Arc<State>) {
    let mut faults = state.faults.subscribe();
    let mut listener = Some(first);
    loop {
        match listener.take() {
            None => {
                // Outage: nothing listens until it ends.
                let _ = faults.wait_for(|f| !f.refuse).await;
                listener = Some(rebind(addr).await);
            }
            Some(l) => {
                if faults.borrow_and_update().refuse {
                    drop(l);
                    continue;
                }
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(serve_connection(stream, state.clone()));
                        }
                        listener = Some(l);
                    }
                    changed = faults.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Re-checked at the top of the loop.
                        listener = Some(l);
                    }
                }
            }
        }
    }
}

/// Listen on the same port again after an outage.
async fn rebind(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                eprintln!("proxy: cannot listen on {addr} again yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("proxy: cannot listen on {addr} again after the outage: {e}"),
        }
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Form parameters from the query string and (for a form POST) the body.
    fn params(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Some((_, q)) = self.target.split_once('?') {
            out.extend(parse_form(q));
        }
        out.extend(parse_form(&String::from_utf8_lossy(&self.body)));
        out
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let mut faults = state.faults.subscribe();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        if faults.borrow_and_update().refuse {
            return;
        }
        let request = tokio::select! {
            r = read_request(&mut reader) => r,
            // An outage closes idle connections too, as a dead server would.
            _ = faults.wait_for(|f| f.refuse) => return,
        };
        let Ok(Some(request)) = request else { return };
        let close = request.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let current = state.faults.borrow().clone();
        if current.refuse {
            return;
        }
        let params = request.params();
        let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let action = param("Action").unwrap_or_else(|| format!("{} {}", request.method, request.target));
        let user = param("UserName");
        let key = param("AccessKeyId").or_else(|| param("TagKeys.member.1")).or_else(|| param("Tags.member.1.Key"));
        let spared = current.except.contains(&action) || (!current.only.is_empty() && !current.only.contains(&action));
        let roll = |p: f64| !spared && p > 0.0 && rand::random::<f64>() < p;
        let lose_once = current.lose_first_response_of.as_ref() == Some(&action)
            && user.as_ref().is_some_and(|u| {
                state.lost_once.lock().unwrap_or_else(|e| e.into_inner()).insert((action.clone(), u.clone()))
            });
        let arrived = Instant::now();

        let alternate = match (&user, current.alternate_errors) {
            (Some(u), true) => {
                let mut counts = state.per_user.lock().unwrap_or_else(|e| e.into_inner());
                let n = counts.entry(u.clone()).or_insert(0);
                *n += 1;
                Some(n.is_multiple_of(2))
            }
            _ => None,
        };
        // The AWS-like parts: the account's quota is spent at arrival; a write marks its user
        // busy until it is answered; then the call takes its time.
        let within_quota = current.account_rps.is_none_or(|rps| state.account_token(rps));
        let is_write = WRITE_ACTIONS.contains(&action.as_str());
        let writing_guard = match (&user, is_write) {
            (Some(u), true) => {
                let mut writing = state.writing.lock().unwrap_or_else(|e| e.into_inner());
                let n = writing.entry(u.clone()).or_insert(0);
                *n += 1;
                Some((Writing { state: &state, user: u.clone() }, *n > 1))
            }
            _ => None,
        };
        let concurrent_write = current.concurrent_writes_conflict && writing_guard.as_ref().is_some_and(|(_, c)| *c);
        if let Some(range) = current.latency {
            tokio::time::sleep(uniform(range)).await;
        }
        let signed_by = signing_key(&request);
        let too_new = current.new_key_refused_for.is_some() && signed_by.as_ref().is_some_and(|id| state.too_new(id));
        let inactive = match &signed_by {
            Some(id) if !too_new && !state.trusted_keys.contains(id) => key_is_inactive(&state.admin, id).await,
            _ => false,
        };
        let invalid_token = "The security token included in the request is invalid.";
        let (outcome, response) = if too_new {
            (Outcome::NewKeyRefused, Some(aws_error(403, "Sender", "InvalidClientTokenId", invalid_token)))
        } else if inactive {
            (Outcome::InactiveKey, Some(aws_error(403, "Sender", "InvalidClientTokenId", invalid_token)))
        } else if !within_quota {
            (Outcome::Throttled, Some(aws_error(400, "Sender", "Throttling", "Rate exceeded")))
        } else if concurrent_write {
            let message = "The request was rejected because multiple requests to change this object were submitted simultaneously. Wait a few minutes and submit your request again.";
            (Outcome::Busy, Some(aws_error(409, "Sender", "ConcurrentModification", message)))
        } else if is_write && roll(current.busy) {
            let n = state.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = user.as_deref().unwrap_or_default();
            let (code, message) = if n.is_multiple_of(2) {
                ("ConcurrentModification", "The request was rejected because multiple requests to change this object were submitted simultaneously. Wait a few minutes and submit your request again.".to_string())
            } else {
                (
                    "EntityTemporarilyUnmodifiable",
                    format!("The user with name {name} cannot be modified right now. Try again later."),
                )
            };
            (Outcome::Busy, Some(aws_error(409, "Sender", code, &message)))
        } else if let Some(even) = alternate {
            if even {
                (
                    Outcome::ServerError(503),
                    Some(aws_error(503, "Receiver", "ServiceUnavailable", "Service is unavailable.")),
                )
            } else {
                (Outcome::Throttled, Some(aws_error(400, "Sender", "Throttling", "Rate exceeded")))
            }
        } else if current.reject_user.is_some() && user == current.reject_user {
            let message = format!(
                "1 validation error detected: Value '{}' at 'userName' failed to satisfy constraint: Member must satisfy regular expression pattern: [\\w+=,.@-]+",
                user.as_deref().unwrap_or_default()
            );
            (Outcome::Rejected, Some(aws_error(400, "Sender", "ValidationError", &message)))
        } else if roll(current.throttle) {
            (Outcome::Throttled, Some(aws_error(400, "Sender", "Throttling", "Rate exceeded")))
        } else if roll(current.server_error) {
            let n = state.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (status, code, message) = if n.is_multiple_of(2) {
                (500, "InternalFailure", "The request processing has failed because of an unknown error.")
            } else {
                (503, "ServiceUnavailable", "Service is unavailable.")
            };
            (Outcome::ServerError(status), Some(aws_error(status, "Receiver", code, message)))
        } else {
            if !current.delay.is_zero() && !spared {
                tokio::time::sleep(current.delay).await;
            }
            match forward(&state, &request).await {
                Ok(resp) if lose_once || roll(current.drop_response) => {
                    drop(resp);
                    (Outcome::Dropped, None)
                }
                Ok(mut resp) => {
                    if action == "CreateAccessKey"
                        && resp.status == 200
                        && let Some(range) = current.new_key_refused_for
                        && let Some(id) = xml_text(&resp.body, "AccessKeyId")
                    {
                        let until = Instant::now() + uniform(range);
                        state.new_keys.lock().unwrap_or_else(|e| e.into_inner()).insert(id, until);
                    }
                    if action == "CreateAccessKey" {
                        let mut seen = state.secrets.lock().unwrap_or_else(|e| e.into_inner());
                        seen.extend(secret_in(&resp.body));
                        if current.corrupt_new_secrets {
                            corrupt_secret(&mut resp.body);
                            seen.extend(secret_in(&resp.body));
                        }
                    }
                    (Outcome::Forwarded(resp.status), Some(resp))
                }
                Err(e) => (Outcome::UpstreamFailed, Some(plain(502, &format!("proxy: upstream failed: {e}")))),
            }
        };
        state.calls.lock().unwrap_or_else(|e| e.into_inner()).push(Call { at: arrived, action, user, key, outcome });
        let Some(response) = response else { return };
        if write_response(&mut write, &response, close).await.is_err() || close {
            return;
        }
    }
}

/// The access key id in a SigV4 `Authorization` header (`Credential=<id>/<date>/...`).
fn signing_key(request: &Request) -> Option<String> {
    let auth = request.header("authorization")?;
    let credential = auth.split("Credential=").nth(1)?;
    Some(credential.split('/').next()?.to_string())
}

/// Whether IAM holds `id` as an Inactive key (unknown keys are left for moto to refuse).
async fn key_is_inactive(admin: &aws_sdk_iam::Client, id: &str) -> bool {
    let Ok(used) = admin.get_access_key_last_used().access_key_id(id).send().await else { return false };
    let Some(user) = used.user_name() else { return false };
    let Ok(keys) = admin.list_access_keys().user_name(user).send().await else { return false };
    keys.access_key_metadata()
        .iter()
        .any(|k| k.access_key_id() == Some(id) && k.status().is_some_and(|s| s.as_str() == "Inactive"))
}

/// The text of the first `<tag>` element of an XML body.
fn xml_text(body: &[u8], tag: &str) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let open = format!("<{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text[start..].find(&format!("</{tag}>"))? + start;
    Some(text[start..end].to_string())
}

/// The `<SecretAccessKey>` of a CreateAccessKey answer.
fn secret_in(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let start = text.find("<SecretAccessKey>")? + "<SecretAccessKey>".len();
    let end = text[start..].find("</SecretAccessKey>")? + start;
    Some(text[start..end].to_string())
}

/// Change the last character of the `<SecretAccessKey>` in a CreateAccessKey answer.
fn corrupt_secret(body: &mut [u8]) {
    let text = String::from_utf8_lossy(body).into_owned();
    if let Some(end) = text.find("</SecretAccessKey>")
        && end > 0
    {
        let i = end - 1;
        body[i] = if body[i] == b'A' { b'B' } else { b'A' };
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// An error in the query protocol's shape. `InvalidClientTokenId` is STS's and IAM's answer
/// alike (the signature is checked before the action): it carries STS's namespace, the one
/// the verification call (`GetCallerIdentity`) gets.
fn aws_error(status: u16, type_: &str, code: &str, message: &str) -> Response {
    let request_id = format!("{:032x}", rand::random::<u128>());
    let namespace = if code == "InvalidClientTokenId" {
        "https://sts.amazonaws.com/doc/2011-06-15/"
    } else {
        "https://iam.amazonaws.com/doc/2010-05-08/"
    };
    let body = format!(
        "<ErrorResponse xmlns=\"{namespace}\"><Error><Type>{type_}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
    );
    Response {
        status,
        headers: vec![("Content-Type".into(), "text/xml".into()), ("x-amzn-RequestId".into(), request_id)],
        body: body.into_bytes(),
    }
}

fn plain(status: u16, text: &str) -> Response {
    Response { status, headers: vec![("Content-Type".into(), "text/plain".into())], body: text.as_bytes().to_vec() }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

async fn forward(state: &State, request: &Request) -> Result<Response, reqwest::Error> {
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let mut builder = state.client.request(method, format!("{}{}", state.upstream, request.target));
    for (k, v) in &request.headers {
        if !HOP_BY_HOP.iter().any(|h| k.eq_ignore_ascii_case(h)) && !k.eq_ignore_ascii_case("expect") {
            builder = builder.header(k.as_str(), v.as_str());
        }
    }
    let resp = builder.body(request.body.clone()).send().await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = resp.bytes().await?.to_vec();
    Ok(Response { status, headers, body })
}

async fn write_response<W: AsyncWriteExt + Unpin>(w: &mut W, r: &Response, close: bool) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n", r.body.len()));
    head.push_str(if close { "connection: close\r\n\r\n" } else { "connection: keep-alive\r\n\r\n" });
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&r.body);
    w.write_all(&bytes).await?;
    w.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One request, or `None` at a clean end of the connection.
async fn read_request<R: AsyncBufReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Request>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    // Tolerate blank lines between requests.
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else { return Err(bad("request line")) };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    let mut size = line.len();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(bad("connection closed in the headers"));
        }
        size += line.len();
        if size > MAX_HEAD {
            return Err(bad("headers too large"));
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { return Err(bad("header line")) };
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut request = Request { method, target, headers, body: Vec::new() };
    let chunked = request.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            let hex = line.trim().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(hex, 16).map_err(|_| bad("chunk size"))?;
            if request.body.len() + n > MAX_BODY {
                return Err(bad("body too large"));
            }
            if n == 0 {
                // Trailers, up to the blank line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = request.body.len();
            request.body.resize(start + n, 0);
            r.read_exact(&mut request.body[start..]).await?;
            line.clear();
            r.read_line(&mut line).await?;
        }
    } else if let Some(len) = request.header("content-length") {
        let n: usize = len.parse().map_err(|_| bad("content-length"))?;
        if n > MAX_BODY {
            return Err(bad("body too large"));
        }
        request.body.resize(n, 0);
        r.read_exact(&mut request.body).await?;
    }
    Ok(Some(request))
}

/// `a=1&b=x%20y` -> pairs, percent- and `+`-decoded.
fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
