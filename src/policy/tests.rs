use std::{collections::BTreeMap, sync::Arc};

use serde_json::json;

use super::*;

/// A policy named `name` with these rules (JSON), as the watch would hand it over.
pub(super) fn policy(name: &str, rules: serde_json::Value) -> Arc<IamAccessKeyPolicy> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
            "metadata": {"name": name}, "spec": {"rules": rules}
        }))
        .unwrap(),
    )
}

fn decide(
    policies: &[Arc<IamAccessKeyPolicy>],
    ns: &str,
    ns_labels: &[(&str, &str)],
    user: &str,
    details: Option<(&str, &[(&str, &str)])>,
) -> Decision {
    let labels: BTreeMap<String, String> = ns_labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let tags: BTreeMap<String, String> =
        details.map(|(_, t)| t.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).unwrap_or_default();
    let user = UserFacts { name: user, details: details.map(|(p, _)| (p, &tags)) };
    authorize(policies, &NamespaceFacts { name: ns, labels: &labels }, &user)
}

#[test]
fn no_policy_denies_with_a_message_naming_namespace_and_user() {
    let Decision::Denied(msg) = decide(&[], "team-a", &[], "admin", None) else { panic!() };
    assert!(msg.contains("\"team-a\"") && msg.contains("\"admin\""), "{msg}");
}

#[test]
fn user_name_glob_with_the_namespace_placeholder() {
    let p = [policy("p", json!([{"namespaces": ["team-*"], "userNames": ["{namespace}-*"]}]))];
    assert!(matches!(decide(&p, "team-a", &[], "team-a-uploader", None), Decision::Allowed(_)));
    assert!(matches!(decide(&p, "team-a", &[], "team-b-uploader", None), Decision::Denied(_)));
    assert!(matches!(decide(&p, "other", &[], "other-uploader", None), Decision::Denied(_)));
}

#[test]
fn path_prefix_needs_the_user_read_then_decides() {
    let p = [policy("p", json!([{"namespaces": ["*"], "userPathPrefix": "/k8s/{namespace}/"}]))];
    assert_eq!(decide(&p, "a", &[], "u", None), Decision::NeedUserDetails);
    assert!(matches!(decide(&p, "a", &[], "u", Some(("/k8s/a/", &[]))), Decision::Allowed(_)));
    assert!(matches!(decide(&p, "a", &[], "u", Some(("/k8s/b/", &[]))), Decision::Denied(_)));
    assert!(matches!(decide(&p, "a", &[], "u", Some(("/", &[]))), Decision::Denied(_)));
}

#[test]
fn user_tag_and_namespace_selector() {
    let p = [policy(
        "p",
        json!([{"namespaceSelector": {"matchLabels": {"tenant": "yes"}}, "userTag": {"key": "k8s-namespace", "value": "{namespace}"}}]),
    )];
    let tagged = Some(("/", &[("k8s-namespace", "a")][..]));
    assert!(matches!(decide(&p, "a", &[("tenant", "yes")], "u", tagged), Decision::Allowed(_)));
    assert!(matches!(decide(&p, "a", &[], "u", tagged), Decision::Denied(_)), "namespace not selected");
    assert!(matches!(decide(&p, "b", &[("tenant", "yes")], "u", tagged), Decision::Denied(_)), "tag names another ns");
}

#[test]
fn matching_rules_combine_to_the_strictest_limits() {
    let p = [
        policy("loose", json!([{"namespaces": ["a"], "userNames": ["*"], "maxKeyAge": "90d"}])),
        policy(
            "strict",
            json!([{"namespaces": ["a"], "userNames": ["u"], "maxKeyAge": "30d", "deactivateUnusedAfter": "45d"}]),
        ),
    ];
    let Decision::Allowed(l) = decide(&p, "a", &[], "u", None) else { panic!() };
    assert_eq!(l.max_key_age, Some("30d".parse().unwrap()));
    assert_eq!(l.deactivate_unused_after, Some("45d".parse().unwrap()));
    assert_eq!(l.policies, vec!["loose".to_string(), "strict".to_string()]);
}

#[test]
fn the_longest_minimum_rotation_interval_wins_and_is_enforced_naming_its_policy() {
    let p = [
        policy("hourly", json!([{"namespaces": ["a"], "userNames": ["*"], "minRotationInterval": "1h"}])),
        policy("daily", json!([{"namespaces": ["a"], "userNames": ["u"], "minRotationInterval": "24h"}])),
        policy("other-namespace", json!([{"namespaces": ["b"], "userNames": ["u"], "minRotationInterval": "90d"}])),
    ];
    let Decision::Allowed(l) = decide(&p, "a", &[], "u", None) else { panic!() };
    assert_eq!(l.min_rotation_interval, Some(("24h".parse().unwrap(), "daily".to_string())));
    let spec = |rotation: serde_json::Value| -> IamAccessKeySpec {
        serde_json::from_value(json!({"userName": "u", "rotation": rotation})).unwrap()
    };
    let message = l.check(&spec(json!({"interval": "12h"}))).unwrap_err();
    assert!(message.contains("\"daily\"") && message.contains("spec.rotation.interval 12h"), "{message}");
    assert_eq!(l.check(&spec(json!({"interval": "24h"}))), Ok(()), "the minimum itself is allowed");
    assert_eq!(l.check(&spec(json!({"interval": "30d"}))), Ok(()));
    assert_eq!(l.check(&spec(json!({}))), Ok(()), "no schedule: rotation on request only");
    let none: IamAccessKeySpec = serde_json::from_value(json!({"userName": "u"})).unwrap();
    assert_eq!(l.check(&none), Ok(()));
    let Decision::Allowed(l) = decide(&p, "a", &[], "v", None) else { panic!() };
    assert_eq!(l.min_rotation_interval, Some(("1h".parse().unwrap(), "hourly".to_string())));
}

#[test]
fn glob_semantics() {
    for (p, t, ok) in [
        ("*", "", true),
        ("a*", "abc", true),
        ("*c", "abc", true),
        ("a*c", "abbbc", true),
        ("a?c", "abc", true),
        ("a?c", "ac", false),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "axxbyy", false),
        ("team-a", "team-ab", false),
    ] {
        assert_eq!(glob_matches(p, t), ok, "{p} vs {t}");
    }
}
