use std::{collections::BTreeMap, sync::Arc};

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::policy::glob_matches;
use crate::policy::tests::policy;

/// Namespaces with labels, as `(name, [(key, value)])`.
fn report(
    policies: &[Arc<IamAccessKeyPolicy>],
    namespaces: &[(&str, &[(&str, &str)])],
) -> BTreeMap<String, PolicyReport> {
    let labels: Vec<BTreeMap<String, String>> =
        namespaces.iter().map(|(_, l)| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()).collect();
    let facts: Vec<NamespaceFacts> =
        namespaces.iter().zip(&labels).map(|((name, _), labels)| NamespaceFacts { name, labels }).collect();
    find_overlaps(policies, &facts, 10)
}

fn pairs(report: &PolicyReport) -> Vec<(String, String)> {
    report.examples.iter().map(|o| (o.a.namespace.clone(), o.b.namespace.clone())).collect()
}

#[test]
fn glob_intersections() {
    for (a, b, expected) in [
        ("data-*", "data-ingest-*", Some("data-ingest-")),
        ("data.*", "data-ingest.*", None),
        ("a*", "*b", Some("ab")),
        ("*", "*", Some("x")),
        ("?", "*", Some("x")),
        ("a?c", "*b*", Some("abc")),
        ("app", "app", Some("app")),
        ("app", "apps", None),
        ("*-db", "app-*", Some("app-db")),
        ("*", "", None),
        ("{x}*", "*", None),
        ("a b", "*", None),
    ] {
        assert_eq!(glob_intersection(a, b).as_deref(), expected, "{a} vs {b}");
        assert_eq!(glob_intersection(b, a).as_deref(), expected, "{b} vs {a}");
    }
    let long = "a".repeat(64);
    assert_eq!(glob_intersection(&long, "*").as_deref(), Some(long.as_str()), "64 characters is a valid name");
    assert_eq!(glob_intersection(&format!("{long}*"), "*").as_deref(), Some(long.as_str()));
    assert_eq!(glob_intersection(&format!("{long}a"), "*"), None, "65 characters is not");
    assert_eq!(glob_intersection(&format!("{long}?"), "*"), None);
}

/// Patterns over a tiny alphabet, and every string over it up to a length no shortest common
/// match of two such patterns exceeds.
fn pattern() -> impl Strategy<Value = String> {
    proptest::collection::vec(prop_oneof![Just('a'), Just('b'), Just('*'), Just('?')], 0..=4)
        .prop_map(|chars| chars.into_iter().collect())
}

