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

fn limits(decision: Decision) -> Limits {
    let Decision::Allowed(limits) = decision else { panic!("not allowed: {decision:?}") };
    limits
}

fn spec(deletion_policy: &str) -> IamAccessKeySpec {
    serde_json::from_value(json!({"userName": "u", "deletionPolicy": deletion_policy})).unwrap()
}

#[test]
fn pause_and_retain_are_refused_unless_the_rule_allows_them() {
    let p = [policy("plain", json!([{"namespaces": ["a"], "userNames": ["u"]}]))];
    let l = limits(decide(&p, "a", &[], "u", None));
    assert!(!l.pause_allowed() && !l.retain_allowed(), "secure default: neither");
    assert_eq!(l.deletion_policy(&spec("Retain")), DeletionPolicy::Delete);
    let overrides = l.overrides(&spec("Retain"), true);
    let (pause, retain) = (overrides.pause.clone().unwrap(), overrides.retain.clone().unwrap());
    assert!(pause.contains("iam.keyop.dev/paused") && pause.contains("\"plain\""), "{pause}");
    assert!(pause.contains("allowPause"), "names the fix: {pause}");
    assert!(retain.contains("Retain") && retain.contains("allowRetain"), "{retain}");
    assert_eq!(overrides.reason(), Some("PauseNotAllowed"));
    assert_eq!(overrides.message(), format!("{pause}; {retain}"));
    assert_eq!(l.overrides(&spec("Retain"), false).reason(), Some("RetainNotAllowed"));
    assert!(l.overrides(&spec("Delete"), false).is_empty(), "nothing asked, nothing overruled");

    let p = [policy(
        "lenient",
        json!([{"namespaces": ["a"], "userNames": ["u"], "allowPause": true, "allowRetain": true}]),
    )];
    let l = limits(decide(&p, "a", &[], "u", None));
    assert!(l.pause_allowed() && l.retain_allowed());
    assert_eq!(l.deletion_policy(&spec("Retain")), DeletionPolicy::Retain);
    assert!(l.overrides(&spec("Retain"), true).is_empty());
}

#[test]
fn every_matching_rule_must_allow_pause_and_retain_and_the_message_names_the_one_that_does_not() {
    let p = [
        policy("lenient", json!([{"namespaces": ["a"], "userNames": ["u"], "allowPause": true, "allowRetain": true}])),
        policy("strict", json!([{"namespaces": ["*"], "userNames": ["*"]}])),
    ];
    let l = limits(decide(&p, "a", &[], "u", None));
    assert_eq!(l.pause_refused_by, ["strict"]);
    assert_eq!(l.retain_refused_by, ["strict"]);
    let overrides = l.overrides(&spec("Retain"), true);
    for o in [overrides.pause.unwrap(), overrides.retain.unwrap()] {
        assert!(o.contains("\"strict\"") && !o.contains("lenient"), "{o}");
    }
}

#[test]
fn a_limit_never_lets_a_pause_hold() {
    // The schema refuses allowPause next to a limit; a stored rule that has both still refuses.
    let p = [policy("p", json!([{"namespaces": ["a"], "userNames": ["u"], "allowPause": true, "maxKeyAge": "90d"}]))];
    let l = limits(decide(&p, "a", &[], "u", None));
    assert!(!l.pause_allowed());
    // A limit from another rule: the pause the first allows does not hold either.
    let p = [
        policy("pausable", json!([{"namespaces": ["a"], "userNames": ["u"], "allowPause": true}])),
        policy(
            "aged",
            json!([{"namespaces": ["a"], "userPathPrefix": "/"}, {"namespaces": ["a"], "userNames": ["u"], "deactivateUnusedAfter": "30d"}]),
        ),
    ];
    let l = limits(decide(&p, "a", &[], "u", Some(("/", &[]))));
    assert!(!l.pause_allowed());
    assert!(l.overrides(&spec("Delete"), true).pause.unwrap().contains("\"aged\""));
}

