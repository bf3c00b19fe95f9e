//! Shared helpers of the integration tests: run the operator as a child process against the
//! shared real environment, create resources, wait for conditions, check keys in IAM.
#![allow(dead_code)]

pub mod identity;

use std::{
    collections::BTreeMap,
    fs::File,
    net::TcpListener,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use iam_key_operator::crd::{IamAccessKey, IamAccessKeyPolicy};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use testenv::{TestEnv, proxy::FaultProxy};

pub const CLUSTER: &str = "test";

/// A fault proxy (`testenv::proxy`) in front of the environment's moto, trusting the operator's
/// own IAM key (never looked up for being Inactive).
pub async fn fault_proxy(env: &'static TestEnv) -> FaultProxy {
    FaultProxy::start(env, &[&identity::operator_aws_key(env).0]).await
}

pub struct Fixture {
    pub env: &'static TestEnv,
    pub client: Client,
    pub ns: String,
    pub user: String,
}

impl Fixture {
    /// A fresh namespace and IAM user in the shared environment, and a tenancy policy that
    /// allows the namespace to manage users named like the user (`<user>*`).
    pub async fn new(prefix: &str) -> Fixture {
        Self::with_user_path(prefix, "/").await
    }

    /// Like `new`, with the IAM user under `path` (the chart manages users under /k8s/).
    pub async fn with_user_path(prefix: &str, path: &str) -> Fixture {
        let f = Self::bare(prefix, path).await;
        f.allow_own_user(json!({})).await;
        f
    }

    /// Replace the fixture's policy: its rule (this namespace, users named like the fixture's)
    /// with `extra` fields, e.g. `{"allowRetain": true}` or `{"allowPause": true}`. The default
    /// rule allows neither (the secure default).
    pub async fn allow_own_user(&self, extra: serde_json::Value) {
        let mut rule = json!({"namespaces": [self.ns], "userNames": [format!("{}*", self.user)]});
        rule.as_object_mut().expect("rule").extend(extra.as_object().expect("extra fields").clone());
        self.allow(&format!("allow-{}", self.ns), rule).await;
    }

    /// A fresh namespace and IAM user; no policy allows anything yet.
    pub async fn without_policy(prefix: &str) -> Fixture {
        Self::bare(prefix, "/").await
    }

    /// Like `new`, in an environment of its own (no controller-manager): for tests that kill the
    /// API server, or that count what the operator does and must not see other tests' policies
    /// (a relist of the policies makes every operator look at its resources again).
    pub async fn private(prefix: &str) -> Fixture {
        let opts = testenv::Options::default().crds_dir(testenv::repo_root().join("crds")).controller_manager(false);
        let env: &'static TestEnv = Box::leak(Box::new(TestEnv::start_async(opts).await.expect("private testenv")));
        let f = Self::bare_in(env, prefix, "/").await;
        f.allow_own_user(json!({})).await;
        f
    }

    async fn bare(prefix: &str, path: &str) -> Fixture {
        Self::bare_in(testenv::shared(), prefix, path).await
    }

    async fn bare_in(env: &'static TestEnv, prefix: &str, path: &str) -> Fixture {
        let client = env.kube_client().await.expect("kube client");
        let ns = env.fresh_namespace(prefix).await.expect("namespace");
        let user = env.fresh_iam_user_with_path(prefix, path).await.expect("IAM user");
        Fixture { env, client, ns, user }
    }

    /// Create (or replace) a cluster-wide IamAccessKeyPolicy with one rule.
    pub async fn allow(&self, name: &str, rule: serde_json::Value) {
        let api: Api<IamAccessKeyPolicy> = Api::all(self.client.clone());
        let policy: IamAccessKeyPolicy = serde_json::from_value(json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
            "metadata": {"name": name}, "spec": {"rules": [rule]}
        }))
        .expect("valid policy");
        let params = kube::api::PatchParams::apply("tests").force();
        api.patch(name, &params, &kube::api::Patch::Apply(&policy)).await.expect("apply policy");
    }

    pub fn keys_api(&self) -> Api<IamAccessKey> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Start an operator that reconciles this fixture's namespace.
    pub fn operator(&self, extra_env: &[(&str, &str)]) -> Operator {
        Operator::start(self.env, &self.ns, extra_env, &[])
    }

    /// Create an IamAccessKey from a JSON spec (`userName` defaults to the fixture's user).
    pub async fn create(&self, name: &str, mut spec: serde_json::Value) -> IamAccessKey {
        if spec.get("userName").is_none() {
            spec["userName"] = self.user.clone().into();
        }
        let obj: IamAccessKey = serde_json::from_value(serde_json::json!({
            "apiVersion": "iam.keyop.dev/v1alpha1",
            "kind": "IamAccessKey",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("valid IamAccessKey");
        self.keys_api().create(&PostParams::default(), &obj).await.expect("create IamAccessKey")
    }

    /// Notes of the events about `name` with this reason.
    pub async fn events(&self, name: &str, reason: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = api.list(&Default::default()).await.expect("list events");
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note)
            .collect()
    }

    /// The notes of `name`'s events with `reason`, once `enough` holds for them (or after 30 s:
    /// the caller's assertion then says what is missing). An event may land just after the
    /// status write a test waited for.
    pub async fn wait_events(&self, name: &str, reason: &str, enough: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let notes = self.events(name, reason).await;
            if enough(&notes) || Instant::now() > deadline {
                return notes;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn delete(&self, name: &str) {
        self.keys_api().delete(name, &DeleteParams::default()).await.expect("delete IamAccessKey");
    }

    /// Poll the resource until `check` holds; panics with the last state after `timeout`.
    pub async fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&IamAccessKey) -> bool,
    ) -> IamAccessKey {
        let deadline = Instant::now() + timeout;
        loop {
            let obj = self.keys_api().get_opt(name).await.expect("get IamAccessKey");
            if let Some(obj) = &obj
                && check(obj)
            {
                return obj.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} on {}/{name}; last: {:#?}",
                    self.ns,
                    obj.map(|o| o.status)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_ready(&self, name: &str) -> IamAccessKey {
        self.wait_for(name, Duration::from_secs(60), "Ready=True", |o| ready(o).is_some_and(|(s, _, _)| s == "True"))
            .await
    }

    pub async fn wait_reason(&self, name: &str, reason: &str) -> IamAccessKey {
        self.wait_for(name, Duration::from_secs(60), reason, |o| ready(o).is_some_and(|(_, r, _)| r == reason)).await
    }

    pub async fn wait_gone(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.keys_api().get_opt(name).await.expect("get").is_some() {
            assert!(Instant::now() < deadline, "{name} still exists after {timeout:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The access key ID and secret stored in a Secret of the Env format.
    pub async fn secret_creds(&self, secret: &str) -> Option<(String, String)> {
        let s = self.secrets().get_opt(secret).await.expect("get Secret")?;
        let data = s.data.unwrap_or_default();
        let get = |k: &str| data.get(k).map(|b| String::from_utf8(b.0.clone()).expect("utf-8"));
        Some((get("AWS_ACCESS_KEY_ID")?, get("AWS_SECRET_ACCESS_KEY")?))
    }

    /// Keys of the fixture's user in IAM: id -> status.
    pub async fn iam_keys(&self) -> BTreeMap<String, String> {
        iam_keys(self.env, &self.user).await
    }

    pub async fn user_tags(&self) -> BTreeMap<String, String> {
        let out = self.env.iam_client().list_user_tags().user_name(&self.user).send().await.expect("ListUserTags");
        out.tags().iter().map(|t| (t.key().to_string(), t.value().to_string())).collect()
    }

    /// Whether the key authenticates as the fixture's user (STS GetCallerIdentity).
    pub async fn authenticates(&self, id: &str, secret: &str) -> bool {
        authenticates_as(self.env, id, secret, &self.user).await
    }

    /// A key created directly in IAM, as a person or another tool would.
    pub async fn foreign_key(&self) -> String {
        let out =
            self.env.iam_client().create_access_key().user_name(&self.user).send().await.expect("CreateAccessKey");
        out.access_key().expect("key").access_key_id().to_string()
    }

    /// The invariant every test ends with: IAM holds exactly the keys status names (plus the
    /// foreign ones), the Secret's key is the current one and authenticates.
    pub async fn assert_consistent(&self, name: &str, foreign: &[String]) {
        let obj = self.keys_api().get(name).await.expect("get");
        let status = obj.status.clone().expect("status");
        let mut expected: Vec<String> = status.keys.iter().map(|k| k.access_key_id.clone()).collect();
        expected.extend(foreign.iter().cloned());
        expected.sort();
        let actual: Vec<String> = self.iam_keys().await.into_keys().collect();
        assert_eq!(actual, expected, "IAM keys vs status.keys + foreign keys");
        let secret = status.secret_name.clone().expect("status.secretName");
        let (id, key) = self.secret_creds(&secret).await.expect("Secret with credentials");
        assert_eq!(Some(&id), status.access_key_id.as_ref(), "Secret holds the current key");
        assert!(self.authenticates(&id, &key).await, "the Secret's key authenticates");
        assert!(status.pending_create.is_none(), "no create left pending");
    }
}

/// `(status, reason, message)` of the Ready condition.
pub fn ready(obj: &IamAccessKey) -> Option<(String, String, String)> {
    condition(obj, "Ready")
}

/// `(status, reason, message)` of a condition.
pub fn condition(obj: &IamAccessKey, type_: &str) -> Option<(String, String, String)> {
    let c = obj.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn iam_keys(env: &TestEnv, user: &str) -> BTreeMap<String, String> {
    let out = env.iam_client().list_access_keys().user_name(user).send().await.expect("ListAccessKeys");
    out.access_key_metadata()
        .iter()
        .map(|k| {
            (
                k.access_key_id().unwrap_or_default().to_string(),
                k.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
            )
        })
        .collect()
}

pub async fn authenticates_as(env: &TestEnv, id: &str, secret: &str, user: &str) -> bool {
    match env.sts_client(id, secret).get_caller_identity().send().await {
        // `arn:aws:iam::<account>:user/<path>/<name>`
        Ok(out) => out.arn().is_some_and(|arn| arn.contains(":user/") && arn.ends_with(&format!("/{user}"))),
        Err(_) => false,
    }
}

/// The operator binary (built with the `failpoints` feature by `make test`) as a child process,
/// running as an installed identity: a ServiceAccount token with the chart's (or `deploy/`'s)
/// RBAC, and the IAM user holding the shipped IAM policy. Never as an admin.
pub struct Operator {
    child: Option<Child>,
    pub log_path: PathBuf,
    pub metrics_port: u16,
    ns: String,
    env: &'static TestEnv,
    identity: &'static identity::Identity,
    /// Kept for restarts.
    envs: Vec<(String, String)>,
    args: Vec<String>,
    /// Whether the test provokes a refusal by the API server on purpose.
    pub expect_forbidden: bool,
}

impl Operator {
    /// As the chart's identity. `--cluster-name test`, `--verify-timeout 20s` and `--resync 3s`
    /// unless `extra_args` sets them; debug logging unless `extra_env` sets `RUST_LOG`.
    pub fn start(env: &'static TestEnv, ns: &str, extra_env: &[(&str, &str)], extra_args: &[&str]) -> Operator {
        Self::start_as(identity::chart(env), env, ns, extra_env, extra_args)
    }

    pub fn start_as(
        identity: &'static identity::Identity,
        env: &'static TestEnv,
        ns: &str,
        extra_env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Operator {
        let log_path = env.dir().join(format!("operator-{ns}-{}.log", std::process::id()));
        let mut op = Operator {
            child: None,
            log_path,
            metrics_port: free_port(),
            ns: ns.into(),
            env,
            identity,
            envs: extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            args: extra_args.iter().map(|a| a.to_string()).collect(),
            expect_forbidden: false,
        };
        op.spawn();
        op
    }

    fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(&self.log_path).expect("operator log file");
        let mut cmd = self.env.command(env!("CARGO_BIN_EXE_iam-key-operator"));
        cmd.args(["run", "--namespace", &self.ns])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(&self.args);
        // Test defaults, unless the test sets the flag itself.
        for (flag, value) in [("--cluster-name", CLUSTER), ("--verify-timeout", "20s"), ("--resync", "3s")] {
            if !self.args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
                cmd.args([flag, value]);
            }
        }
        let (key_id, secret) = identity::operator_aws_key(self.env);
        cmd.env("KUBECONFIG", &self.identity.kubeconfig)
            .env("POD_NAMESPACE", &self.identity.namespace)
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret);
        // Debug logging everywhere: the secret must not leak even at this level.
        cmd.env("RUST_LOG", "debug,hyper=info,h2=info,rustls=info,tower=info")
            .env_remove("IKO_FAILPOINT")
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn iam-key-operator"));
    }

    /// Start again after a crash, with the same flags, environment, log file and metrics port;
    /// a failpoint fires once: only one given in `extra_env` applies to the new process.
    pub fn restart(&mut self, extra_env: &[(&str, &str)]) {
        self.kill();
        self.envs.retain(|(k, _)| k != "IKO_FAILPOINT");
        self.envs.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.spawn();
    }

    /// If the process exited by itself: how.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Wait until the process exits by itself (e.g. at a failpoint).
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().expect("running").try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("operator did not exit within {timeout:?}; log:\n{}", tail(&self.log(), 40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The metrics text, once the server answers.
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        for _ in 0..100 {
            if let Ok(r) = reqwest::get(&url).await
                && let Ok(text) = r.text().await
            {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no metrics at {url}");
    }

    /// Sum of `iam_key_operator_iam_calls_total` for the given operations.
    pub async fn iam_calls(&self, operations: &[&str]) -> u64 {
        sum_metric(&self.metrics().await, "iam_key_operator_iam_calls_total", |labels| {
            operations.iter().any(|op| labels.contains(&format!("operation=\"{op}\"")))
        })
    }

    /// IAM and STS calls so far, by operation (every outcome).
    pub async fn iam_calls_by_operation(&self) -> BTreeMap<String, u64> {
        let mut calls = BTreeMap::new();
        for line in self.metrics().await.lines().filter(|l| l.starts_with("iam_key_operator_iam_calls_total{")) {
            let Some(operation) = line.split("operation=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
            let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
            *calls.entry(operation.to_string()).or_default() += count;
        }
        calls
    }

    /// Reconciles finished so far with this result (`ok`, or the Ready condition's reason);
    /// every result with `None`.
    pub async fn reconciles(&self, result: Option<&str>) -> u64 {
        let wanted = result.map(|r| format!("result=\"{r}\""));
        sum_metric(&self.metrics().await, "iam_key_operator_reconciles_total", |labels| {
            wanted.as_ref().is_none_or(|w| labels.contains(w.as_str()))
        })
    }

    /// Wait until the operator has finished `at_least` reconciles with `result` in all: proof
    /// that it looked again (past its backoff or resync) before a test asserts that nothing
    /// changed. Panics after a minute.
    pub async fn wait_reconciles(&self, result: Option<&str>, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = self.reconciles(result).await;
            if done >= at_least {
                return;
            }
            assert!(Instant::now() < deadline, "{done} of {at_least} reconciles ({result:?}) in a minute");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait for `more` reconciles with `result` after this call.
    pub async fn wait_more_reconciles(&self, result: Option<&str>, more: u64) {
        let now = self.reconciles(result).await;
        self.wait_reconciles(result, now + more).await;
    }

    pub async fn kube_writes(&self) -> u64 {
        sum_metric(&self.metrics().await, "iam_key_operator_kube_writes_total", |_| true)
    }

    /// Panic if the secret appears in anything the operator printed.
    pub fn assert_log_free_of(&self, secret: &str) {
        let log = self.log();
        assert!(!log.is_empty(), "the operator logged nothing: the check would prove nothing");
        assert!(
            !log.contains(secret),
            "the secret access key appears in the operator's log {}",
            self.log_path.display()
        );
    }
}

impl Drop for Operator {
    /// A call the installed RBAC refuses fails the test, even one whose failure the operator
    /// only logs (an event it could not create, say): a missing verb must not go unnoticed.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() || self.expect_forbidden {
            return;
        }
        let log = self.log();
        if let Some(line) = log.lines().find(|l| l.contains("forbidden")) {
            panic!(
                "the operator, running as the {} identity {}/{}, was refused by the API server: {line}\nlog: {}",
                self.identity.source,
                self.identity.namespace,
                self.identity.service_account,
                self.log_path.display()
            );
        }
    }
}

pub const IAM_WRITES: &[&str] = &["CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "TagUser", "UntagUser"];
/// Every IAM and STS call the operator makes.
pub const IAM_ALL: &[&str] = &[
    "GetUser",
    "ListAccessKeys",
    "CreateAccessKey",
    "UpdateAccessKey",
    "DeleteAccessKey",
    "TagUser",
    "UntagUser",
    "GetAccessKeyLastUsed",
    "GetCallerIdentity",
];

fn sum_metric(text: &str, name: &str, filter: impl Fn(&str) -> bool) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter(|l| filter(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A finished command's stdout and stderr, for messages.
pub fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// kubectl (as admin) against the environment; panics with its output unless it succeeds.
pub fn kubectl_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = env.kubectl(args);
    assert!(out.status.success(), "kubectl {args:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}
