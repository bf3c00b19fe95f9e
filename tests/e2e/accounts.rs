//! Several AWS accounts: a policy rule names a role in the account its users live in; the
//! operator assumes it and manages the keys there. moto (enforcing) with two accounts besides
//! its default one (`testenv::OTHER_ACCOUNTS`): calls signed with an assumed role's credentials
//! act in the role's account, and are authorized by the role's own policies there.

use crate::support;

use serde_json::json;
use support::*;
use testenv::OTHER_ACCOUNTS;

/// A role the operator may assume in `account`, holding the shipped target-account permission
/// policy (as moto can evaluate it), named uniquely for the test.
async fn target_role(f: &Fixture, account: &str) -> String {
    let iam = f.env.iam_client_in(account).await.expect("admin in the target account");
    let name = format!("target-{}", f.ns);
    // Sent compact: moto checks a signature over the form it parsed, re-encoded with `+` for a
    // space, where the Rust SDK (like AWS's own spec) wrote `%20`. A parameter with a space
    // fails there with SignatureDoesNotMatch; AWS accepts it. The operator never sends one.
    let trust: serde_json::Value =
        serde_json::from_slice(&std::fs::read(testenv::repo_root().join("deploy/account-role/trust.json")).unwrap())
            .unwrap();
    iam.create_role()
        .role_name(&name)
        .path("/iam-key-operator/")
        .assume_role_policy_document(trust.to_string())
        .send()
        .await
        .unwrap();
    let permissions =
        identity::shipped_policy_for_moto(&testenv::repo_root().join("deploy/account-role/permissions.json"));
    let put = iam.put_role_policy().role_name(&name).policy_name("iam-key-operator");
    put.policy_document(permissions.to_string()).send().await.unwrap();
    format!("arn:aws:iam::{account}:role/iam-key-operator/{name}")
}

/// The user `name` in `account`, and its ARN.
async fn user_in(f: &Fixture, account: &str, name: &str) -> String {
    let iam = f.env.iam_client_in(account).await.unwrap();
    let out = iam.create_user().user_name(name).send().await.unwrap();
    out.user().unwrap().arn().to_string()
}

async fn keys_in(f: &Fixture, account: &str, user: &str) -> Vec<String> {
    let iam = f.env.iam_client_in(account).await.unwrap();
    let out = iam.list_access_keys().user_name(user).send().await.unwrap();
    out.access_key_metadata().iter().filter_map(|k| k.access_key_id().map(str::to_owned)).collect()
}

fn account_of(obj: &iam_key_operator::crd::IamAccessKey) -> iam_key_operator::crd::AccountRecord {
    obj.status.as_ref().and_then(|s| s.account.clone()).expect("status.account")
}

