//! The chart's optional ValidatingAdmissionPolicy (`admissionPolicy.enabled`) on the local API
//! server: identities other than the operator's ServiceAccount cannot remove the finalizer of a
//! live IamAccessKey, pause one where the namespace does not allow it, or write its status; the
//! operator's own identity can, and the operator works unhindered behind it.
//!
//! The policy is rendered for the release the other tests' operator identity comes from
//! (`support::identity::chart`: release `iko` in `iko-system`), and bound only to namespaces
//! labelled `iko-test/admission=on`. The tenant is a ServiceAccount with every verb on
//! IamAccessKeys and their status in its namespace (so that refusals come from the policy, not
//! from RBAC), reached through impersonation; the operator through its own token.

use crate::support;
use std::{
    process::Output,
    sync::OnceLock,
    time::{Duration, Instant},
};

use iam_key_operator::crd::IamAccessKey;
use serde_json::{Value, json};
use support::{Fixture, Operator, identity, kubectl_ok, text};
use testenv::TestEnv;

const RELEASE: &str = "iko";
const RELEASE_NS: &str = "iko-system";
const SELECTOR: (&str, &str) = ("iko-test/admission", "on");
const FINALIZER: &str = "iam.keyop.dev/cleanup";
const PAUSED: &str = "iam.keyop.dev/paused";
const PAUSE_LABEL: &str = "iam.keyop.dev/pause-allowed";

fn render(env: &TestEnv, args: &[&str]) -> Output {
    let chart = testenv::repo_root().join("charts/iam-key-operator");
    let mut all =
        vec!["template", RELEASE, chart.to_str().unwrap(), "--namespace", RELEASE_NS, "--set", "clusterName=test"];
    all.extend_from_slice(args);
    env.helm(all)
}

fn documents(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "helm template failed:\n{}", text(out));
    serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|d: &Value| !d.is_null())
        .collect()
}

fn admission_objects(docs: &[Value]) -> Vec<&Value> {
    docs.iter().filter(|d| d["kind"].as_str().is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))).collect()
}

fn apply_json(env: &TestEnv, name: &str, doc: &Value) {
    let path = env.dir().join(format!("admission-{name}.json"));
    std::fs::write(&path, doc.to_string()).unwrap();
    kubectl_ok(env, &["apply", "-f", path.to_str().unwrap()]);
}

/// The chart's policy and binding, installed once (as admin), with the operator's identity.
fn install_policy(env: &'static TestEnv) -> &'static identity::Identity {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let operator = identity::chart(env);
    INSTALLED.get_or_init(|| {
        let selector = format!("admissionPolicy.namespaceSelector.matchLabels.{}={}", SELECTOR.0, SELECTOR.1);
        let docs = documents(&render(env, &["--set", "admissionPolicy.enabled=true", "--set", &selector]));
        let objects: Vec<Value> = admission_objects(&docs).into_iter().cloned().collect();
        assert_eq!(objects.len(), 2, "a policy and its binding");
        apply_json(env, "policy", &json!({"apiVersion": "v1", "kind": "List", "items": objects}));
    });
    operator
}

/// A fresh namespace under the policy (or not), with the tenant ServiceAccount `tenant`.
async fn tenant_namespace(env: &'static TestEnv, prefix: &str, guarded: bool) -> String {
    let ns = env.fresh_namespace(prefix).await.unwrap();
    if guarded {
        kubectl_ok(env, &["label", "namespace", &ns, &format!("{}={}", SELECTOR.0, SELECTOR.1)]);
    }
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "tenant", "namespace": ns},
         "rules": [{"apiGroups": ["iam.keyop.dev"], "resources": ["iamaccesskeys", "iamaccesskeys/status"], "verbs": ["*"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "tenant", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
         "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}]},
    ]});
    apply_json(env, &format!("tenant-{ns}"), &objects);
    ns
}

