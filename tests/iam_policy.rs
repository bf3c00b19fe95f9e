//! The operator's own IAM permissions (`deploy/iam-policy.json`), tested against an IAM
//! endpoint that enforces signatures and policies (moto with INITIAL_NO_AUTH_ACTION_COUNT).

mod support;

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use aws_credential_types::Credentials;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};
use support::*;

/// A moto of our own that enforces IAM after the setup calls.
struct EnforcingMoto {
    child: Child,
    url: String,
}

impl Drop for EnforcingMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn iam_client(url: &str, id: &str, secret: &str) -> aws_sdk_iam::Client {
    let config = aws_sdk_iam::Config::builder()
        .behavior_version(aws_sdk_iam::config::BehaviorVersion::latest())
        .region(aws_sdk_iam::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .credentials_provider(Credentials::new(id, secret, None, None, "test"))
        .build();
    aws_sdk_iam::Client::from_conf(config)
}

/// The shipped policy, with `Resource` widened to `*`: moto evaluates IAM actions against the
/// resource `*` only, so a path-scoped Resource would deny everything there. What this proves
/// is the action list: everything the operator calls is in it.
fn shipped_policy_for_moto(drop_action: Option<&str>) -> Value {
    let path = testenv::repo_root().join("deploy/iam-policy.json");
    let mut doc: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for statement in doc["Statement"].as_array_mut().unwrap() {
        statement["Resource"] = json!("*");
        if let Some(action) = drop_action {
            statement["Action"].as_array_mut().unwrap().retain(|a| a != action);
        }
    }
    doc
}

/// Start moto enforcing after setup, create the managed user and an operator identity holding
/// `policy`. Returns the server and the operator's credentials.
async fn enforcing_moto(managed_user: &str, policy: Value) -> (EnforcingMoto, String, String) {
    let moto = std::process::Command::new(testenv::repo_root().join("hack/moto.sh")).arg("--path").output().unwrap();
    let moto = String::from_utf8(moto.stdout).unwrap().trim().to_string();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    // Exactly the four setup calls below run unauthenticated; every later call is checked.
    let child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = EnforcingMoto { child, url: format!("http://127.0.0.1:{port}") };
    for _ in 0..100 {
        if reqwest::get(format!("{}/moto-api/", server.url)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = iam_client(&server.url, "testing", "testing");
    root.create_user().user_name(managed_user).path("/k8s/").send().await.unwrap();
    root.create_user().user_name("iam-key-operator").send().await.unwrap();
    root.put_user_policy()
        .user_name("iam-key-operator")
        .policy_name("operator")
        .policy_document(policy.to_string())
        .send()
        .await
        .unwrap();
    let key = root.create_access_key().user_name("iam-key-operator").send().await.unwrap();
    let key = key.access_key().unwrap();
    // From here on, anonymous calls are refused: the enforcement is on.
    assert!(root.list_users().send().await.is_err(), "moto should enforce IAM now");
    (server, key.access_key_id().to_string(), key.secret_access_key().to_string())
}

fn operator_env<'a>(url: &'a str, id: &'a str, secret: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("AWS_ENDPOINT_URL_IAM", url),
        ("AWS_ENDPOINT_URL_STS", url),
        ("AWS_ACCESS_KEY_ID", id),
        ("AWS_SECRET_ACCESS_KEY", secret),
    ]
}

#[test]
fn the_shipped_policy_is_scoped_to_a_user_path_prefix() {
    let doc: Value =
        serde_json::from_slice(&std::fs::read(testenv::repo_root().join("deploy/iam-policy.json")).unwrap()).unwrap();
    for statement in doc["Statement"].as_array().unwrap() {
        let resource = statement["Resource"].as_str().unwrap();
        assert!(
            resource.starts_with("arn:aws:iam::")
                && resource.contains(":user/")
                && resource.ends_with("/*")
                && resource != "*"
        );
        for action in statement["Action"].as_array().unwrap() {
            assert!(action.as_str().unwrap().starts_with("iam:"), "only IAM actions: {action}");
        }
    }
}

#[tokio::test]
async fn everything_works_with_exactly_the_shipped_policy() {
    let f = Fixture::new("iampolicy").await;
    let (moto, id, secret) = enforcing_moto(&f.user, shipped_policy_for_moto(None)).await;
    let op = f.operator(&operator_env(&moto.url, &id, &secret));
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let first = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();

    let inactive = json!({"spec": {"keyStatus": "Inactive"}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&inactive)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "Inactive", |o| {
        o.status.as_ref().and_then(|s| s.key_status).is_some_and(|s| s.as_str() == "Inactive")
    })
    .await;
    let rotate = json!({"spec": {"keyStatus": "Active", "rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "rotated, old key deleted", |o| {
        o.status.as_ref().is_some_and(|s| s.access_key_id.as_deref() != Some(first.as_str()) && s.keys.len() == 1)
    })
    .await;
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(!op.log().contains("AccessDenied") && !op.log().contains("not authorized"), "no call was refused");
    assert!(
        op.iam_calls(&["CreateAccessKey", "UpdateAccessKey", "DeleteAccessKey", "GetAccessKeyLastUsed", "UntagUser"])
            .await
            >= 5
    );
}

#[tokio::test]
async fn a_missing_permission_surfaces_as_not_authorized_and_nothing_else_happens() {
    let f = Fixture::new("iamdeny").await;
    let (moto, id, secret) = enforcing_moto(&f.user, shipped_policy_for_moto(Some("iam:CreateAccessKey"))).await;
    let op = f.operator(&operator_env(&moto.url, &id, &secret));
    f.create("app", json!({})).await;
    let obj = f.wait_reason("app", "NotAuthorized").await;
    let message = ready(&obj).unwrap().2;
    assert!(message.contains("iam:CreateAccessKey"), "names the missing permission: {message}");
    let calls = op.metrics().await;
    assert!(!calls.contains("operation=\"CreateAccessKey\",outcome=\"ok\""), "no key was created");
}