#[tokio::test]
async fn the_same_user_name_in_two_accounts_each_namespace_in_its_own() {
    let (a, b) = (OTHER_ACCOUNTS[0], OTHER_ACCOUNTS[1]);
    let f = Fixture::without_policy("acct").await;
    let other_ns = f.env.fresh_namespace("acct-b").await.unwrap();
    let (role_a, role_b) = (target_role(&f, a).await, target_role(&f, b).await);
    // The fixture's user exists in the operator's account too: neither namespace reaches it.
    let (arn_a, arn_b) = (user_in(&f, a, &f.user).await, user_in(&f, b, &f.user).await);
    let only_b = format!("{}-b", f.user);
    user_in(&f, b, &only_b).await;
    f.allow(
        &format!("acct-a-{}", f.ns),
        json!({"namespaces": [f.ns], "userNames": [format!("{}*", f.user)], "account": {"roleArn": role_a}}),
    )
    .await;
    f.allow(
        &format!("acct-b-{}", f.ns),
        json!({"namespaces": [other_ns], "userNames": [f.user], "account": {"roleArn": role_b, "iamRateMax": 4}}),
    )
    .await;
    // One operator for both namespaces: one process, a rate limiter per account.
    let op = Operator::start(f.env, &f.ns, &[], &["--namespace", &other_ns]);
    f.create("app", json!({})).await;
    let g = Fixture { env: f.env, client: f.client.clone(), ns: other_ns.clone(), user: f.user.clone() };
    g.create("app", json!({})).await;
    // A user that exists only in B, asked for from the namespace allowed into A only.
    f.create("reach", json!({"userName": only_b, "secret": {"name": "reach"}})).await;

    let in_a = f.wait_ready("app").await;
    let in_b = g.wait_ready("app").await;
    let (rec_a, rec_b) = (account_of(&in_a), account_of(&in_b));
    assert_eq!((rec_a.id.as_deref(), rec_a.user_arn.as_deref()), (Some(a), Some(arn_a.as_str())), "{rec_a:?}");
    assert_eq!((rec_b.id.as_deref(), rec_b.user_arn.as_deref()), (Some(b), Some(arn_b.as_str())), "{rec_b:?}");
    assert_eq!(rec_a.role_arn.as_deref(), Some(role_a.as_str()));
    let key_a = in_a.status.as_ref().unwrap().access_key_id.clone().unwrap();
    let key_b = in_b.status.as_ref().unwrap().access_key_id.clone().unwrap();
    assert_eq!(keys_in(&f, a, &f.user).await, [key_a.as_str()]);
    assert_eq!(keys_in(&f, b, &f.user).await, [key_b.as_str()]);
    assert!(iam_keys(f.env, &f.user).await.is_empty(), "nothing in the operator's own account");
    // The claim and the key's tag are written with the role's credentials, on the user there.
    let iam_a = f.env.iam_client_in(a).await.unwrap();
    let tags = iam_a.list_user_tags().user_name(&f.user).send().await.unwrap();
    let tags: Vec<_> = tags.tags().iter().map(|t| (t.key(), t.value())).collect();
    let owner = format!("test/{}/app", f.ns);
    assert!(tags.contains(&("iam.keyop.dev/owner", owner.as_str())), "{tags:?}");
    assert!(tags.iter().any(|(k, _)| *k == key_a), "the key's tag: {tags:?}");
    // Each Secret's key authenticates as the user of its account.
    let (id, secret) = f.secret_creds("app").await.unwrap();
    let who = f.env.sts_client(&id, &secret).get_caller_identity().send().await.unwrap();
    assert_eq!(who.arn(), Some(arn_a.as_str()));
    // Namespace A cannot reach B's user: in A it does not exist.
    f.wait_reason("reach", "UserNotFound").await;
    assert!(keys_in(&f, b, &only_b).await.is_empty());
    // Calls carry the account they were made in.
    let metrics = op.metrics().await;
    assert!(
        metrics.contains(&format!(
            "iam_key_operator_iam_calls_total{{operation=\"CreateAccessKey\",outcome=\"ok\",account=\"{a}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains("operation=\"AssumeRole\",outcome=\"ok\"}"),
        "AssumeRole with the operator's own identity"
    );
    // Each account is paced on its own: B at most at its rule's ceiling, A at the flags' rate.
    let rate = |account: &str| -> f64 {
        let prefix = format!("iam_key_operator_account_iam_rate_limit{{account=\"{account}\"}} ");
        let line = metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        line.unwrap_or_else(|| panic!("no rate for {account}: {metrics}")).parse().unwrap()
    };
    assert!(rate(b) <= 4.0 && rate(a) > 4.0, "A {} B {}", rate(a), rate(b));

    // Deletion cleans up in each account.
    f.delete("app").await;
    g.delete("app").await;
    f.wait_gone("app", std::time::Duration::from_secs(60)).await;
    g.wait_gone("app", std::time::Duration::from_secs(60)).await;
    assert!(keys_in(&f, a, &f.user).await.is_empty());
    assert!(keys_in(&f, b, &f.user).await.is_empty());
}

#[tokio::test]
async fn a_refused_role_is_assume_role_failed_until_allowed_and_a_moved_rule_changes_no_account() {
    let (a, b) = (OTHER_ACCOUNTS[0], OTHER_ACCOUNTS[1]);
    let f = Fixture::without_policy("acct-refused").await;
    let (role_a, role_b) = (target_role(&f, a).await, target_role(&f, b).await);
    user_in(&f, a, &f.user).await;
    user_in(&f, b, &f.user).await;
    // The operator's own policy refuses this role, as a missing trust relationship would.
    let deny = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "sts:AssumeRole", "Resource": role_a}
    ]});
    identity::operator_aws_key(f.env); // the operator's IAM user, made on first use
    let admin = f.env.iam_client();
    let deny_name = format!("deny-{}", f.ns);
    let put = admin.put_user_policy().user_name("iam-key-operator").policy_name(&deny_name);
    put.policy_document(deny.to_string()).send().await.unwrap();
    let rule = |role: &str| json!({"namespaces": [f.ns], "userNames": [f.user], "account": {"roleArn": role}, "onRevoke": "Delete"});
    f.allow(&format!("acct-{}", f.ns), rule(&role_a)).await;
    let _op = f.operator(&[]);
    f.create("app", json!({})).await;
    let obj = f.wait_reason("app", "AssumeRoleFailed").await;
    let message = ready(&obj).unwrap().2;
    assert!(message.contains(&role_a), "names the role: {message}");
    assert!(!message.contains("SessionToken") && !message.contains("ASIA"), "no credentials: {message}");
    assert!(keys_in(&f, a, &f.user).await.is_empty());

    // Allowed again: it recovers.
    admin.delete_user_policy().user_name("iam-key-operator").policy_name(&deny_name).send().await.unwrap();
    let obj = f.wait_ready("app").await;
    let key = obj.status.as_ref().unwrap().access_key_id.clone().unwrap();
    assert_eq!(keys_in(&f, a, &f.user).await, [key.as_str()]);

    // The rule now names another account: the keys stay where they are, nothing is made there.
    f.allow(&format!("acct-{}", f.ns), rule(&role_b)).await;
    let obj = f.wait_reason("app", "AccountChanged").await;
    assert!(ready(&obj).unwrap().2.contains(a), "names the account of the keys");
    assert!(keys_in(&f, b, &f.user).await.is_empty(), "no key in a second account");
    assert_eq!(keys_in(&f, a, &f.user).await, [key]);

    // The rule is gone (onRevoke Delete recorded): revocation acts in the recorded account.
    f.allow(&format!("acct-{}", f.ns), json!({"namespaces": ["nobody"], "userNames": ["nobody"]})).await;
    f.wait_for("app", std::time::Duration::from_secs(60), "revoked, keys deleted", |o| {
        ready(o).is_some_and(|r| r.1 == "NotAuthorized") && o.status.as_ref().is_some_and(|s| s.keys.is_empty())
    })
    .await;
    assert!(keys_in(&f, a, &f.user).await.is_empty(), "deleted in the account the keys were in");
}