/// `kubectl` as the namespace's tenant (impersonated by the admin).
fn as_tenant(env: &TestEnv, ns: &str, args: &[&str]) -> Output {
    let who = format!("--as=system:serviceaccount:{ns}:tenant");
    let mut all = vec![who.as_str(), "--namespace", ns];
    all.extend_from_slice(args);
    env.kubectl(all)
}

/// `kubectl` with the operator's own ServiceAccount token.
fn as_operator(env: &TestEnv, operator: &identity::Identity, ns: &str, args: &[&str]) -> Output {
    let mut cmd = env.command(env.bin_dir().join("kubectl"));
    cmd.arg("--kubeconfig").arg(&operator.kubeconfig).args(["--namespace", ns]).args(args);
    cmd.output().expect("run kubectl")
}

fn key(name: &str, finalizers: &[&str], annotations: Value) -> Value {
    json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
        "metadata": {"name": name, "finalizers": finalizers, "annotations": annotations},
        "spec": {"userName": "app"},
    })
}

fn create(env: &TestEnv, ns: &str, doc: &Value) -> Output {
    let path = env.dir().join(format!("key-{ns}-{}.json", doc["metadata"]["name"].as_str().unwrap()));
    std::fs::write(&path, doc.to_string()).unwrap();
    env.kubectl(["create", "--namespace", ns, "-f", path.to_str().unwrap()])
}

fn merge(patch: Value) -> [String; 4] {
    ["--type".into(), "merge".into(), "-p".into(), patch.to_string()]
}

fn patch_args<'a>(name: &'a str, patch: &'a [String; 4], status: bool) -> Vec<&'a str> {
    let mut args = vec!["patch", "iamaccesskey", name];
    if status {
        args.push("--subresource=status");
    }
    args.extend(patch.iter().map(String::as_str));
    args
}

fn assert_refused(out: &Output, says: &str) {
    let message = text(out);
    assert!(!out.status.success(), "accepted, but the policy should refuse it");
    assert!(message.contains("ValidatingAdmissionPolicy") && message.contains(says), "{message}");
}

fn assert_allowed(out: &Output) {
    assert!(out.status.success(), "refused: {}", text(out));
}

/// The policy takes effect a moment after it is created: wait until it refuses the tenant.
async fn wait_enforced(env: &TestEnv, ns: &str) {
    let name = "probe";
    assert_allowed(&create(env, ns, &key(name, &[], json!({}))));
    let pause = merge(json!({"metadata": {"annotations": {PAUSED: "true"}}}));
    let unpause = merge(json!({"metadata": {"annotations": {PAUSED: null}}}));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = as_tenant(env, ns, &patch_args(name, &pause, false));
        if !out.status.success() {
            assert_refused(&out, "pausing");
            break;
        }
        kubectl_ok(env, &[&["--namespace", ns][..], &patch_args(name, &unpause, false)].concat());
        assert!(Instant::now() < deadline, "the admission policy did not take effect within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kubectl_ok(env, &["delete", "iamaccesskey", name, "--namespace", ns]);
}

#[test]
fn the_policy_is_off_by_default_and_exempts_exactly_the_operators_service_account() {
    let env = testenv::shared();
    assert!(admission_objects(&documents(&render(env, &[]))).is_empty(), "off by default");
    let docs = documents(&render(env, &["--set", "admissionPolicy.enabled=true"]));
    let objects = admission_objects(&docs);
    assert_eq!(objects.len(), 2);
    let policy = objects.iter().find(|o| o["kind"] == "ValidatingAdmissionPolicy").unwrap();
    assert_eq!(policy["apiVersion"], "admissionregistration.k8s.io/v1");
    let condition = policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap();
    assert_eq!(condition, "request.userInfo.username != 'system:serviceaccount:iko-system:iko-iam-key-operator'");
    let binding = objects.iter().find(|o| o["kind"] == "ValidatingAdmissionPolicyBinding").unwrap();
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"]);
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]));
    assert!(binding["spec"]["matchResources"].is_null(), "all namespaces by default");

    // Another ServiceAccount name, a dry run, a scope.
    let docs = documents(&render(
        env,
        &[
            "--set",
            "admissionPolicy.enabled=true",
            "--set",
            "serviceAccount.name=keys",
            "--set",
            "admissionPolicy.validationActions={Warn,Audit}",
            "--set",
            "admissionPolicy.namespaceSelector.matchLabels.tenant=yes",
        ],
    ));
    let objects = admission_objects(&docs);
    let policy = objects.iter().find(|o| o["kind"] == "ValidatingAdmissionPolicy").unwrap();
    assert!(policy["spec"]["matchConditions"][0]["expression"].as_str().unwrap().ends_with(":iko-system:keys'"));
    let binding = objects.iter().find(|o| o["kind"] == "ValidatingAdmissionPolicyBinding").unwrap();
    assert_eq!(binding["spec"]["validationActions"], json!(["Warn", "Audit"]));
    assert_eq!(binding["spec"]["matchResources"]["namespaceSelector"], json!({"matchLabels": {"tenant": "yes"}}));
    // The schema refuses what the API server would.
    let out = render(env, &["--set", "admissionPolicy.validationActions={Block}"]);
    assert!(!out.status.success() && text(&out).contains("validationActions"), "{}", text(&out));
}

