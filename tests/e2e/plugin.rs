//! The kubectl plugin `kubectl-iak` against the real API server, with the operator running:
//! each subcommand, run as a user would (a kubeconfig, the namespace flag), once through kubectl
//! itself after copying the binary onto PATH. It never prints the secret access key.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crate::support;
use iam_key_operator::crd::IamAccessKey;
use serde_json::json;
use support::*;
use testenv::TestEnv;

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-iak");

/// `kubectl-iak ARGS` with the admin kubeconfig given by flag.
fn iak(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = env.command(PLUGIN);
    cmd.env_remove("KUBECONFIG").arg("--kubeconfig").arg(env.kubeconfig_path()).args(args);
    cmd.output().expect("run kubectl-iak")
}

fn iak_ok(env: &TestEnv, args: &[&str]) -> String {
    let out = iak(env, args);
    assert!(out.status.success(), "kubectl-iak {args:?}:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The plugin installed the documented way: copied onto PATH as `kubectl-iak`.
fn installed_plugin_dir(env: &TestEnv) -> PathBuf {
    let dir = env.dir().join(format!("plugins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::copy(PLUGIN, dir.join("kubectl-iak")).expect("copy the plugin");
    dir
}

/// `kubectl iak ARGS`: kubectl finds the plugin on PATH; KUBECONFIG comes from the environment.
fn kubectl_iak(env: &TestEnv, plugin_dir: &Path, args: &[&str]) -> Output {
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = env.command(env.bin_dir().join("kubectl"));
    cmd.env("PATH", path).arg("iak").args(args);
    cmd.output().expect("run kubectl")
}

fn current(o: &IamAccessKey) -> Option<String> {
    o.status.as_ref()?.access_key_id.clone()
}

#[tokio::test]
async fn status_rotate_pause_and_resume_through_the_plugin() {
    let f = Fixture::new("plugin").await;
    f.allow_own_user(json!({"allowPause": true})).await;
    let _op = f.operator(&[]);
    let spec = json!({"secret": {"name": "app-aws"}, "rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    f.create("app", spec).await;
    let obj = f.wait_ready("app").await;
    let first = current(&obj).expect("a key");
    let (_, secret_key) = f.secret_creds("app-aws").await.expect("credentials");

    // status, run directly and through kubectl.
    let status = iak_ok(f.env, &["status", "app", "-n", &f.ns]);
    for want in [
        format!("IamAccessKey {}/app (IAM user {})", f.ns, f.user),
        first.clone(),
        "Current".into(),
        "Active".into(),
        "app-aws".into(),
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY".into(),
        format!("holds {first}"),
        "Ready:     True (reason Ready)".into(),
        format!("IamAccessKeyPolicy allow-{} rule 0 (onRevoke Keep)", f.ns),
        format!("\"userNames\":[\"{}*\"]", f.user),
        "Paused:    no".into(),
    ] {
        assert!(status.contains(&want), "status lacks {want:?}:\n{status}");
    }
    assert!(!status.contains(&secret_key), "status prints the secret access key");
    let plugins = installed_plugin_dir(f.env);
    let out = kubectl_iak(f.env, &plugins, &["status", "app", "--namespace", &f.ns]);
    assert!(out.status.success(), "kubectl iak status:\n{}", text(&out));
    assert!(text(&out).contains(&first), "kubectl iak status:\n{}", text(&out));
    assert!(!text(&out).contains(&secret_key));

    // rotate: the annotation, as `iam-key-operator rotate` sets it; the operator makes a new key.
    let out = iak_ok(f.env, &["rotate", "app", "-n", &f.ns]);
    assert!(out.contains("rotation requested at"), "{out}");
    let obj =
        f.wait_for("app", Duration::from_secs(60), "a new key", |o| current(o).is_some_and(|id| id != first)).await;
    let requested = obj.status.as_ref().and_then(|s| s.rotation.as_ref()).and_then(|r| r.requested_at.clone());
    assert!(requested.is_some(), "the request is recorded: {:?}", obj.status);
    let second = current(&obj).expect("key");
    // rotate --serial: spec.rotation.serial goes 0 -> 1, and the operator acts on it.
    let out = iak_ok(f.env, &["rotate", "app", "-n", &f.ns, "--serial"]);
    assert!(out.contains("spec.rotation.serial is now 1"), "{out}");
    assert_eq!(f.keys_api().get("app").await.expect("get").spec.rotation.expect("rotation").serial, 1);
    let obj = f
        .wait_for("app", Duration::from_secs(60), "the serial rotation", |o| {
            o.status.as_ref().and_then(|s| s.rotation.as_ref()).is_some_and(|r| r.serial == 1)
                && current(o).is_some_and(|id| id != second)
        })
        .await;
    let status = iak_ok(f.env, &["status", "app", "-n", &f.ns]);
    assert!(status.contains("serial 1, last rotated"), "{status}");
    assert!(status.contains(&current(&obj).expect("key")), "{status}");

    // pause and resume flip the annotation, and the operator follows.
    let out = kubectl_iak(f.env, &plugins, &["pause", "app", "-n", &f.ns]);
    assert!(out.status.success(), "kubectl iak pause:\n{}", text(&out));
    let paused = f.keys_api().get("app").await.expect("get");
    assert_eq!(
        paused.metadata.annotations.unwrap_or_default().get("iam.keyop.dev/paused").map(String::as_str),
        Some("true")
    );
    f.wait_reason("app", "Paused").await;
    let status = iak_ok(f.env, &["status", "app", "-n", &f.ns]);
    assert!(status.contains("Paused:    yes") && status.contains("reason Paused"), "{status}");
    iak_ok(f.env, &["resume", "app", "-n", &f.ns]);
    let resumed = f.keys_api().get("app").await.expect("get");
    assert!(!resumed.metadata.annotations.unwrap_or_default().contains_key("iam.keyop.dev/paused"));
    f.wait_ready("app").await;
    assert!(iak_ok(f.env, &["status", "app", "-n", &f.ns]).contains("Paused:    no"));
}

#[tokio::test]
async fn why_names_the_rule_that_allows_and_says_why_others_refuse() {
    let f = Fixture::new("plugin-why").await;
    // A second policy: users under an IAM path, for this namespace.
    f.allow(&format!("paths-{}", f.ns), json!({"namespaces": [f.ns], "userPathPrefix": "/k8s/{namespace}/"})).await;

    let out = iak(f.env, &["why", "-n", &f.ns, "--user", &format!("/other/{}", f.user)]);
    assert!(out.status.success(), "allowed, exit 0:\n{}", text(&out));
    let report = text(&out);
    assert!(
        report.starts_with(&format!("allowed: namespace {:?} may manage access keys of IAM user {:?}", f.ns, f.user))
    );
    assert!(
        report.contains(&format!("granted by IamAccessKeyPolicy allow-{} rule 0 (onRevoke Keep)", f.ns)),
        "{report}"
    );
    assert!(report.contains(&format!("IamAccessKeyPolicy allow-{} rule 0: allows", f.ns)), "{report}");
    assert!(
        report.contains("adopt not allowed, creationPolicy Merge not allowed"),
        "the takeover permissions: {report}"
    );
    assert!(
        report.contains(&format!(
            "IamAccessKeyPolicy paths-{} rule 0: does not allow: path \"/other/\" is not under userPathPrefix \"/k8s/{}/\"",
            f.ns, f.ns
        )),
        "{report}"
    );

    // Another user: refused, and each rule says why.
    let out = iak(f.env, &["why", "--namespace", &f.ns, "--user", "someone-else"]);
    assert_eq!(out.status.code(), Some(1), "refused, exit 1:\n{}", text(&out));
    let report = text(&out);
    assert!(report.contains("undecided") || report.contains("refused"), "{report}");
    assert!(
        report.contains(&format!(
            "allow-{} rule 0: does not allow: user \"someone-else\" matches none of userNames",
            f.ns
        )),
        "{report}"
    );
    assert!(report.contains(&format!("paths-{} rule 0: depends on the user's IAM path or tags", f.ns)), "{report}");
    let out = iak(f.env, &["why", "--namespace", &f.ns, "--user", "/elsewhere/someone-else"]);
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out);
    assert!(report.starts_with("refused: no IamAccessKeyPolicy allows namespace"), "{report}");
    // Another namespace: the rules are not about it.
    let out = iak(f.env, &["why", "-n", "kube-system", "--user", &f.user]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out)
            .contains(&format!("allow-{} rule 0: does not apply: namespace \"kube-system\" matches neither", f.ns)),
        "{}",
        text(&out)
    );
}
