//! The identities the operator runs with in tests: exactly what users install.
//!
//! Kubernetes: the ServiceAccount and RBAC rendered from the Helm chart (`helm template`), or
//! from the kustomize base in `deploy/`, applied once per test environment with the admin
//! credentials; the operator gets a kubeconfig holding that ServiceAccount's token and nothing
//! else. IAM: a user holding the shipped `deploy/iam-policy.json` in moto, which enforces
//! signatures and policies. Admin credentials stay with test setup.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde_json::{Value, json};
use testenv::TestEnv;

/// The kinds that make up an installed identity; everything else a rendering holds is ignored.
const IDENTITY_KINDS: &[&str] = &["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// A Kubernetes identity the operator can run as.
#[derive(Debug)]
pub struct Identity {
    /// Where it came from, for messages: `chart` or `deploy/`.
    pub source: &'static str,
    /// The namespace it is installed in: the Pod's namespace, where its Lease lives.
    pub namespace: String,
    pub service_account: String,
    /// A kubeconfig with the ServiceAccount's token.
    pub kubeconfig: PathBuf,
}

/// Made once per environment (a test binary may start private ones besides the shared one).
fn once_per_env<T: Send + Sync>(
    cache: &'static Mutex<BTreeMap<usize, &'static T>>,
    env: &'static TestEnv,
    make: impl FnOnce() -> T,
) -> &'static T {
    let mut made = cache.lock().unwrap_or_else(|e| e.into_inner());
    made.entry(env as *const TestEnv as usize).or_insert_with(|| Box::leak(Box::new(make())))
}

/// The chart's ServiceAccount and RBAC (release `iko` in namespace `iko-system`, default values).
pub fn chart(env: &'static TestEnv) -> &'static Identity {
    static CHART: Mutex<BTreeMap<usize, &'static Identity>> = Mutex::new(BTreeMap::new());
    once_per_env(&CHART, env, || {
        let (release, ns) = ("iko", "iko-system");
        let chart = testenv::repo_root().join("charts/iam-key-operator");
        let out = env.helm([
            "template",
            release,
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            ns,
            "--set",
            "clusterName=test",
        ]);
        assert!(out.status.success(), "helm template of the chart failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let rendered = String::from_utf8(out.stdout).expect("utf-8");
        install(env, "chart", ns, &rendered, &format!("{release}-iam-key-operator"))
    })
}

/// The kustomize base's ServiceAccount and RBAC (`kubectl kustomize deploy/`).
pub fn kustomize(env: &'static TestEnv) -> &'static Identity {
    static KUSTOMIZE: Mutex<BTreeMap<usize, &'static Identity>> = Mutex::new(BTreeMap::new());
    once_per_env(&KUSTOMIZE, env, || {
        let dir = testenv::repo_root().join("deploy");
        let out = env.kubectl(["kustomize", dir.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "kubectl kustomize deploy/ failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let rendered = String::from_utf8(out.stdout).expect("utf-8");
        install(env, "deploy/", "iam-key-operator", &rendered, "iam-key-operator")
    })
}

/// Apply the identity objects of `rendered` (multi-document YAML) into `ns` as admin, and
/// write a kubeconfig for `service_account`.
fn install(env: &TestEnv, source: &'static str, ns: &str, rendered: &str, service_account: &str) -> Identity {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let value: Value = serde::Deserialize::deserialize(doc).expect("rendered YAML");
        if value.get("kind").and_then(Value::as_str).is_some_and(|k| IDENTITY_KINDS.contains(&k)) {
            objects.push(value);
        }
    }
    assert!(
        objects.iter().any(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == service_account),
        "{source} renders no ServiceAccount {service_account}"
    );
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let file = env.dir().join(format!("identity-{ns}.json"));
    std::fs::write(&file, list.to_string()).expect("write identity objects");
    let created = env.kubectl(["create", "namespace", ns]);
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(created.status.success() || stderr.contains("AlreadyExists"), "kubectl create namespace {ns}:\n{stderr}");
    super::kubectl_ok(env, &["apply", "--namespace", ns, "-f", file.to_str().expect("utf-8")]);
    let kubeconfig = service_account_kubeconfig(env, ns, service_account);
    Identity { source, namespace: ns.to_string(), service_account: service_account.to_string(), kubeconfig }
}

/// A kubeconfig that authenticates as `ns/sa` with a token from the TokenRequest API.
pub fn service_account_kubeconfig(env: &TestEnv, ns: &str, sa: &str) -> PathBuf {
    let token = super::kubectl_ok(env, &["create", "token", sa, "--namespace", ns, "--duration", "48h"]);
    let ca = env.dir().join("ca.pem");
    std::fs::write(&ca, env.ca_pem()).expect("write CA");
    let path = env.dir().join(format!("kubeconfig-{ns}-{sa}.json"));
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": {"server": env.apiserver_url(), "certificate-authority": ca}}],
        "users": [{"name": sa, "user": {"token": token.trim()}}],
        "contexts": [{"name": sa, "context": {"cluster": "testenv", "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    std::fs::write(&path, config.to_string()).expect("write kubeconfig");
    path
}

/// The operator's IAM identity in the environment's moto: a user whose only policy is the
/// shipped one.
pub fn operator_aws_key(env: &'static TestEnv) -> &'static (String, String) {
    static KEY: Mutex<BTreeMap<usize, &'static (String, String)>> = Mutex::new(BTreeMap::new());
    once_per_env(&KEY, env, || {
        let policy = shipped_policy_for_moto(&testenv::repo_root().join("deploy/iam-policy.json")).to_string();
        // Off the caller's runtime: this may run inside a #[tokio::test].
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(env.create_iam_identity("iam-key-operator", &policy)).expect("the operator's IAM identity")
        })
        .join()
        .expect("identity thread")
    })
}

/// The shipped IAM policy as moto can evaluate it. moto matches every IAM action against the
/// resource `*` and cannot evaluate condition keys, so each statement's `Resource` is widened to
/// `*` and its `Condition` dropped: what moto proves is the action list (every call the
/// operator makes is allowed, nothing else is). The resources and conditions are checked on the
/// document itself (tests/e2e/iam_policy.rs).
pub fn shipped_policy_for_moto(path: &Path) -> Value {
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).expect("read IAM policy")).expect("policy JSON");
    for statement in doc["Statement"].as_array_mut().expect("Statement list") {
        statement["Resource"] = json!("*");
        if let Some(s) = statement.as_object_mut() {
            s.remove("Condition");
        }
    }
    doc
}
