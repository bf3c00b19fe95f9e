//! Upgrades with Helm against a real API server (docs/upgrading.md): the chart's CRDs are
//! templates, so `helm upgrade` changes the schema the API server serves while existing objects
//! keep working; `helm uninstall` with `crds.keep` leaves the CRDs and the objects; and a release
//! installed by a chart that had `crds/` takes the CRDs over after the documented commands.
//!
//! Its own environment without CRDs (the shared one has them from `crds/`, not from a release).
//! No kubelet runs, so the Deployment's Pods never start: only the API objects matter here.

use std::path::{Path, PathBuf};

use crate::support;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use support::{kubectl_ok, text};
use testenv::TestEnv;

/// The release and namespace docs/upgrading.md uses in its commands, so the test runs them as
/// written.
const RELEASE: &str = "iam-key-operator";
const RELEASE_NS: &str = "iam-key-operator";
const KEYS_CRD: &str = "iamaccesskeys.iam.keyop.dev";
const POLICIES_CRD: &str = "iamaccesskeypolicies.iam.keyop.dev";

fn chart_dir() -> PathBuf {
    testenv::repo_root().join("charts/iam-key-operator")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn helm_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = env.helm(args);
    assert!(out.status.success(), "helm {args:?}:\n{}", text(&out));
    text(&out)
}

fn upgrade(env: &TestEnv, chart: &Path) -> std::process::Output {
    env.helm([
        "upgrade",
        RELEASE,
        chart.to_str().expect("utf-8"),
        "--namespace",
        RELEASE_NS,
        "--set",
        "clusterName=upgrade-test",
    ])
}

/// The first ```sh block of docs/upgrading.md under `heading`.
fn documented_commands(heading: &str) -> String {
    let doc = std::fs::read_to_string(testenv::repo_root().join("docs/upgrading.md")).expect("docs/upgrading.md");
    let section = doc.split(heading).nth(1).unwrap_or_else(|| panic!("docs/upgrading.md has no {heading:?}"));
    let block = section.split("```sh\n").nth(1).expect("a sh block");
    block.split("```").next().expect("closed block").to_string()
}

/// The description and validation of `spec.userName` in the IamAccessKey CRD as served.
async fn user_name_schema(crds: &Api<CustomResourceDefinition>) -> (Option<String>, Option<i64>) {
    let crd = crds.get(KEYS_CRD).await.expect("get CRD");
    let schema = crd.spec.versions[0].schema.clone().expect("schema").open_api_v3_schema.expect("openAPIV3Schema");
    let spec = schema.properties.expect("properties")["spec"].clone();
    let user = spec.properties.expect("spec properties")["userName"].clone();
    (user.description, user.max_length)
}

fn iak(name: &str, user: &str) -> String {
    serde_json::json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
        "metadata": {"name": name}, "spec": {"userName": user},
    })
    .to_string()
}

fn kubectl_stdin(env: &TestEnv, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut cmd = env.command(env.bin_dir().join("kubectl"));
    cmd.args(args).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    cmd.stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl");
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write");
    child.wait_with_output().expect("kubectl output")
}