#[tokio::test]
async fn tenants_cannot_remove_the_finalizer_of_a_live_resource_but_the_operator_can() {
    let env = testenv::shared();
    let operator = install_policy(env);
    let ns = tenant_namespace(env, "adm-final", true).await;
    wait_enforced(env, &ns).await;
    assert_allowed(&create(env, &ns, &key("app", &[FINALIZER], json!({}))));
    let drop_finalizers = merge(json!({"metadata": {"finalizers": null}}));
    let add_finalizer = merge(json!({"metadata": {"finalizers": [FINALIZER]}}));

    assert_refused(
        &as_tenant(env, &ns, &patch_args("app", &drop_finalizers, false)),
        "finalizer iam.keyop.dev/cleanup",
    );
    // Also by replacing the list with another finalizer.
    let other = merge(json!({"metadata": {"finalizers": ["example.com/other"]}}));
    assert_refused(&as_tenant(env, &ns, &patch_args("app", &other, false)), "finalizer iam.keyop.dev/cleanup");
    // Other changes stay the tenant's to make.
    assert_allowed(&as_tenant(env, &ns, &["label", "iamaccesskey", "app", "team=billing"]));

    // The operator's own identity may remove it.
    assert_allowed(&as_operator(env, operator, &ns, &patch_args("app", &drop_finalizers, false)));
    assert_allowed(&as_operator(env, operator, &ns, &patch_args("app", &add_finalizer, false)));

    // Once the resource is being deleted, removing it is allowed (an admin releasing a deletion
    // that cannot complete).
    assert_allowed(&as_tenant(env, &ns, &["delete", "iamaccesskey", "app", "--wait=false"]));
    assert_allowed(&as_tenant(env, &ns, &patch_args("app", &drop_finalizers, false)));
    let gone = env.kubectl(["get", "iamaccesskey", "app", "--namespace", &ns]);
    assert!(!gone.status.success(), "deleted once the finalizer is gone");

    // Namespaces outside the binding's selector are not checked.
    let free = tenant_namespace(env, "adm-free", false).await;
    assert_allowed(&create(env, &free, &key("app", &[FINALIZER], json!({}))));
    assert_allowed(&as_tenant(env, &free, &patch_args("app", &drop_finalizers, false)));
}