#[tokio::test]
async fn deleting_a_resource_whose_role_cannot_be_assumed_waits_and_says_where_the_keys_are() {
    let a = OTHER_ACCOUNTS[0];
    let f = Fixture::without_policy("acct-gone").await;
    let role_a = target_role(&f, a).await;
    user_in(&f, a, &f.user).await;
    f.allow(
        &format!("acct-{}", f.ns),
        json!({"namespaces": [f.ns], "userNames": [f.user], "account": {"roleArn": role_a}}),
    )
    .await;
    let op = f.operator(&[]);
    f.create("app", json!({})).await;
    let key = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    // The role can no longer be assumed (as when it is deleted or its trust changed), and a
    // fresh operator holds no credentials from before.
    drop(op);
    let admin = f.env.iam_client();
    let deny = json!({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "sts:AssumeRole", "Resource": role_a}
    ]});
    let deny_name = format!("deny-{}", f.ns);
    let put = admin.put_user_policy().user_name("iam-key-operator").policy_name(&deny_name);
    put.policy_document(deny.to_string()).send().await.unwrap();
    f.delete("app").await;
    let op = f.operator(&[]);
    let obj = f.wait_reason("app", "AssumeRoleFailed").await;
    let (status, _, message) = ready(&obj).unwrap();
    assert_eq!(status, "False");
    assert!(message.starts_with("deletion waits: cannot assume role") && message.contains(&role_a), "{message}");
    assert!(message.contains(&format!("stay in AWS account {a}")), "says where the keys are: {message}");
    assert_eq!(keys_in(&f, a, &f.user).await, [key.as_str()], "nothing given up");
    // Said once: the retries that still wait change nothing and repeat no event.
    op.wait_more_reconciles(Some("AssumeRoleFailed"), 1).await;
    let warned = f.events("app", "AssumeRoleFailed").await;
    assert_eq!(warned.len(), 1, "one Warning event, not one per retry: {warned:?}");

    // The role can be assumed again: the deletion finishes where the keys are.
    admin.delete_user_policy().user_name("iam-key-operator").policy_name(&deny_name).send().await.unwrap();
    f.wait_gone("app", std::time::Duration::from_secs(120)).await;
    assert!(keys_in(&f, a, &f.user).await.is_empty());
}
