//! Secret templates against real consumers: the AWS CLI reads a rendered credentials and config
//! file, boto3 the same profile and a rendered JSON document, Python recomputes the SES SMTP
//! password; each key authenticates as the user's ARN (STS GetCallerIdentity at moto). A template
//! that does not render never reaches IAM; a layout change rewrites the same key where the
//! Secret still holds it and issues a new key where it does not.

use crate::support;
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use iam_key_operator::crd::IamAccessKey;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

/// The venv's `aws` (and its `python`, which has boto3): installed by `make tools`.
fn aws_cli() -> PathBuf {
    let script = testenv::repo_root().join("hack/moto.sh");
    let out = Command::new("bash").arg(&script).arg("--aws-path").output().expect("run hack/moto.sh");
    assert!(out.status.success(), "the AWS CLI is not installed: run `make tools` ({})", text(&out));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A client's process: nothing of the test environment's own AWS identity, only what the
/// rendered Secret gives it, and moto as every endpoint.
fn client(f: &Fixture, program: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_ENDPOINT_URL", f.env.iam_endpoint())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("credentials"))
        .env("AWS_CONFIG_FILE", dir.join("config"))
        .current_dir(dir);
    cmd
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("start the client");
    assert!(out.status.success(), "{cmd:?} failed:\n{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn user_arn(f: &Fixture, user: &str) -> String {
    let out = f.env.iam_client().get_user().user_name(user).send().await.expect("GetUser");
    out.user().expect("user").arn().to_string()
}

async fn secret_data(f: &Fixture, name: &str) -> BTreeMap<String, String> {
    let s = f.secrets().get(name).await.expect("the Secret");
    s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8"))).collect()
}

fn current(o: &IamAccessKey) -> Option<String> {
    o.status.as_ref()?.access_key_id.clone()
}

async fn patch_spec(f: &Fixture, name: &str, spec: serde_json::Value) {
    let patch = json!({"spec": spec});
    f.keys_api().patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch the spec");
}

const CONSUMERS: &str = r#"{
  "credentials": "[{{ profile }}]\naws_access_key_id = {{ access_key_id }}\naws_secret_access_key = {{ secret_access_key }}\n",
  "config": "[profile {{ profile }}]\nregion = eu-west-1\noutput = json\n",
  "AWS_REGION": "eu-west-1",
  "AWS_DEFAULT_REGION": "eu-west-1",
  "aws.json": "{{ {'AccessKeyId': access_key_id, 'SecretAccessKey': secret_access_key, 'Arn': user_arn, 'Account': account_id, 'Region': 'eu-west-1'} | tojson }}",
  "SMTP_USERNAME": "{{ access_key_id }}",
  "SMTP_PASSWORD": "{{ ses_smtp_password(secret_access_key, 'eu-west-1') }}",
  "STATIC": "from the template"
}"#;

/// boto3 with the rendered profile and with the rendered JSON; Python's hmac recomputes the
/// SMTP password from the secret with AWS's documented algorithm.
const PYTHON_CONSUMER: &str = r#"
import base64, hashlib, hmac, json, os, sys
import boto3
endpoint = os.environ["AWS_ENDPOINT_URL"]
session = boto3.Session(profile_name="ci")
by_profile = session.client("sts", endpoint_url=endpoint).get_caller_identity()["Arn"]
doc = json.load(open("aws.json"))
by_json = boto3.client("sts", endpoint_url=endpoint, region_name=doc["Region"],
                       aws_access_key_id=doc["AccessKeyId"],
                       aws_secret_access_key=doc["SecretAccessKey"]).get_caller_identity()
def sign(key, msg):
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()
sig = ("AWS4" + doc["SecretAccessKey"]).encode("utf-8")
for msg in ["11111111", "eu-west-1", "ses", "aws4_request", "SendRawEmail"]:
    sig = sign(sig, msg)
smtp = base64.b64encode(bytes([4]) + sig).decode()
print(json.dumps({"profile_arn": by_profile, "profile_region": session.region_name,
                  "json_arn": by_json["Arn"], "json_account": by_json["Account"],
                  "doc_arn": doc["Arn"], "doc_account": doc["Account"], "smtp": smtp}))
"#;

#[tokio::test]
async fn rendered_secrets_work_with_the_aws_cli_boto3_and_json_consumers() {
    let f = Fixture::new("tpl").await;
    let op = f.operator(&[]);
    let data: serde_json::Value = serde_json::from_str(CONSUMERS).unwrap();
    f.create("app", json!({"secret": {"profile": "ci", "template": {"data": data}}})).await;
    let obj = f.wait_ready("app").await;
    let id = current(&obj).expect("a key");
    let arn = user_arn(&f, &f.user).await;
    let account = arn.split(':').nth(4).unwrap().to_string();

    let secret = secret_data(&f, "app").await;
    assert_eq!(secret["STATIC"], "from the template");
    assert_eq!((secret["AWS_REGION"].as_str(), secret["AWS_DEFAULT_REGION"].as_str()), ("eu-west-1", "eu-west-1"));
    assert_eq!(secret["SMTP_USERNAME"], id);
    let dir = tempfile::tempdir().unwrap();
    for (key, value) in &secret {
        std::fs::write(dir.path().join(key), value).unwrap();
    }

    // The AWS CLI, reading the credentials and config files as a mounted Secret gives them.
    let aws = aws_cli();
    let mut cmd = client(&f, &aws, dir.path());
    cmd.args(["sts", "get-caller-identity", "--profile", "ci"]);
    let identity: serde_json::Value = serde_json::from_str(&run_ok(cmd)).expect("JSON from the AWS CLI");
    assert_eq!(identity["Arn"], arn.as_str(), "the AWS CLI authenticates as the user");
    assert_eq!(identity["Account"], account.as_str());
    let mut cmd = client(&f, &aws, dir.path());
    cmd.args(["configure", "get", "region", "--profile", "ci"]);
    assert_eq!(run_ok(cmd), "eu-west-1", "the AWS CLI reads the rendered config file");

    // boto3 through the profile, and through the JSON document; the SMTP password recomputed.
    let python = aws.with_file_name("python");
    let mut cmd = client(&f, &python, dir.path());
    cmd.args(["-c", PYTHON_CONSUMER]);
    let seen: serde_json::Value = serde_json::from_str(&run_ok(cmd)).expect("JSON from Python");
    println!("AWS CLI: {identity}; Python: profile and JSON authenticate as {}", seen["profile_arn"]);
    assert_eq!(seen["profile_arn"], arn.as_str());
    assert_eq!(seen["profile_region"], "eu-west-1");
    assert_eq!(seen["json_arn"], arn.as_str());
    assert_eq!((&seen["doc_arn"], &seen["doc_account"]), (&json!(arn), &json!(account)));
    assert_eq!(seen["smtp"], secret["SMTP_PASSWORD"].as_str(), "Python's hmac agrees on the SMTP password");

    // Neither the secret nor the password derived from it leave the Secret.
    let key = serde_json::from_str::<serde_json::Value>(&secret["aws.json"]).unwrap()["SecretAccessKey"]
        .as_str()
        .unwrap()
        .to_string();
    op.assert_log_free_of(&key);
    op.assert_log_free_of(&secret["SMTP_PASSWORD"]);
    let status = serde_json::to_string(&f.keys_api().get("app").await.unwrap()).unwrap();
    let events = f.events("app", "KeyCreated").await.join("\n");
    for leak in [&key, &secret["SMTP_PASSWORD"]] {
        assert!(!status.contains(leak.as_str()) && !events.contains(leak.as_str()), "a secret in status or events");
    }
}

#[tokio::test]
async fn a_template_that_does_not_render_never_reaches_iam_and_names_its_line() {
    // An operator of its own: its metrics count only this resource's calls.
    let f = Fixture::new("tplbad").await;
    let op = f.operator(&[]);
    let broken = "user = {{ access_key_id }}\npassword = {{ ses_smtp_password(secret_access_key) }}\n";
    f.create("app", json!({"secret": {"template": {"data": {"smtp.ini": broken, "ok": "fine"}}}})).await;
    let obj = f.wait_reason("app", "InvalidTemplate").await;
    let (status, _, message) = ready(&obj).unwrap();
    println!("InvalidTemplate: {message}");
    assert_eq!(status, "False");
    assert!(message.starts_with(r#"spec.secret.template.data["smtp.ini"] line 2, column "#), "{message}");
    assert!(message.contains("fix the template"), "{message}");
    let warned = f.wait_events("app", "InvalidTemplate", |n| n.contains(&message)).await;
    assert!(warned.iter().any(|n| n == &message), "a Warning event with the message: {warned:?}");
    op.wait_more_reconciles(Some("InvalidTemplate"), 1).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0, "no IAM write for a template that does not render");
    assert!(f.iam_keys().await.is_empty(), "no key in IAM");
    assert!(f.secrets().get_opt("app").await.unwrap().is_none(), "no Secret");

    // Fixed, it converges: the same resource, one key.
    let fixed = "user = {{ access_key_id }}\npassword = {{ ses_smtp_password(secret_access_key, 'us-east-1') }}\n";
    patch_spec(&f, "app", json!({"secret": {"template": {"data": {"smtp.ini": fixed}}}})).await;
    f.wait_ready("app").await;
    assert_eq!(op.iam_calls(&["CreateAccessKey"]).await, 1);
    assert!(secret_data(&f, "app").await["smtp.ini"].starts_with("user = AKIA"));
}

#[tokio::test]
async fn a_layout_change_keeps_the_key_where_the_secret_holds_it_and_rotates_where_it_does_not() {
    let f = Fixture::new("tplchg").await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let first = current(&f.wait_ready("app").await).unwrap();
    let (_, key) = f.secret_creds("app").await.unwrap();

    // From the Env format to JSON: the secret is read back, the same key rewritten.
    let as_json = json!({"aws.json": "{{ {'id': access_key_id, 'secret': secret_access_key} | tojson }}"});
    patch_spec(&f, "app", json!({"secret": {"template": {"data": as_json}}})).await;
    let data = wait_data_key(&f, "aws.json").await;
    let doc: serde_json::Value = serde_json::from_str(&data["aws.json"]).unwrap();
    assert_eq!((doc["id"].as_str(), doc["secret"].as_str()), (Some(first.as_str()), Some(key.as_str())));
    assert!(!data.contains_key("AWS_SECRET_ACCESS_KEY"), "nothing left of the older layout");
    assert_eq!(current(&f.keys_api().get("app").await.unwrap()).as_deref(), Some(first.as_str()));

    // To a layout that holds only the SMTP password: that still reads the secret from the JSON.
    let smtp = json!({"aws.json": null, "username": "{{ access_key_id }}", "password": "{{ ses_smtp_password(secret_access_key, 'eu-west-1') }}"});
    patch_spec(&f, "app", json!({"secret": {"template": {"data": smtp}}})).await;
    let data = wait_data_key(&f, "password").await;
    assert_eq!(data["username"], first, "the same key");
    assert_eq!(op.iam_calls(&["CreateAccessKey"]).await, 1);

    // Only labels change: the data stays as it is, the same key.
    patch_spec(&f, "app", json!({"secret": {"labels": {"team": "mail"}}})).await;
    wait_label(&f, "team", "mail").await;
    assert_eq!(secret_data(&f, "app").await, data, "the data kept as it was");

    // From there, the secret cannot be read back: a new key takes the new layout.
    let back = json!({"password": null, "username": null, "AWS_ACCESS_KEY_ID": "{{ access_key_id }}", "AWS_SECRET_ACCESS_KEY": "{{ secret_access_key }}"});
    patch_spec(&f, "app", json!({"secret": {"template": {"data": back}}})).await;
    let obj =
        f.wait_for("app", Duration::from_secs(60), "a new key", |o| current(o).is_some_and(|id| id != first)).await;
    let reason = obj.status.as_ref().unwrap().rotation.as_ref().unwrap().last_reason.clone();
    assert_eq!(reason.as_deref(), Some("LayoutChanged"));
    let notes = f.wait_events("app", "KeyCreated", |n| n.iter().any(|n| n.contains("(LayoutChanged)"))).await;
    assert!(notes.iter().any(|n| n.contains("(LayoutChanged)")), "{notes:?}");
    f.wait_for("app", Duration::from_secs(60), "the old key retired", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1)
    })
    .await;
    f.assert_consistent("app", &[]).await;
    let rewrites = f.wait_events("app", "SecretWritten", |n| n.len() >= 3).await;
    assert_eq!(rewrites.len(), 3, "three rewrites with the same key: {rewrites:?}");
    op.assert_log_free_of(&key);
}