#[tokio::test]
async fn tenants_may_pause_only_where_the_namespace_allows_it() {
    let env = testenv::shared();
    let operator = install_policy(env);
    let ns = tenant_namespace(env, "adm-pause", true).await;
    wait_enforced(env, &ns).await;
    let pause = merge(json!({"metadata": {"annotations": {PAUSED: "true"}}}));
    let unpause = merge(json!({"metadata": {"annotations": {PAUSED: null}}}));

    // Neither at creation nor later.
    let path = env.dir().join(format!("paused-{ns}.json"));
    std::fs::write(&path, key("paused", &[], json!({PAUSED: "true"})).to_string()).unwrap();
    assert_refused(&as_tenant(env, &ns, &["create", "-f", path.to_str().unwrap()]), PAUSE_LABEL);
    assert_allowed(&create(env, &ns, &key("app", &[], json!({}))));
    assert_refused(&as_tenant(env, &ns, &patch_args("app", &pause, false)), PAUSE_LABEL);
    // Another value than "true" is no pause.
    let not_a_pause = merge(json!({"metadata": {"annotations": {PAUSED: "false"}}}));
    assert_allowed(&as_tenant(env, &ns, &patch_args("app", &not_a_pause, false)));

    // A platform admin labels the namespace: allowed.
    kubectl_ok(env, &["label", "namespace", &ns, &format!("{PAUSE_LABEL}=true")]);
    assert_allowed(&as_tenant(env, &ns, &patch_args("app", &pause, false)));
    // The label removed: the paused resource stays editable and can be unpaused, not paused again.
    kubectl_ok(env, &["label", "namespace", &ns, &format!("{PAUSE_LABEL}-")]);
    assert_allowed(&as_tenant(env, &ns, &["label", "iamaccesskey", "app", "team=billing"]));
    assert_allowed(&as_tenant(env, &ns, &patch_args("app", &unpause, false)));
    assert_refused(&as_tenant(env, &ns, &patch_args("app", &pause, false)), PAUSE_LABEL);
    // The operator is not held to it (it never pauses anything; the exemption is by identity).
    assert_allowed(&as_operator(env, operator, &ns, &patch_args("app", &pause, false)));
}

#[tokio::test]
async fn only_the_operator_writes_status() {
    let env = testenv::shared();
    let operator = install_policy(env);
    let ns = tenant_namespace(env, "adm-status", true).await;
    wait_enforced(env, &ns).await;
    assert_allowed(&create(env, &ns, &key("app", &[], json!({}))));
    let forged = merge(json!({"status": {"pendingCreate": {"since": "2020-01-01T00:00:00Z", "existingKeyIds": []}}}));
    assert_refused(&as_tenant(env, &ns, &patch_args("app", &forged, true)), "status");
    // The operator's RBAC has `patch` on the status subresource only (kubectl would `get` it
    // first): a client with its token.
    let kubeconfig = kube::config::Kubeconfig::read_from(&operator.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
    let api: kube::Api<IamAccessKey> = kube::Api::namespaced(kube::Client::try_from(config).unwrap(), &ns);
    let written = json!({"status": {"foreignKeys": 1}});
    api.patch_status("app", &Default::default(), &kube::api::Patch::Merge(&written))
        .await
        .expect("the operator writes status");
}

#[tokio::test]
async fn the_operator_works_unhindered_behind_the_policy() {
    let env = testenv::shared();
    install_policy(env);
    let f = Fixture::new("adm-op").await;
    kubectl_ok(env, &["label", "namespace", &f.ns, &format!("{}={}", SELECTOR.0, SELECTOR.1)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Wait until the policy covers this namespace: the admin (not the operator) may not write status.
    assert_allowed(&create(env, &f.ns, &key("probe", &[], json!({}))));
    loop {
        let out = env.kubectl(
            [
                &["--namespace", f.ns.as_str()][..],
                &patch_args("probe", &merge(json!({"status": {"foreignKeys": 1}})), true),
            ]
            .concat(),
        );
        if !out.status.success() {
            assert_refused(&out, "status");
            break;
        }
        assert!(Instant::now() < deadline, "the admission policy did not take effect within 60 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    kubectl_ok(env, &["delete", "iamaccesskey", "probe", "--namespace", &f.ns]);

    // Finalizer, status, Secret, deletion: every write of the operator passes (and its log has no
    // refusal, which the launcher checks when it stops).
    let _op = Operator::start(f.env, &f.ns, &[], &[]);
    f.create("app", json!({})).await;
    let id = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    assert!(f.iam_keys().await.contains_key(&id));
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty());
}
