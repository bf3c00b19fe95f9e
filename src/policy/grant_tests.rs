//! The grant a resource records (which rule, what it says about revocation), and the mistakes in
//! rules the schema cannot see.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::json;

use super::tests::policy;
use super::*;

fn granting_rule(policies: &[Arc<IamAccessKeyPolicy>], ns: &str, user: &str) -> Option<GrantingRule> {
    let labels = BTreeMap::new();
    match authorize(policies, &NamespaceFacts { name: ns, labels: &labels }, &UserFacts { name: user, details: None }) {
        Decision::Allowed(limits) => limits.granting_rule,
        other => panic!("{other:?}"),
    }
}

fn rule(policy: &str, rule: usize, on_revoke: OnRevoke) -> Option<GrantingRule> {
    Some(GrantingRule { policy: policy.into(), rule, on_revoke })
}

#[test]
fn the_grant_names_the_rule_with_the_strictest_on_revoke() {
    let p = [
        policy("b-keep", json!([{"namespaces": ["a"], "userNames": ["*"]}])),
        policy(
            "c-deactivate",
            json!([
                {"namespaces": ["other"], "userNames": ["*"], "onRevoke": "Delete"},
                {"namespaces": ["a"], "userNames": ["u*"], "onRevoke": "Deactivate"},
            ]),
        ),
        policy("a-keep", json!([{"namespaces": ["a"], "userNames": ["u"], "onRevoke": "Keep"}])),
    ];
    assert_eq!(granting_rule(&p, "a", "u"), rule("c-deactivate", 1, OnRevoke::Deactivate));
    assert_eq!(granting_rule(&p, "a", "v"), rule("b-keep", 0, OnRevoke::Keep), "Keep by default");
    // Among equals, the first by policy name (whatever order the cache lists them in).
    let keeps = [p[0].clone(), p[2].clone()];
    assert_eq!(granting_rule(&keeps, "a", "u"), rule("a-keep", 0, OnRevoke::Keep));
    assert_eq!(granting_rule(&p[..1], "a", "u"), rule("b-keep", 0, OnRevoke::Keep));
    let delete = [policy("d", json!([{"namespaces": ["a"], "userNames": ["u"], "onRevoke": "Delete"}])), p[1].clone()];
    assert_eq!(granting_rule(&delete, "a", "u"), rule("d", 0, OnRevoke::Delete));
}

#[test]
fn rule_problems_name_the_field_and_what_is_wrong() {
    let fine = policy(
        "fine",
        json!([{"namespaces": ["*"], "userNames": ["{namespace}.*"], "userPathPrefix": "/k8s/{namespace}/",
                "userTag": {"key": "k8s-namespace", "value": "{namespace}"}}]),
    );
    assert!(rule_problems(&fine).is_empty());
    let typos = policy(
        "typos",
        json!([
            {"namespaces": ["*"], "userNames": ["ok-*", "{ns}-*"]},
            {"namespaces": ["*"], "userPathPrefix": "/k8s/{name}/"},
            {"namespaces": ["*"], "userTag": {"key": "k", "value": "{Namespace}"}},
            {"namespaces": ["*"], "userNames": [format!("{}*", "x".repeat(65))]},
        ]),
    );
    let problems = rule_problems(&typos);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems[0].starts_with(r#"spec.rules[0].userNames[1] "{ns}-*": only {namespace} is replaced"#),
        "{}",
        problems[0]
    );
    assert!(problems[1].starts_with(r#"spec.rules[1].userPathPrefix "/k8s/{name}/""#), "{}", problems[1]);
    assert!(problems[2].starts_with(r#"spec.rules[2].userTag.value "{Namespace}""#), "{}", problems[2]);
    assert!(problems[3].contains("matches no IAM user name"), "{}", problems[3]);
}