#[test]
fn a_user_no_rule_allows_is_refused_with_one_message_whatever_iam_says_of_it() {
    let p = [policy("p", json!([{"namespaces": ["a"], "userPathPrefix": "/k8s/{namespace}/"}]))];
    // Outside the path, and unreadable (the controller decides with no path and no tags).
    let outside = decide(&p, "a", &[], "admin", Some(("/admins/", &[("team", "x")])));
    let unreadable = decide(&p, "a", &[], "admin", Some(("", &[])));
    assert!(matches!(&outside, Decision::Denied(_)));
    assert_eq!(outside, unreadable);
}

#[test]
fn adoption_and_merge_need_every_matching_rule_to_allow_them() {
    let lenient = json!([{"namespaces": ["a"], "userNames": ["u"], "allowAdoption": true, "allowSecretMerge": true}]);
    let Decision::Allowed(one) = decide(&[policy("lenient", lenient.clone())], "a", &[], "u", None) else { panic!() };
    assert!(one.takeover_allowed(Takeover::Adoption) && one.takeover_allowed(Takeover::Merge));
    let strict = json!([{"namespaces": ["a"], "userNames": ["u"], "allowAdoption": true}]);
    let both = [policy("lenient", lenient), policy("strict", strict)];
    let Decision::Allowed(limits) = decide(&both, "a", &[], "u", None) else { panic!() };
    assert!(limits.takeover_allowed(Takeover::Adoption));
    assert!(!limits.takeover_allowed(Takeover::Merge), "strict does not allow Merge");
    assert_eq!(limits.takeover_refused_by(Takeover::Merge), vec!["strict".to_string()]);
    // The secure default: a rule that says nothing allows neither; nothing allows without a rule.
    let Decision::Allowed(silent) =
        decide(&[policy("p", json!([{"namespaces": ["a"], "userNames": ["u"]}]))], "a", &[], "u", None)
    else {
        panic!()
    };
    assert!(!silent.takeover_allowed(Takeover::Adoption) && !silent.takeover_allowed(Takeover::Merge));
    assert!(!Limits::default().takeover_allowed(Takeover::Adoption));
}

/// As the controller decides: each account's rules with the user as that account shows it.
fn decide_per_account(
    policies: &[Arc<IamAccessKeyPolicy>],
    ns: &str,
    user: &str,
    path_in: impl Fn(Option<&AccountRole>) -> Option<&'static str>,
) -> Decision {
    let labels = BTreeMap::new();
    let namespace = NamespaceFacts { name: ns, labels: &labels };
    let tags = BTreeMap::new();
    let decisions = accounts(policies, &namespace)
        .iter()
        .map(|account| {
            let details = path_in(account.as_ref()).map(|p| (p, &tags));
            authorize_in(policies, &namespace, &UserFacts { name: user, details }, account.as_ref())
        })
        .collect();
    combine(decisions, &namespace, user)
}

const ROLE_A: &str = "arn:aws:iam::222222222222:role/iam-key-operator/a";
const ROLE_B: &str = "arn:aws:iam::333333333333:role/iam-key-operator/b";