fn strings_up_to(len: usize) -> Vec<String> {
    let mut all = vec![String::new()];
    let mut last = vec![String::new()];
    for _ in 0..len {
        last = last.iter().flat_map(|s| ["a", "b", "x"].map(|c| format!("{s}{c}"))).collect();
        all.extend(last.iter().cloned());
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The witness matches both globs, and there is one exactly when some name matches both.
    #[test]
    fn glob_intersection_agrees_with_brute_force(a in pattern(), b in pattern()) {
        let brute = strings_up_to(8).into_iter().filter(|s| !s.is_empty()).find(|s| glob_matches(&a, s) && glob_matches(&b, s));
        let found = glob_intersection(&a, &b);
        if let Some(name) = &found {
            prop_assert!(glob_matches(&a, name) && glob_matches(&b, name), "{name:?} must match {a:?} and {b:?}");
            prop_assert!(!name.is_empty());
            let shortest = brute.as_ref().map(String::len);
            prop_assert_eq!(Some(name.len()), shortest, "a shortest witness");
        }
        prop_assert_eq!(found.is_some(), brute.is_some(), "{:?} vs {:?}: brute force found {:?}", a, b, brute);
    }
}

#[test]
fn the_old_example_lets_a_namespace_take_the_users_of_another_whose_name_it_prefixes() {
    let data = [("platform.example.com/tier", "data")];
    let namespaces: &[(&str, &[(&str, &str)])] = &[("data", &data), ("data-ingest", &data), ("web", &[])];
    let colliding = [policy(
        "tenants",
        json!([{"namespaceSelector": {"matchLabels": {"platform.example.com/tier": "data"}}, "userNames": ["{namespace}-*"]}]),
    )];
    let r = &report(&colliding, namespaces)["tenants"];
    assert_eq!((r.namespaces, r.overlapping_pairs), (2, 1));
    let o = &r.examples[0];
    assert_eq!((o.a.namespace.as_str(), o.b.namespace.as_str(), o.a.rule, o.b.rule), ("data", "data-ingest", 0, 0));
    assert_eq!(o.example.to_string(), r#"IAM user "data-ingest-""#);

    // A separator that cannot occur in a namespace name: no overlap.
    let fixed = [policy(
        "tenants",
        json!([{"namespaceSelector": {"matchLabels": {"platform.example.com/tier": "data"}}, "userNames": ["{namespace}.*"]}]),
    )];
    let r = &report(&fixed, namespaces)["tenants"];
    assert_eq!((r.namespaces, r.overlapping_pairs), (2, 0));
    assert!(r.examples.is_empty());
}

#[test]
fn path_prefixes_with_the_namespace_do_not_overlap_and_a_shared_prefix_does() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("team-a", &[]), ("team-ab", &[]), ("team-b", &[])];
    let per_namespace = [policy("p", json!([{"namespaces": ["team-*"], "userPathPrefix": "/k8s/{namespace}/"}]))];
    assert_eq!(report(&per_namespace, namespaces)["p"].overlapping_pairs, 0);

    let shared = [policy("p", json!([{"namespaces": ["team-*"], "userPathPrefix": "/k8s/"}]))];
    let r = &report(&shared, namespaces)["p"];
    assert_eq!(r.overlapping_pairs, 3, "every pair of the three");
    assert_eq!(r.examples[0].example.to_string(), r#"an IAM user under path "/k8s/""#);

    // A path prefix nested in another namespace's.
    let nested = [
        policy("outer", json!([{"namespaces": ["team-a"], "userPathPrefix": "/k8s/"}])),
        policy("inner", json!([{"namespaces": ["team-b"], "userPathPrefix": "/k8s/{namespace}/"}])),
    ];
    let r = report(&nested, namespaces);
    assert_eq!(r["outer"].overlapping_pairs, 1);
    assert_eq!(r["inner"].examples[0].example.to_string(), r#"an IAM user under path "/k8s/team-b/""#);
}

#[test]
fn a_grant_of_any_user_overlaps_with_every_other_namespace() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("b", &[]), ("monitoring", &[])];
    let policies = [
        policy("everything", json!([{"namespaces": ["a"], "userNames": ["*"]}])),
        policy(
            "by-tag",
            json!([{"namespaces": ["monitoring"], "userTag": {"key": "k8s-namespace", "value": "{namespace}"}}]),
        ),
        policy("root-path", json!([{"namespaces": ["b"], "userPathPrefix": "/"}])),
    ];
    let r = report(&policies, namespaces);
    assert_eq!(r["everything"].overlapping_pairs, 2, "a with b and with monitoring");
    assert_eq!(r["root-path"].overlapping_pairs, 2, "a path prefix of / selects nothing either");
    assert_eq!(r["by-tag"].overlapping_pairs, 2);
    let example = r["by-tag"].examples.iter().find(|o| o.a.namespace == "a").unwrap();
    assert_eq!(example.example.to_string(), "an IAM user tagged k8s-namespace=monitoring");
}

#[test]
fn different_kinds_of_criteria_are_not_compared_and_shared_ones_must_all_agree() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("b", &[]), ("c", &[])];
    let policies = [
        policy("names", json!([{"namespaces": ["a"], "userNames": ["app-*"]}])),
        policy("paths", json!([{"namespaces": ["b"], "userPathPrefix": "/k8s/{namespace}/"}])),
        policy("tags", json!([{"namespaces": ["c"], "userTag": {"key": "owner", "value": "{namespace}"}}])),
    ];
    let r = report(&policies, namespaces);
    assert!(r.values().all(|p| p.overlapping_pairs == 0), "{r:?}");

    // Names overlap but paths do not: no user satisfies both.
    let policies = [
        policy("x", json!([{"namespaces": ["a"], "userNames": ["app-*"], "userPathPrefix": "/k8s/{namespace}/"}])),
        policy("y", json!([{"namespaces": ["b"], "userNames": ["*-db"], "userPathPrefix": "/k8s/{namespace}/"}])),
    ];
    assert_eq!(report(&policies, namespaces)["x"].overlapping_pairs, 0);
    // Names overlap; only one sets a path: the example carries it.
    let policies = [
        policy("x", json!([{"namespaces": ["a"], "userNames": ["app-*"], "userPathPrefix": "/k8s/"}])),
        policy("y", json!([{"namespaces": ["b"], "userNames": ["*-db"]}])),
    ];
    let r = report(&policies, namespaces);
    assert_eq!(r["y"].examples[0].example.to_string(), r#"IAM user "app-db" under path "/k8s/""#);
}