#[tokio::test]
async fn a_chart_with_crds_dir_is_taken_over_then_helm_upgrade_changes_the_served_schema_and_uninstall_keeps_the_crds()
{
    let opts = testenv::Options::default().controller_manager(false);
    let env: &'static TestEnv = Box::leak(Box::new(TestEnv::start_async(opts).await.expect("testenv without CRDs")));
    let client = env.kube_client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    assert!(crds.get_opt(KEYS_CRD).await.expect("get").is_none(), "this environment must start without the CRDs");
    let work = env.dir().join("upgrade-charts");

    // 1. The chart as it was: CRDs in crds/, which Helm creates once, without ownership metadata.
    let old_chart = work.join("old/iam-key-operator");
    copy_dir(&chart_dir(), &old_chart);
    std::fs::remove_file(old_chart.join("templates/crds.yaml")).expect("rm template");
    std::fs::create_dir_all(old_chart.join("crds")).expect("mkdir crds");
    for name in [KEYS_CRD, POLICIES_CRD] {
        let file = format!("{name}.yaml");
        std::fs::copy(testenv::repo_root().join("crds").join(&file), old_chart.join("crds").join(&file)).expect("cp");
    }
    let old = old_chart.to_str().expect("utf-8");
    helm_ok(
        env,
        &["install", RELEASE, old, "-n", RELEASE_NS, "--create-namespace", "--set", "clusterName=upgrade-test"],
    );
    let installed = crds.get(KEYS_CRD).await.expect("CRD from crds/");
    assert!(!installed.metadata.annotations.unwrap_or_default().contains_key("meta.helm.sh/release-name"));

    // An object made under the old chart.
    let ns = env.fresh_namespace("upgrade").await.expect("namespace");
    let created = kubectl_stdin(env, &["create", "-n", &ns, "-f", "-"], &iak("kept", "upgrade-user"));
    assert!(created.status.success(), "{}", text(&created));

    // 2. Helm does not take over CRDs that do not name the release...
    let refused = upgrade(env, &chart_dir());
    assert!(!refused.status.success(), "helm upgrade adopted CRDs without ownership metadata:\n{}", text(&refused));
    assert!(text(&refused).contains("invalid ownership metadata"), "{}", text(&refused));
    // ...and does after the commands docs/upgrading.md gives (without their final helm upgrade).
    let commands: String = documented_commands("### From a chart that had `crds/`")
        .lines()
        .filter(|l| !l.starts_with("helm "))
        .collect::<Vec<_>>()
        .join("\n");
    let mut bash = env.command("bash");
    let path = format!("{}:{}", env.bin_dir().display(), std::env::var("PATH").unwrap_or_default());
    bash.args(["-euo", "pipefail", "-c", &commands]).env("PATH", path);
    let out = bash.output().expect("bash");
    assert!(out.status.success(), "the documented commands failed:\n{commands}\n{}", text(&out));
    helm_ok(env, &["upgrade", RELEASE, chart_dir().to_str().expect("utf-8"), "-n", RELEASE_NS, "--reuse-values"]);
    for name in [KEYS_CRD, POLICIES_CRD] {
        let crd = crds.get(name).await.expect("CRD");
        let annotations = crd.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.get("helm.sh/resource-policy").map(String::as_str), Some("keep"), "{name}");
        assert_eq!(annotations.get("meta.helm.sh/release-name").map(String::as_str), Some(RELEASE), "{name}");
    }
    let (description, max_length) = user_name_schema(&crds).await;
    assert_eq!(max_length, Some(64));

    // 3. A later chart changes a description and a validation of spec.userName: helm upgrade
    // makes the API server serve them.
    let new_chart = work.join("new/iam-key-operator");
    copy_dir(&chart_dir(), &new_chart);
    let template_path = new_chart.join("templates/crds.yaml");
    let template = std::fs::read_to_string(&template_path).expect("template");
    let old_description = description.expect("description");
    let first_line = old_description.lines().next().expect("a line").trim().to_string();
    assert!(template.contains(&first_line), "the template holds {first_line:?}");
    let marker = "Upgraded description: at most 20 characters.";
    let changed = template.replacen(&first_line, &format!("{marker} {first_line}"), 1).replacen(
        "maxLength: 64\n                minLength: 1\n                pattern: ^[\\w+=,.@-]+$",
        "maxLength: 20\n                minLength: 1\n                pattern: ^[\\w+=,.@-]+$",
        1,
    );
    assert_ne!(
        changed.matches("maxLength: 20").count(),
        template.matches("maxLength: 20").count(),
        "validation edited"
    );
    std::fs::write(&template_path, changed).expect("write template");
    let out = upgrade(env, &new_chart);
    assert!(out.status.success(), "helm upgrade to the changed CRDs:\n{}", text(&out));
    let (description, max_length) = user_name_schema(&crds).await;
    assert!(description.unwrap_or_default().starts_with(marker), "the new description is served");
    assert_eq!(max_length, Some(20), "the new validation is served");
    // The API server applies it: a name the old schema allowed is refused now (server-side dry
    // run: nothing is stored)...
    let long = "a-user-name-longer-than-twenty";
    let refused = kubectl_stdin(env, &["create", "--dry-run=server", "-n", &ns, "-f", "-"], &iak("new", long));
    assert!(!refused.status.success(), "the new validation does not apply:\n{}", text(&refused));
    assert!(text(&refused).contains("spec.userName"), "{}", text(&refused));
    // ...while the existing object reads and updates as before.
    let got = kubectl_ok(env, &["get", "iak", "kept", "-n", &ns, "-o", "jsonpath={.spec.userName}"]);
    assert_eq!(got, "upgrade-user");
    kubectl_ok(env, &["label", "iak", "kept", "-n", &ns, "upgraded=yes"]);
    kubectl_ok(env, &["annotate", "iak", "kept", "-n", &ns, "iam.keyop.dev/paused=true"]);

    // 4. helm uninstall with crds.keep (the default) leaves the CRDs and the object.
    let out = helm_ok(env, &["uninstall", RELEASE, "-n", RELEASE_NS]);
    assert!(out.contains("kept"), "helm says what it kept:\n{out}");
    for name in [KEYS_CRD, POLICIES_CRD] {
        let crd = crds.get_opt(name).await.expect("get");
        assert!(crd.is_some_and(|c| c.metadata.deletion_timestamp.is_none()), "{name} was deleted by helm uninstall");
    }
    let labels = kubectl_ok(env, &["get", "iak", "kept", "-n", &ns, "-o", "jsonpath={.metadata.labels.upgraded}"]);
    assert_eq!(labels, "yes", "the IamAccessKey survives the uninstall");
}