#[test]
fn a_rule_places_its_users_in_the_account_of_its_role() {
    let p = [policy(
        "p",
        json!([
            {"namespaces": ["team-a"], "userNames": ["app"], "account": {"roleArn": ROLE_A, "iamRateMax": 10}},
            {"namespaces": ["team-b"], "userNames": ["app"], "account": {"roleArn": ROLE_B}},
            {"namespaces": ["team-c"], "userNames": ["app"]},
            {"namespaces": ["team-e"], "userNames": ["app"], "account": {"roleArn": "arn:aws:iam::222222222222:role/other"}},
        ]),
    )];
    let placed = |ns| match decide_per_account(&p, ns, "app", |_| None) {
        Decision::Allowed(limits) => limits.account.map(|a| (a.role_arn, a.iam_rate_max)),
        other => panic!("{ns}: {other:?}"),
    };
    assert_eq!(placed("team-a"), Some((ROLE_A.to_string(), Some(10))));
    assert_eq!(placed("team-b"), Some((ROLE_B.to_string(), None)));
    assert_eq!(placed("team-c"), None, "no role: the operator's own account");
    // One account, one limiter: every rule naming a role in it shares the lowest ceiling.
    assert_eq!(placed("team-e"), Some(("arn:aws:iam::222222222222:role/other".to_string(), Some(10))));
    assert!(matches!(decide_per_account(&p, "team-d", "app", |_| None), Decision::Denied(_)));
    assert_eq!(
        AccountRole { role_arn: ROLE_A.into(), external_id: None, iam_rate_max: None }.account_id(),
        "222222222222"
    );
}

#[test]
fn each_account_judges_the_user_it_holds() {
    // Rules on the path: the user as each account shows it decides, so a namespace allowed into
    // account A only never reaches the same name in B.
    let p = [policy(
        "p",
        json!([
            {"namespaces": ["team-a"], "userPathPrefix": "/k8s/team-a/", "account": {"roleArn": ROLE_A}},
            {"namespaces": ["team-a"], "userPathPrefix": "/k8s/shared/", "account": {"roleArn": ROLE_B}},
        ]),
    )];
    let in_a_only = |a: Option<&AccountRole>| match a.map(|a| a.role_arn.as_str()) {
        Some(ROLE_A) => Some("/k8s/team-a/"),
        _ => Some("/other/"),
    };
    let Decision::Allowed(limits) = decide_per_account(&p, "team-a", "app", in_a_only) else { panic!() };
    assert_eq!(limits.account.unwrap().role_arn, ROLE_A);
    let in_b_outside = |a: Option<&AccountRole>| match a.map(|a| a.role_arn.as_str()) {
        Some(ROLE_B) => Some("/k8s/team-b/"),
        _ => Some("/other/"),
    };
    assert!(matches!(decide_per_account(&p, "team-a", "app", in_b_outside), Decision::Denied(_)));
}

#[test]
fn rules_placing_a_user_in_two_accounts_are_refused_naming_them() {
    let p = [
        policy("billing", json!([{"namespaces": ["team-a"], "userNames": ["app"], "account": {"roleArn": ROLE_A}}])),
        policy("tenants", json!([{"namespaces": ["team-*"], "userNames": ["*"]}])),
    ];
    let Decision::AccountConflict(message) = decide_per_account(&p, "team-a", "app", |_| None) else { panic!() };
    assert!(message.contains("\"billing\" rules[0]") && message.contains(ROLE_A), "{message}");
    assert!(message.contains("\"tenants\" rules[0]") && message.contains("own account"), "{message}");
    // The same role with another external ID is another identity: refused too.
    let q = [
        policy("a", json!([{"namespaces": ["x"], "userNames": ["app"], "account": {"roleArn": ROLE_A}}])),
        policy(
            "b",
            json!([{"namespaces": ["x"], "userNames": ["app"], "account": {"roleArn": ROLE_A, "externalId": "xy"}}]),
        ),
    ];
    assert!(matches!(decide_per_account(&q, "x", "app", |_| None), Decision::AccountConflict(_)));
    // Two rules naming the same role: one account, the lowest ceiling.
    let r = [
        policy(
            "a",
            json!([{"namespaces": ["x"], "userNames": ["app"], "account": {"roleArn": ROLE_A, "iamRateMax": 5}}]),
        ),
        policy(
            "b",
            json!([{"namespaces": ["x"], "userNames": ["a*"], "account": {"roleArn": ROLE_A, "iamRateMax": 9}}]),
        ),
    ];
    let Decision::Allowed(limits) = decide_per_account(&r, "x", "app", |_| None) else { panic!() };
    assert_eq!(limits.account.unwrap().iam_rate_max, Some(5));
}
