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

mod explain {
    use std::{collections::BTreeMap, sync::Arc};

    use serde_json::json;

    use crate::{
        crd::IamAccessKeyPolicy,
        policy::{Decision, NamespaceFacts, RuleOutcome, UserFacts, authorize, explain},
    };

    fn policy(name: &str, rules: serde_json::Value) -> Arc<IamAccessKeyPolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
                "metadata": {"name": name}, "spec": {"rules": rules},
            }))
            .expect("policy"),
        )
    }

    #[test]
    fn each_rule_says_whether_it_allows_and_why_not_as_authorize_decides() {
        let policies = [policy(
            "teams",
            json!([
                {"namespaces": ["team-*"], "userNames": ["{namespace}.*"]},
                {"namespaces": ["ops"], "userNames": ["*"]},
                {"namespaces": ["team-*"], "userPathPrefix": "/k8s/{namespace}/"},
            ]),
        )];
        let labels = BTreeMap::new();
        let ns = NamespaceFacts { name: "team-a", labels: &labels };
        let verdicts = explain(&policies, &ns, &UserFacts { name: "team-a.app", details: None });
        assert_eq!(verdicts[0].outcome, RuleOutcome::Allows);
        assert!(matches!(&verdicts[1].outcome, RuleOutcome::OtherNamespace(m) if m.contains("[\"ops\"]")));
        assert!(matches!(&verdicts[2].outcome, RuleOutcome::NeedsUserDetails(m) if m.contains("/k8s/team-a/")));
        assert_eq!(
            authorize(&policies, &ns, &UserFacts { name: "team-a.app", details: None }),
            Decision::NeedUserDetails
        );

        let tags = BTreeMap::new();
        let user = UserFacts { name: "other", details: Some(("/k8s/team-b/", &tags)) };
        let verdicts = explain(&policies, &ns, &user);
        assert!(matches!(&verdicts[0].outcome, RuleOutcome::OtherUser(m) if m.contains("[\"team-a.*\"]")));
        assert!(
            matches!(&verdicts[2].outcome, RuleOutcome::OtherUser(m) if m.contains("userPathPrefix \"/k8s/team-a/\""))
        );
        assert!(matches!(authorize(&policies, &ns, &user), Decision::Denied(_)));
    }
}