#[test]
fn tags_overlap_only_with_the_same_value_or_different_keys() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("b", &[])];
    let per_namespace =
        [policy("p", json!([{"namespaces": ["*"], "userTag": {"key": "k8s-namespace", "value": "{namespace}"}}]))];
    assert_eq!(report(&per_namespace, namespaces)["p"].overlapping_pairs, 0);
    let same = [policy("p", json!([{"namespaces": ["*"], "userTag": {"key": "team", "value": "shared"}}]))];
    assert_eq!(report(&same, namespaces)["p"].examples[0].example.to_string(), "an IAM user tagged team=shared");
    let two_keys = [
        policy("p", json!([{"namespaces": ["a"], "userTag": {"key": "team", "value": "{namespace}"}}])),
        policy("q", json!([{"namespaces": ["b"], "userTag": {"key": "owner", "value": "{namespace}"}}])),
    ];
    assert_eq!(
        report(&two_keys, namespaces)["p"].examples[0].example.to_string(),
        "an IAM user tagged team=a, owner=b"
    );
}

#[test]
fn rules_for_one_namespace_never_overlap_with_themselves() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("b", &[])];
    let policies = [
        policy("p", json!([{"namespaces": ["a"], "userNames": ["*"]}, {"namespaces": ["a"], "userNames": ["x*"]}])),
        policy("q", json!([{"namespaces": ["a"], "userPathPrefix": "/"}])),
    ];
    let r = report(&policies, namespaces);
    assert_eq!((r["p"].namespaces, r["p"].overlapping_pairs, r["q"].overlapping_pairs), (1, 0, 0));
}

#[test]
fn overlaps_across_policies_are_reported_on_both_after_the_policys_own() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("a-b", &[]), ("c", &[])];
    let policies = [
        policy("mine", json!([{"namespaces": ["a", "a-b"], "userNames": ["{namespace}-*"]}])),
        policy("theirs", json!([{"namespaces": ["c"], "userNames": ["a-*"]}])),
    ];
    let r = report(&policies, namespaces);
    assert_eq!(r["mine"].overlapping_pairs, 3, "a/a-b (own), a/c and a-b/c (with theirs)");
    assert_eq!(
        pairs(&r["mine"]),
        [("a", "a-b"), ("a", "c"), ("a-b", "c")].map(|(x, y)| (x.to_string(), y.to_string()))
    );
    assert_eq!(r["theirs"].overlapping_pairs, 2);
    let o = &r["theirs"].examples[0];
    assert_eq!((o.a.policy.as_str(), o.b.policy.as_str()), ("mine", "theirs"));
}

#[test]
fn the_report_does_not_depend_on_input_order_and_examples_are_capped() {
    let names: Vec<String> = (0..30).map(|i| format!("ns-{i:02}")).collect();
    let mut namespaces: Vec<(&str, &[(&str, &str)])> = names.iter().map(|n| (n.as_str(), &[][..])).collect();
    let mut policies = vec![
        policy("any", json!([{"namespaces": ["ns-0*"], "userNames": ["*"]}])),
        policy("other", json!([{"namespaces": ["ns-1*"], "userPathPrefix": "/k8s/{namespace}/"}])),
    ];
    let first = report(&policies, &namespaces);
    namespaces.reverse();
    policies.reverse();
    assert_eq!(report(&policies, &namespaces), first);
    let any = &first["any"];
    assert_eq!(any.namespaces, 10);
    assert_eq!(any.overlapping_pairs, 45 + 10 * 10, "among themselves, and with each of other's");
    assert_eq!(any.examples.len(), 10, "capped");
    assert!(any.examples.iter().all(|o| o.b.policy == "any"), "own pairs first");
}

#[test]
fn rules_that_match_no_user_grant_nothing() {
    let namespaces: &[(&str, &[(&str, &str)])] = &[("a", &[]), ("b", &[])];
    let policies = [policy("p", json!([{"namespaces": ["*"], "userNames": ["{ns}-*"]}]))];
    let r = &report(&policies, namespaces)["p"];
    assert_eq!((r.namespaces, r.overlapping_pairs), (0, 0));
}
