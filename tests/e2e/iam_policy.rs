//! The operator's own IAM permissions (`deploy/iam-policy.json`), tested against an IAM
//! endpoint that enforces signatures and policies (moto with INITIAL_NO_AUTH_ACTION_COUNT).

use crate::support;
use std::{
    collections::BTreeSet,
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::Duration,
};

use aws_credential_types::Credentials;
use iam_key_operator::crd::OWNER_TAG;
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

fn shipped_policy() -> Value {
    let path = testenv::repo_root().join("deploy/iam-policy.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The shipped policy as moto can take it (`support::identity::shipped_policy_for_moto`:
/// `Resource` widened to `*`, `Condition` removed), without `drop_action`. moto 5.2.5 passes no
/// request context (such as `aws:TagKeys`) to an identity's policies and implements only
/// `StringEquals`, so it ignores the tag-key condition (`moto_ignores_the_tag_key_condition`
/// shows it); removing it keeps these tests independent of that, since moto turns a condition
/// it fails into an explicit deny. What moto proves is the action list; the Resource and the
/// Condition are checked by shape, below.
fn shipped_policy_for_moto(drop_action: Option<&str>) -> Value {
    let mut doc = identity::shipped_policy_for_moto(&testenv::repo_root().join("deploy/iam-policy.json"));
    for statement in doc["Statement"].as_array_mut().unwrap() {
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
    // moto takes seconds to import on a busy machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{}/moto-api/", server.url)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "moto did not start on {} within 60s", server.url);
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

// The document's shape. moto cannot check the Resource or the Condition (see above), so these
// read deploy/iam-policy.json and check what real IAM would evaluate.

/// The tag keys the tag statement may write: the claim tag and access key IDs. Long-term
/// access key IDs start with `AKIA` in AWS, and in moto (checked against its keys below).
fn allowed_tag_key_patterns() -> Vec<String> {
    vec![OWNER_TAG.to_string(), "AKIA*".to_string()]
}

/// IAM's `StringLike`: `*` is any run of characters, `?` one character, case-sensitive.
fn string_like(pattern: &str, value: &str) -> bool {
    fn go(p: &[char], v: &[char]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some(('*', rest)) => (0..=v.len()).any(|i| go(rest, &v[i..])),
            Some(('?', rest)) => !v.is_empty() && go(rest, &v[1..]),
            Some((c, rest)) => v.first() == Some(c) && go(rest, &v[1..]),
        }
    }
    go(&pattern.chars().collect::<Vec<_>>(), &value.chars().collect::<Vec<_>>())
}

fn actions(statement: &Value) -> Vec<String> {
    statement["Action"].as_array().expect("Action is a list").iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

/// The IAM operations the operator calls: every `let op = "..."` of `src/iam/aws.rs`, the only
/// code that talks to AWS.
fn operations_in_the_code() -> BTreeSet<String> {
    let code = std::fs::read_to_string(testenv::repo_root().join("src/iam/aws.rs")).unwrap();
    let ops: BTreeSet<String> =
        code.split("let op = \"").skip(1).map(|rest| rest.split('"').next().unwrap().to_string()).collect();
    assert!(ops.contains("CreateAccessKey") && ops.contains("TagUser"), "could not read the operations: {ops:?}");
    ops
}

#[test]
fn the_shipped_policy_grants_exactly_the_iam_actions_the_code_calls() {
    let doc = shipped_policy();
    let granted: BTreeSet<String> = doc["Statement"].as_array().unwrap().iter().flat_map(actions).collect();
    // STS GetCallerIdentity is signed with the new key itself and needs no permission;
    // AssumeRole passes session tags (sts:TagSession).
    let needed: BTreeSet<String> = operations_in_the_code()
        .into_iter()
        .filter(|op| op != "GetCallerIdentity")
        .flat_map(|op| match op.as_str() {
            "AssumeRole" => vec!["sts:AssumeRole".to_string(), "sts:TagSession".to_string()],
            _ => vec![format!("iam:{op}")],
        })
        .collect();
    assert_eq!(granted, needed, "deploy/iam-policy.json must list exactly the IAM calls of src/iam/aws.rs");
    for statement in doc["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow");
        assert!(statement.get("NotAction").is_none() && statement.get("NotResource").is_none());
        for action in actions(statement) {
            assert!(!action.contains('*') && !action.contains('?'), "no wildcard actions: {action}");
        }
    }
}

#[test]
fn the_shipped_policy_is_scoped_to_a_user_path_prefix() {
    let doc = shipped_policy();
    for statement in doc["Statement"].as_array().unwrap() {
        let resource = statement["Resource"].as_str().expect("one Resource per statement");
        // Roles to assume: only those under the operator's role path.
        if actions(statement).iter().any(|a| a.starts_with("sts:")) {
            assert_eq!(resource, "arn:aws:iam::*:role/iam-key-operator/*");
            continue;
        }
        // arn:aws:iam::<account or *>:user/<path>/* with a path of at least one literal segment.
        let rest = resource.strip_prefix("arn:aws:iam::").expect(resource);
        let (account, user) = rest.split_once(':').expect(resource);
        assert!(account == "*" || (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())), "{resource}");
        let path = user.strip_prefix("user/").and_then(|p| p.strip_suffix("/*")).expect(resource);
        assert!(
            !path.is_empty() && path.split('/').all(|seg| !seg.is_empty() && !seg.contains(['*', '?'])),
            "Resource must name a user path: {resource}"
        );
        // The same prefix the shipped deployments tell the operator (--iam-user-path-prefix).
        let prefix = format!("/{path}/");
        let deployment = std::fs::read_to_string(testenv::repo_root().join("deploy/deployment.yaml")).unwrap();
        assert!(deployment.contains(&format!("--iam-user-path-prefix={prefix}")), "deploy/ manages {prefix}");
        let values = std::fs::read_to_string(testenv::repo_root().join("charts/iam-key-operator/values.yaml")).unwrap();
        assert!(values.contains(&format!("userPathPrefix: {prefix}")), "the chart manages {prefix}");
    }
}

#[test]
fn tags_may_be_written_only_under_the_tag_key_condition() {
    let doc = shipped_policy();
    let tagging: Vec<&Value> = doc["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| actions(s).iter().any(|a| a == "iam:TagUser" || a == "iam:UntagUser"))
        .collect();
    assert_eq!(tagging.len(), 1, "TagUser and UntagUser in one statement of their own");
    let statement = tagging[0];
    assert_eq!(actions(statement), ["iam:TagUser", "iam:UntagUser"], "nothing else under the tag condition");
    let patterns: Vec<String> = allowed_tag_key_patterns();
    assert_eq!(
        statement["Condition"],
        json!({
            // Every tag key of the request matches one of these...
            "ForAllValues:StringLike": {"aws:TagKeys": patterns},
            // ...and there are tag keys (ForAllValues alone is true for a request without any).
            "Null": {"aws:TagKeys": "false"},
        })
    );
    // What the condition lets through: the keys the operator writes, and nothing a person
    // would use as a tag of their own.
    let allowed = |key: &str| patterns.iter().any(|p| string_like(p, key));
    for ours in [OWNER_TAG, "AKIARZPUZDIKINXY7HTD", "AKIAIOSFODNN7EXAMPLE"] {
        assert!(allowed(ours), "{ours} must be writable");
    }
    for theirs in [
        "Name",
        "team",
        "owner",
        "iam.keyop.dev/owner2",
        "iam.keyop.dev/other",
        "akiaiosfodnn7example",
        "ASIAIOSFODNN7EXAMPLE",
    ] {
        assert!(!allowed(theirs), "{theirs} must not be writable");
    }
    // Every other statement is free of conditions: the condition narrows tags only.
    for other in doc["Statement"].as_array().unwrap().iter().filter(|s| !std::ptr::eq(*s, statement)) {
        assert!(other.get("Condition").is_none());
    }
}

#[test]
fn a_target_accounts_role_may_do_what_the_operator_does_in_its_own_account() {
    let read = |path: &str| -> Value {
        serde_json::from_slice(&std::fs::read(testenv::repo_root().join(path)).unwrap()).unwrap()
    };
    let mut own = read("deploy/iam-policy.json");
    own["Statement"].as_array_mut().unwrap().retain(|s| !actions(s).iter().any(|a| a.starts_with("sts:")));
    assert_eq!(read("deploy/account-role/permissions.json"), own, "the same IAM statements, without AssumeRole");
    let trust = read("deploy/account-role/trust.json");
    assert_eq!(actions(&trust["Statement"][0]), ["sts:AssumeRole", "sts:TagSession"]);
}

#[test]
fn the_policy_in_the_docs_is_the_shipped_one_with_an_account_id() {
    let doc = std::fs::read_to_string(testenv::repo_root().join("docs/security.md")).unwrap();
    let anchor = doc.find("is the whole permission policy").expect("docs/security.md shows the policy");
    let block = &doc[anchor..];
    let start = block.find("```json\n").unwrap() + "```json\n".len();
    let shown: Value = serde_json::from_str(&block[start..start + block[start..].find("```").unwrap()]).unwrap();
    let file = std::fs::read_to_string(testenv::repo_root().join("deploy/iam-policy.json")).unwrap();
    // Users in the operator's account; roles in any account a policy rule names.
    let with_account: Value =
        serde_json::from_str(&file.replace("arn:aws:iam::*:user/", "arn:aws:iam::111122223333:user/")).unwrap();
    assert_eq!(shown, with_account, "docs/security.md shows deploy/iam-policy.json with the example account id");
}

#[tokio::test]
async fn everything_works_with_exactly_the_shipped_policy() {
    let f = Fixture::new("iampolicy").await;
    let (moto, id, secret) = enforcing_moto(&f.user, shipped_policy_for_moto(None)).await;
    let op = f.operator(&operator_env(&moto.url, &id, &secret));
    f.create("app", json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}})).await;
    let first = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    assert!(first.starts_with("AKIA"), "moto's key ids match the tag condition's AKIA*: {first}");

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
    // Every tag the operator wrote would pass the tag-key condition real IAM evaluates.
    let as_operator = iam_client(&moto.url, &id, &secret);
    let tags = as_operator.get_user().user_name(&f.user).send().await.unwrap().user.unwrap().tags;
    let keys: Vec<String> = tags.unwrap_or_default().iter().map(|t| t.key().to_string()).collect();
    assert!(keys.iter().any(|k| k == OWNER_TAG) && keys.len() >= 2, "the claim and a key tag: {keys:?}");
    for key in &keys {
        assert!(allowed_tag_key_patterns().iter().any(|p| string_like(p, key)), "tag key {key} outside the condition");
    }
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    let tags = as_operator.get_user().user_name(&f.user).send().await.unwrap().user.unwrap().tags;
    assert!(tags.unwrap_or_default().is_empty(), "the operator untagged what it tagged");
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

/// moto cannot evaluate the tag-key condition: with the shipped statement as is (only the
/// Resource widened), it lets the operator's identity write a tag key real IAM would refuse.
/// If this starts failing, moto has learnt conditions and the tests above can keep them.
#[tokio::test]
async fn moto_ignores_the_tag_key_condition() {
    let mut policy = shipped_policy();
    for statement in policy["Statement"].as_array_mut().unwrap() {
        statement["Resource"] = json!("*");
    }
    let (moto, id, secret) = enforcing_moto("condition-canary", policy).await;
    let as_operator = iam_client(&moto.url, &id, &secret);
    let foreign = aws_sdk_iam::types::Tag::builder().key("team").value("billing").build().unwrap();
    let result = as_operator.tag_user().user_name("condition-canary").tags(foreign).send().await;
    assert!(result.is_ok(), "moto refused a tag outside the condition: it evaluates conditions now: {result:?}");
    // Still enforcing: an action outside the policy is refused.
    assert!(as_operator.list_users().send().await.is_err());
}
