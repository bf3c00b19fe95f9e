//! The CRDs on a real API server: valid resources are accepted, invalid ones are refused by the
//! API server itself with a message that names the field, and `kubectl explain` shows the docs.

use serde_json::{Value, json};

fn kubectl_apply(ns: &str, doc: &Value) -> (bool, String) {
    kubectl_verb("apply", ns, doc)
}

/// `kubectl <verb> -n <ns> -f <doc>`: whether it succeeded, and what it printed.
fn kubectl_verb(verb: &str, ns: &str, doc: &Value) -> (bool, String) {
    let env = testenv::shared();
    let path = env.dir().join(format!("apply-{ns}-{}.json", rand_suffix()));
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    let out = env.kubectl([verb, "-n", ns, "-f", path.to_str().unwrap()]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Each case is refused, with `field` in the message.
fn assert_refused(ns: &str, cases: Vec<(String, Value, &str)>) {
    for (name, doc, field) in cases {
        let (ok, out) = kubectl_apply(ns, &doc);
        assert!(!ok, "{name}: accepted but should be refused");
        assert!(out.contains(field), "{name}: message should name {field}: {out}");
    }
}

fn policy_doc(name: &str, rule: Value) -> Value {
    json!({"apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy", "metadata": {"name": name}, "spec": {"rules": [rule]}})
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn key(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn shipped_examples_are_accepted() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("examples").await.unwrap();
    for entry in std::fs::read_dir(testenv::repo_root().join("deploy/examples")).unwrap() {
        let path = entry.unwrap().path();
        let out = env.kubectl(["apply", "-n", &ns, "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
}

#[tokio::test]
async fn invalid_specs_are_refused_by_the_api_server_naming_the_field() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("invalid").await.unwrap();
    let cases = [
        ("space", json!({"userName": "has space"}), "spec.userName"),
        ("long", json!({"userName": "u".repeat(65)}), "spec.userName"),
        ("upper", json!({"userName": "u", "secret": {"name": "Upper"}}), "spec.secret.name"),
        ("format", json!({"userName": "u", "secret": {"format": "Json"}}), "spec.secret.format"),
        ("status", json!({"userName": "u", "keyStatus": "Enabled"}), "spec.keyStatus"),
        ("duration", json!({"userName": "u", "rotation": {"interval": "30 days"}}), "spec.rotation.interval"),
        ("grace", json!({"userName": "u", "rotation": {"gracePeriod": "1.5h"}}), "spec.rotation.gracePeriod"),
        (
            "label",
            json!({"userName": "u", "secret": {"labels": {"app.kubernetes.io/managed-by": "me"}}}),
            "spec.secret.labels",
        ),
        ("policy", json!({"userName": "u", "deletionPolicy": "Orphan"}), "spec.deletionPolicy"),
    ];
    for (name, spec, field) in cases {
        let (ok, out) = kubectl_apply(&ns, &key(name, spec));
        assert!(!ok, "{name}: accepted but should be refused");
        assert!(out.contains(field), "{name}: message should name {field}: {out}");
    }
}

#[tokio::test]
async fn user_name_cannot_change() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("immutable").await.unwrap();
    let (ok, out) = kubectl_apply(&ns, &key("k", json!({"userName": "first"})));
    assert!(ok, "{out}");
    let (ok, out) = kubectl_apply(&ns, &key("k", json!({"userName": "second"})));
    assert!(!ok, "userName change accepted");
    assert!(out.contains("spec.userName is immutable"), "{out}");
}

#[tokio::test]
async fn policy_rules_need_namespaces_and_users() {
    let policy = |name: &str, rule: Value| json!({"apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy", "metadata": {"name": name}, "spec": {"rules": [rule]}});
    let ok_rule = json!({"namespaces": ["team-*"], "userPathPrefix": "/k8s/{namespace}/", "maxKeyAge": "90d"});
    let (ok, out) = kubectl_apply("default", &policy(&format!("ok-{}", rand_suffix()), ok_rule));
    assert!(ok, "{out}");
    let (ok, out) = kubectl_apply("default", &policy(&format!("bad-{}", rand_suffix()), json!({"userNames": ["x"]})));
    assert!(!ok && out.contains("a rule needs namespaces or namespaceSelector"), "{out}");
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let env = testenv::shared();
    // testenv waits until the CRDs are in /openapi/v3, so explain works at once.
    let out = env.kubectl(["explain", "iamaccesskey.spec"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["userName", "Name of the IAM user", "deletionPolicy", "rotation"] {
        assert!(text.contains(needle), "explain lacks {needle:?}:\n{text}");
    }
    let out = env.kubectl(["get", "iak", "-A"]);
    assert!(out.status.success(), "short name iak works: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn secret_labels_annotations_and_restart_targets_must_be_kubernetes_syntax() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("syntax").await.unwrap();
    let labels = |labels: Value| json!({"userName": "u", "secret": {"labels": labels}});
    let annotations = |annotations: Value| json!({"userName": "u", "secret": {"annotations": annotations}});
    let cases = [
        (
            "target-space",
            json!({"userName": "u", "restartTargets": [{"kind": "Deployment", "name": "a b"}]}),
            "spec.restartTargets[0].name",
        ),
        (
            "target-upper",
            json!({"userName": "u", "restartTargets": [{"kind": "Deployment", "name": "ok"}, {"kind": "DaemonSet", "name": "Agent"}]}),
            "spec.restartTargets[1].name",
        ),
        ("label-key-space", labels(json!({"bad key": "x"})), "spec.secret.labels"),
        ("label-key-long", labels(json!({"a".repeat(64): "x"})), "spec.secret.labels"),
        ("label-key-prefix-upper", labels(json!({"Example.com/team": "x"})), "spec.secret.labels"),
        ("label-key-empty-prefix", labels(json!({"/team": "x"})), "spec.secret.labels"),
        ("label-key-two-slashes", labels(json!({"a/b/c": "x"})), "spec.secret.labels"),
        ("label-key-trailing-dash", labels(json!({"team-": "x"})), "spec.secret.labels"),
        ("label-value-space", labels(json!({"team": "has space"})), "spec.secret.labels"),
        ("label-value-long", labels(json!({"team": "v".repeat(64)})), "spec.secret.labels"),
        ("label-value-edge", labels(json!({"team": "-billing"})), "spec.secret.labels"),
        ("annotation-key-space", annotations(json!({"a b": "x"})), "spec.secret.annotations"),
        (
            "annotation-key-long",
            annotations(json!({format!("example.com/{}", "n".repeat(64)): "x"})),
            "spec.secret.annotations",
        ),
        ("annotation-key-empty", annotations(json!({"": "x"})), "spec.secret.annotations"),
    ];
    let cases = cases.into_iter().map(|(name, spec, field)| (name.to_string(), key(name, spec), field)).collect();
    assert_refused(&ns, cases);
    // The messages say what the syntax is.
    let (_, out) = kubectl_apply(&ns, &key("msg", labels(json!({"bad key": "x"}))));
    assert!(out.contains("every key must be a Kubernetes label key"), "{out}");
    let (_, out) = kubectl_apply(&ns, &key("msg", labels(json!({"team": "has space"}))));
    assert!(out.contains("every value must be empty or 1-63"), "{out}");

    // Annotations may hold free text, but not more than a Secret can carry.
    let half = "x".repeat(65 * 1024);
    let (ok, out) = kubectl_verb("create", &ns, &key("big", annotations(json!({"a": half, "b": half}))));
    assert!(!ok && out.contains("spec.secret.annotations") && out.contains("128 KiB"), "{out}");
    // Counted in bytes, as the API server counts a Secret's annotations: 70,000 two-byte
    // characters are too many.
    let (ok, out) = kubectl_verb("create", &ns, &key("wide", annotations(json!({"note": "é".repeat(70_000)}))));
    assert!(!ok && out.contains("128 KiB"), "{out}");

    let valid = json!({
        "userName": "u",
        "secret": {
            "labels": {"example.com/team": "billing", "tier": "", "app.kubernetes.io/part-of": "a_b.c-d", "n": "v".repeat(63)},
            "annotations": {"Example.COM/Note": "free text: spaces, ünïcode, \"quotes\"", "a": "", "x".repeat(63): "y"},
        },
        "restartTargets": [{"kind": "Deployment", "name": "uploader.v2"}, {"kind": "StatefulSet", "name": "db-0"}],
    });
    let (ok, out) = kubectl_apply(&ns, &key("valid", valid));
    assert!(ok, "valid labels, annotations and targets are accepted: {out}");
}

#[tokio::test]
async fn durations_are_bounded_exactly_like_the_operators_parser() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("bounds").await.unwrap();
    for (i, (duration, valid)) in iam_key_operator::crd::BOUNDARY_CASES.iter().enumerate() {
        assert_eq!(duration.parse::<iam_key_operator::crd::Duration>().is_ok(), *valid, "{duration}: parser");
        let doc = key(&format!("b{i}"), json!({"userName": "u", "rotation": {"retainInactive": duration}}));
        let (ok, out) = kubectl_apply(&ns, &doc);
        assert_eq!(
            ok,
            *valid,
            "{duration}: the API server should {}: {out}",
            if *valid { "accept it" } else { "refuse it" }
        );
        if !valid {
            assert!(out.contains("spec.rotation.retainInactive"), "{duration}: names the field: {out}");
        }
    }
    // The message says what the bound is.
    let (_, out) = kubectl_apply(&ns, &key("max", json!({"userName": "u", "rotation": {"maxWait": "3651d"}})));
    assert!(out.contains("spec.rotation.maxWait") && out.contains("at most 3650d"), "{out}");
    // Every duration field is bounded, in both kinds.
    for f in ["interval", "gracePeriod", "retainInactive", "usageCheckInterval", "maxWait"] {
        let doc = key(
            &format!("huge-{}", f.to_lowercase()),
            json!({"userName": "u", "rotation": {f: "99999999999999999999d"}}),
        );
        let (ok, out) = kubectl_apply(&ns, &doc);
        assert!(!ok && out.contains(&format!("spec.rotation.{f}")), "{f}: {out}");
    }
    for f in ["maxKeyAge", "deactivateUnusedAfter", "minRotationInterval"] {
        let rule = json!({"namespaces": ["a"], "userNames": ["u"], f: "3651d"});
        let (ok, out) =
            kubectl_apply("default", &policy_doc(&format!("huge-{}-{}", f.to_lowercase(), rand_suffix()), rule));
        assert!(!ok && out.contains(&format!("spec.rules[0].{f}")) && out.contains("at most 3650d"), "{f}: {out}");
    }
}

#[tokio::test]
async fn rotation_intervals_have_a_floor() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("floor").await.unwrap();
    let rotation = |r: Value| json!({"userName": "u", "rotation": r});
    let cases = [
        ("zero", rotation(json!({"interval": "0s", "gracePeriod": "0s"})), "spec.rotation.interval"),
        ("subsecond", rotation(json!({"interval": "4999ms", "gracePeriod": "1s"})), "spec.rotation.interval"),
        ("inside-default-grace", rotation(json!({"interval": "5m"})), "spec.rotation.interval"),
        ("equal-to-grace", rotation(json!({"interval": "1h", "gracePeriod": "60m"})), "spec.rotation.interval"),
        (
            "usage-check",
            rotation(json!({"waitForUnused": true, "usageCheckInterval": "500ms"})),
            "spec.rotation.usageCheckInterval",
        ),
    ];
    let cases = cases.into_iter().map(|(name, spec, field)| (name.to_string(), key(name, spec), field)).collect();
    assert_refused(&ns, cases);
    let (_, out) = kubectl_apply(&ns, &key("msg", rotation(json!({"interval": "1s"}))));
    assert!(out.contains("spec.rotation.interval must be at least 5s"), "{out}");
    let (_, out) = kubectl_apply(&ns, &key("msg", rotation(json!({"interval": "5m"}))));
    assert!(out.contains("must be longer than spec.rotation.gracePeriod"), "{out}");

    // The values the other tests and the examples use stay valid.
    for (name, r) in [
        ("floor", json!({"interval": "5s", "gracePeriod": "1s"})),
        ("tests", json!({"interval": "8s", "gracePeriod": "3s", "retainInactive": "3s", "usageCheckInterval": "3s"})),
        ("monthly", json!({"interval": "30d"})),
        ("instant-retire", json!({"gracePeriod": "0s", "retainInactive": "0s", "maxWait": "0s"})),
    ] {
        let (ok, out) = kubectl_apply(&ns, &key(name, rotation(r)));
        assert!(ok, "{name}: {out}");
    }
    // An explicit null interval (no schedule) passes the rules that compare it.
    let (ok, out) = kubectl_verb("create", &ns, &key("null", rotation(json!({"interval": null, "gracePeriod": "1h"}))));
    assert!(ok, "{out}");
}

#[tokio::test]
async fn policy_fields_are_validated_naming_the_field() {
    let rule = |extra: Value| {
        let mut rule = json!({"namespaces": ["team-*"], "userNames": ["{namespace}-*"]});
        rule.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        rule
    };
    let selector = |s: Value| rule(json!({"namespaceSelector": s}));
    let cases = [
        ("age-floor", rule(json!({"maxKeyAge": "1s"})), "spec.rules[0].maxKeyAge"),
        ("age-below-min", rule(json!({"maxKeyAge": "7d", "minRotationInterval": "30d"})), "spec.rules[0].maxKeyAge"),
        (
            "unused-huge",
            rule(json!({"deactivateUnusedAfter": "99999999999999999999d"})),
            "spec.rules[0].deactivateUnusedAfter",
        ),
        (
            "operator",
            selector(json!({"matchExpressions": [{"key": "tier", "operator": "Has"}]})),
            "spec.rules[0].namespaceSelector",
        ),
        (
            "in-without-values",
            selector(json!({"matchExpressions": [{"key": "tier", "operator": "In"}]})),
            "spec.rules[0].namespaceSelector",
        ),
        (
            "exists-with-values",
            selector(json!({"matchExpressions": [{"key": "tier", "operator": "Exists", "values": ["x"]}]})),
            "spec.rules[0].namespaceSelector",
        ),
        (
            "expression-key",
            selector(json!({"matchExpressions": [{"key": "bad key", "operator": "Exists"}]})),
            "spec.rules[0].namespaceSelector",
        ),
        ("match-labels", selector(json!({"matchLabels": {"tier": "bad value"}})), "spec.rules[0].namespaceSelector"),
        ("namespace-glob", json!({"namespaces": ["Team A"], "userNames": ["u"]}), "spec.rules[0].namespaces[0]"),
        ("user-glob", json!({"namespaces": ["a"], "userNames": ["ok", "has space"]}), "spec.rules[0].userNames[1]"),
        // A paused resource is not reconciled: a rule cannot both allow that and set limits.
        ("pause-with-age", rule(json!({"allowPause": true, "maxKeyAge": "90d"})), "spec.rules[0].allowPause"),
        (
            "pause-with-unused",
            rule(json!({"allowPause": true, "deactivateUnusedAfter": "30d"})),
            "spec.rules[0].allowPause",
        ),
        ("pause-not-bool", rule(json!({"allowPause": "yes"})), "spec.rules[0].allowPause"),
    ];
    let cases = cases
        .into_iter()
        .map(|(name, r, field)| (name.to_string(), policy_doc(&format!("{name}-{}", rand_suffix()), r), field))
        .collect();
    assert_refused("default", cases);

    let valid = rule(json!({
        "namespaceSelector": {
            "matchLabels": {"example.com/tier": "data"},
            "matchExpressions": [
                {"key": "example.com/env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        },
        "maxKeyAge": "90d",
        "minRotationInterval": "90d",
        "deactivateUnusedAfter": "30d",
        "allowPause": false,
        "allowRetain": true,
    }));
    let pausable = rule(json!({"allowPause": true, "allowRetain": true}));
    for valid in [valid, pausable] {
        let name = format!("valid-{}", rand_suffix());
        let (ok, out) = kubectl_apply("default", &policy_doc(&name, valid));
        assert!(ok, "{out}");
        let _ = testenv::shared().kubectl(["delete", "iamaccesskeypolicy", &name]);
    }
}
