//! The CRDs on a real API server: valid resources are accepted, invalid ones are refused by the
//! API server itself with a message that names the field, and `kubectl explain` shows the docs.

mod support;

use serde_json::{Value, json};

fn kubectl_apply(ns: &str, doc: &Value) -> (bool, String) {
    let env = testenv::shared();
    let path = env.dir().join(format!("apply-{ns}-{}.json", rand_suffix()));
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    let out = env.kubectl(["apply", "-n", ns, "-f", path.to_str().unwrap()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn key(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn shipped_examples_are_accepted() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("examples").await.unwrap();
    for entry in std::fs::read_dir(testenv::repo_root().join("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        let out = env.kubectl(["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test]
async fn invalid_specs_are_refused_by_the_api_server_naming_the_field() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("invalid").await.unwrap();
    let cases = [
        ("space", json!({"userName": "has space"}), "spec.userName"),
        ("long", json!({"userName": "u".repeat(65)}), "spec.userName"),
        ("upper", json!({"userName": "u", "secret": {"name": "Upper"}}), "spec.secret.name"),
        ("format", json!({"userName": "u", "secret": {"format": "Json"}}), "spec.secret.format"),
        ("status", json!({"userName": "u", "keyStatus": "Enabled"}), "spec.keyStatus"),
        ("duration", json!({"userName": "u", "rotation": {"interval": "30 days"}}), "spec.rotation.interval"),
        ("grace", json!({"userName": "u", "rotation": {"gracePeriod": "1.5h"}}), "spec.rotation.gracePeriod"),
        (
            "label",
            json!({"userName": "u", "secret": {"labels": {"app.kubernetes.io/managed-by": "me"}}}),
            "spec.secret.labels",
        ),
        ("policy", json!({"userName": "u", "deletionPolicy": "Orphan"}), "spec.deletionPolicy"),
    ];
    for (name, spec, field) in cases {
        let (ok, out) = kubectl_apply(&ns, &key(name, spec));
        assert!(!ok, "{name}: accepted but should be refused");
        assert!(out.contains(field), "{name}: message should name {field}: {out}");
    }
}

#[tokio::test]
async fn user_name_cannot_change() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("immutable").await.unwrap();
    let (ok, out) = kubectl_apply(&ns, &key("k", json!({"userName": "first"})));
    assert!(ok, "{out}");
    let (ok, out) = kubectl_apply(&ns, &key("k", json!({"userName": "second"})));
    assert!(!ok, "userName change accepted");
    assert!(out.contains("spec.userName is immutable"), "{out}");
}

#[tokio::test]
async fn policy_rules_need_namespaces_and_users() {
    let policy = |name: &str, rule: Value| json!({"apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy", "metadata": {"name": name}, "spec": {"rules": [rule]}});
    let ok_rule = json!({"namespaces": ["team-*"], "userPathPrefix": "/k8s/{namespace}/", "maxKeyAge": "90d"});
    let (ok, out) = kubectl_apply("default", &policy(&format!("ok-{}", rand_suffix()), ok_rule));
    assert!(ok, "{out}");
    let (ok, out) = kubectl_apply("default", &policy(&format!("bad-{}", rand_suffix()), json!({"userNames": ["x"]})));
    assert!(!ok && out.contains("a rule needs namespaces or namespaceSelector"), "{out}");
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let env = testenv::shared();
    // testenv waits until the CRDs are in /openapi/v3, so explain works at once.
    let out = env.kubectl(["explain", "iamaccesskey.spec"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["userName", "Name of the IAM user", "deletionPolicy", "rotation"] {
        assert!(text.contains(needle), "explain lacks {needle:?}:\n{text}");
    }
    let out = env.kubectl(["get", "iak", "-A"]);
    assert!(out.status.success(), "short name iak works: {}", String::from_utf8_lossy(&out.stderr));
}