#[tokio::test]
async fn the_api_server_refuses_what_it_can_check() {
    let f = Fixture::new("tplcrd").await;
    let api = f.keys_api();
    let attempt = |spec: serde_json::Value| {
        let api = api.clone();
        let user = f.user.clone();
        async move {
            let obj: IamAccessKey = serde_json::from_value(json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey",
                "metadata": {"name": "x"}, "spec": {"userName": user, "secret": spec},
            }))
            .unwrap();
            api.create(&Default::default(), &obj).await.err().map(|e| e.to_string()).unwrap_or_default()
        }
    };
    let refused = attempt(json!({"template": {"data": {"a/b": "x"}}})).await;
    assert!(refused.contains("every key must be a Secret data key"), "{refused}");
    let refused = attempt(json!({"template": {"data": {"..a": "x"}}})).await;
    assert!(refused.contains("every key must be a Secret data key"), "{refused}");
    let refused = attempt(json!({"format": "CredentialsFile", "template": {"data": {"a": "x"}}})).await;
    assert!(refused.contains("cannot be combined with spec.secret.template"), "{refused}");
    let refused = attempt(json!({"template": {"type": "kubernetes.io/tls", "data": {"a": "x"}}})).await;
    assert!(refused.contains("only kubernetes.io/basic-auth"), "{refused}");
    let refused = attempt(json!({"template": {"type": "kubernetes.io/basic-auth", "data": {"a": "x"}}})).await;
    assert!(refused.contains("needs a data entry username or password"), "{refused}");
    let many: serde_json::Map<String, serde_json::Value> = (0..33).map(|i| (format!("k{i}"), json!("x"))).collect();
    let refused = attempt(json!({"template": {"data": many}})).await;
    assert!(refused.contains("spec.secret.template.data"), "{refused}");
    let refused = attempt(json!({"template": {"data": {"a": "x".repeat(16 * 1024 + 1)}}})).await;
    assert!(refused.contains("spec.secret.template.data"), "{refused}");

    assert_eq!(attempt(json!({"template": null})).await, "", "an explicit null is no template");
    api.delete("x", &Default::default()).await.expect("delete");

    // The type of a Secret is immutable: it changes only with the Secret's name.
    f.create("typed", json!({"secret": {"template": {"type": "example.com/aws", "data": {"a": "x"}}}})).await;
    let change = |spec: serde_json::Value| {
        let api = api.clone();
        async move {
            let patch = json!({"spec": {"secret": spec}});
            api.patch("typed", &PatchParams::default(), &Patch::Merge(&patch)).await.err().map(|e| e.to_string())
        }
    };
    let refused = change(json!({"template": {"type": "Opaque"}})).await.expect("refused");
    assert!(refused.contains("type is immutable"), "{refused}");
    assert_eq!(change(json!({"name": "typed-2", "template": {"type": "Opaque"}})).await, None);
}

async fn wait_data_key(f: &Fixture, key: &str) -> BTreeMap<String, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let data = secret_data(f, "app").await;
        if data.contains_key(key) {
            return data;
        }
        assert!(std::time::Instant::now() < deadline, "the Secret never got {key}: {:?}", data.keys());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_label(f: &Fixture, key: &str, value: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = f.secrets().get("app").await.unwrap();
        if s.metadata.labels.unwrap_or_default().get(key).map(String::as_str) == Some(value) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "the Secret never got label {key}={value}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
