//! Running it like a platform team would: leader election between replicas, metrics, probes,
//! and scoping by label selector.

use crate::support;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use kube::api::{Patch, PatchParams};
use serde_json::json;
use support::*;

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_standby_takes_over_when_it_dies() {
    let f = Fixture::new("leader").await;
    // The Lease lives in the installed identity's namespace, where its RBAC allows it.
    let lease_name = format!("lease-{}", f.ns);
    let lease = ["--leader-elect", "--lease-name", &lease_name, "--lease-duration", "4s"];
    let mut first = Operator::start(f.env, &f.ns, &[("POD_NAME", "first")], &lease);
    // Let the first one take the lease before the second starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = Operator::start(f.env, &f.ns, &[("POD_NAME", "second")], &lease);
    f.create("app", json!({})).await;
    let key = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    assert!(first.reconciles(None).await > 0, "the leader reconciles");
    assert_eq!(second.reconciles(None).await, 0, "the standby does not");
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", second.metrics_port)).await.unwrap();
    assert!(ready.status().is_success(), "a standby is ready (rollouts must not stall on it)");

    first.kill();
    let killed = Instant::now();
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    f.wait_for("app", Duration::from_secs(30), "rotation by the standby", |o| {
        o.status.as_ref().and_then(|s| s.access_key_id.clone()).is_some_and(|id| id != key)
    })
    .await;
    let failover = killed.elapsed();
    // The reconcile that rotated is counted when it returns, a moment after its status write.
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.reconciles(None).await == 0 {
        assert!(Instant::now() < deadline, "the standby never reconciled:\n{}", tail(&second.log(), 30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failover < Duration::from_secs(15), "took over within the lease duration plus a retry: {failover:?}");
    println!("failover after SIGKILL of the leader: {failover:?}");
}

/// The value of a per-resource gauge on a metrics page.
fn gauge(page: &str, metric: &str, ns: &str, name: &str) -> Option<f64> {
    let prefix = format!("{metric}{{namespace=\"{ns}\",name=\"{name}\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.parse().expect("a number"))
}

#[tokio::test]
async fn metrics_and_probes_answer() {
    let f = Fixture::new("metrics").await;
    let op = f.operator(&[]);
    f.create("app", json!({"rotation": {"interval": "30d"}})).await;
    let status = f.wait_ready("app").await.status.expect("status");
    let base = format!("http://127.0.0.1:{}", op.metrics_port);
    for path in ["/healthz", "/readyz"] {
        let r = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let text = op.metrics().await;
    for name in [
        "iam_key_operator_reconciles_total{result=\"ok\"}",
        "iam_key_operator_reconcile_duration_seconds_bucket",
        "iam_key_operator_iam_calls_total{operation=\"CreateAccessKey\",outcome=\"ok\"} 1",
        "iam_key_operator_rotations_total{reason=\"Initial\"} 1",
        &format!("iam_key_operator_condition{{namespace=\"{}\",name=\"app\",reason=\"Ready\"}} 1", f.ns),
        &format!("iam_key_operator_keys_managed{{namespace=\"{}\",name=\"app\"}} 1", f.ns),
        &format!("iam_key_operator_key_age_seconds{{namespace=\"{}\",name=\"app\"}}", f.ns),
        &format!("iam_key_operator_rotation_overdue{{namespace=\"{}\",name=\"app\"}} 0", f.ns),
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    // The timestamps are status' createDate and nextRotationAt, in Unix seconds.
    let created = status.create_date.expect("createDate").0.as_second() as f64;
    let due = status.next_rotation_at.expect("nextRotationAt").0.as_second() as f64;
    assert_eq!(due - created, 30.0 * 86400.0, "a 30-day interval");
    for (metric, want) in [
        ("iam_key_operator_key_created_timestamp_seconds", created),
        ("iam_key_operator_next_rotation_timestamp_seconds", due),
    ] {
        let got = gauge(&text, metric, &f.ns, "app").unwrap_or_else(|| panic!("metrics lack {metric}:\n{text}"));
        assert!((got - want).abs() < 1.0, "{metric} is {got}, status says {want}");
    }

    // The resource's series go with it.
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = op.metrics().await;
        let left: Vec<&str> = text.lines().filter(|l| l.contains(&format!("namespace=\"{}\"", f.ns))).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "series left after the deletion: {left:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Metric names in a PromQL expression: the identifiers that are not functions, aggregations,
/// keywords or label names (in `{...}` matchers and `by`/`without`/`on`/`ignoring`/`group_*`
/// lists). Strings and `[...]` ranges are skipped; a Grafana variable anywhere else could stand
/// for a metric name, so it is refused, as is a selector by `__name__`.
fn promql_metric_names(expr: &str) -> Vec<String> {
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "inf", "nan"];
    assert!(!expr.contains("__name__"), "a selector by __name__ hides its metric: {expr}");
    let chars: Vec<char> = expr.chars().collect();
    // Index just past the group opened at `open`, strings and nested groups included.
    let past = |open: usize| -> usize {
        let (start, end) = (
            chars[open],
            match chars[open] {
                '(' => ')',
                '[' => ']',
                _ => '}',
            },
        );
        let (mut depth, mut j) = (0, open);
        while j < chars.len() {
            match chars[j] {
                q @ ('"' | '\'' | '`') => {
                    j += 1;
                    while j < chars.len() && chars[j] != q {
                        j += if chars[j] == '\\' && q != '`' { 2 } else { 1 };
                    }
                }
                c if c == start => depth += 1,
                c if c == end => {
                    depth -= 1;
                    if depth == 0 {
                        return j + 1;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        panic!("unbalanced {start} in {expr}");
    };
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`' | '{' | '[') {
            // A string is a group of its own quotes.
            i = if matches!(c, '{' | '[') {
                past(i)
            } else {
                let mut j = i + 1;
                while j < chars.len() && chars[j] != c {
                    j += if chars[j] == '\\' && c != '`' { 2 } else { 1 };
                }
                assert!(j < chars.len(), "unterminated string in {expr}");
                j + 1
            };
        } else if c == '$' {
            panic!("a Grafana variable outside a string or range: {expr}");
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number (or a duration): 0.9, 1e3, 0x1f, 5m.
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            // A function or aggregation: `f(`, or `sum by (...) (` / `sum without (...) (`.
            let rest: String = chars[next..].iter().take(8).collect();
            let call = rest.starts_with('(')
                || ["by", "without"].iter().any(|m| {
                    rest.strip_prefix(m).is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
                });
            if call && GROUPING.contains(&word.as_str()) {
                i = past(next);
            } else if !call && !KEYWORDS.contains(&word.as_str()) && !GROUPING.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_metric_names_finds_only_metric_names() {
    for (expr, want) in [
        ("up", &["up"][..]),
        (r#"sum by (reason) (rate(a_total{result!="ok", x=~"$namespace"}[$__rate_interval])) > 0"#, &["a_total"][..]),
        ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))", &["h_bucket"][..]),
        ("max without (instance) (time() - b) / on (namespace, name) group_left (x) c > bool 1e3", &["b", "c"][..]),
        (r#"count(d{a="}\"{"} or vector(0)) unless e offset 1h"#, &["d", "e"][..]),
        ("sum(rate(f[1h:5m])) * 60", &["f"][..]),
    ] {
        assert_eq!(promql_metric_names(expr), want, "{expr}");
    }
}

/// What a metrics page (OpenMetrics text) exports: metric families and their samples' names.
struct Exported {
    families: BTreeMap<String, String>,
    samples: BTreeSet<String>,
}

impl Exported {
    fn parse(page: &str) -> Exported {
        let mut families = BTreeMap::new();
        let mut samples = BTreeSet::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
                families.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                samples.insert(line.split(['{', ' ']).next().expect("sample name").to_string());
            }
        }
        Exported { families, samples }
    }

    /// Whether a name a query uses has samples on the page, and belongs to a family of the type
    /// its suffix implies: `_total` a counter, `_bucket`/`_sum`/`_count` a histogram.
    fn has(&self, name: &str) -> bool {
        let family = |base: Option<&str>, kinds: &[&str]| {
            base.and_then(|b| self.families.get(b)).is_some_and(|k| kinds.contains(&k.as_str()))
        };
        self.samples.contains(name)
            && (family(Some(name), &["gauge", "unknown"])
                || family(name.strip_suffix("_total"), &["counter"])
                || ["_bucket", "_sum", "_count"].iter().any(|s| family(name.strip_suffix(s), &["histogram"])))
    }
}

/// Every PromQL expression of a Grafana dashboard, with where it is: the panels' targets
/// (also in collapsed rows) and the query variables.
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
                out.push((format!("panel {title:?} query {}", target["refId"]), expr.to_string()));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().expect("templating.list") {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().expect("variable name");
        let query = var["query"]["query"].as_str().or(var["query"].as_str()).expect("variable query");
        // label_values(<series selector>, <label>)
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or_else(|| panic!("variable {name}: not label_values(<selector>, <label>): {query}"));
        assert_eq!(var["definition"].as_str(), Some(query), "variable {name}: definition and query differ");
        out.push((format!("variable {name}"), selector.to_string()));
    }
    out
}

/// The chart's alerts (its PrometheusRule, every alert on), with where each is.
fn chart_alert_queries(env: &testenv::TestEnv) -> Vec<(String, String)> {
    let chart = testenv::repo_root().join("charts/iam-key-operator");
    let out = env.helm([
        "template",
        "rel",
        chart.to_str().expect("utf-8"),
        "--set",
        "clusterName=test",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    let rule: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("PrometheusRule YAML");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().expect("rules");
    rules
        .iter()
        .map(|r| {
            let alert = r["alert"].as_str().expect("alert");
            (format!("alert {alert}"), r["expr"].as_str().expect("expr").to_string())
        })
        .collect()
}

/// The Grafana dashboard the chart ships loads as JSON, and every query in it (and in the
/// chart's alerts) names only metrics that a running operator, having reconciled a resource,
/// exports.
#[tokio::test]
async fn the_grafana_dashboard_and_the_chart_alerts_query_only_exported_metrics() {
    let path = testenv::repo_root().join("charts/iam-key-operator/dashboards/iam-key-operator.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "iam-key-operator");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    // Panels name the data source through the dashboard's variable, so import works anywhere.
    let variables: BTreeSet<&str> =
        dashboard["templating"]["list"].as_array().expect("list").iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(variables.contains("datasource") && variables.contains("namespace"), "{variables:?}");
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "panel id {} twice", panel["id"]);
        if panel["type"] != "row" {
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {}", panel["title"]);
        }
    }

    // Every per-resource series exists: a schedule (next rotation) and a key that was used.
    let f = Fixture::new("dashboard").await;
    let op = f.operator(&[("IKO_LAST_USED_REFRESH", "3s")]);
    f.create("app", json!({"rotation": {"interval": "30d"}})).await;
    f.wait_ready("app").await;
    let last_used = format!("iam_key_operator_key_last_used_timestamp_seconds{{namespace=\"{}\",name=\"app\"}}", f.ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    let page = loop {
        let page = op.metrics().await;
        if page.contains(&last_used) {
            break page;
        }
        assert!(Instant::now() < deadline, "no last use on /metrics:\n{page}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let exported = Exported::parse(&page);
    let alerts = chart_alert_queries(f.env);
    assert_eq!(alerts.len(), 3, "{alerts:?}");
    let mut used = BTreeSet::new();
    for (place, expr) in queries.iter().chain(&alerts) {
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "{place} names no metric: {expr}");
        for name in names {
            assert!(exported.has(&name), "{place} uses {name}, which the operator does not export:\n{expr}\n\n{page}");
            used.insert(name);
        }
    }
    for name in [
        "iam_key_operator_condition",
        "iam_key_operator_key_created_timestamp_seconds",
        "iam_key_operator_next_rotation_timestamp_seconds",
        "iam_key_operator_key_last_used_timestamp_seconds",
        "iam_key_operator_rotations_total",
        "iam_key_operator_reconciles_total",
        "iam_key_operator_iam_calls_total",
    ] {
        assert!(used.contains(name), "the dashboard does not use {name}: {used:?}");
    }
    println!(
        "{} dashboard and {} alert queries use {} exported metrics: {used:?}",
        queries.len(),
        alerts.len(),
        used.len()
    );
}

#[tokio::test]
async fn selector_limits_what_an_instance_reconciles() {
    let f = Fixture::new("shard").await;
    let _op = Operator::start(f.env, &f.ns, &[], &["--selector", "shard=a"]);
    let mut obj: iam_key_operator::crd::IamAccessKey = serde_json::from_value(
        json!({"metadata": {"name": "other", "labels": {"shard": "b"}}, "spec": {"userName": f.user}}),
    )
    .unwrap();
    f.keys_api().create(&Default::default(), &obj).await.unwrap();
    obj.metadata.name = Some("mine".into());
    obj.metadata.labels = Some([("shard".to_string(), "a".to_string())].into());
    obj.spec.secret.name = Some("mine".into());
    f.keys_api().create(&Default::default(), &obj).await.unwrap();
    f.wait_ready("mine").await;
    let other = f.keys_api().get("other").await.unwrap();
    assert!(other.status.is_none() && other.metadata.finalizers.is_none(), "shard b untouched by the shard a instance");
}

/// A cluster renamed without `--previous-cluster-name` finds every user claimed by its former
/// self; with it, each resource takes over its tags (no new key) and rotation goes on.
#[tokio::test]
async fn renaming_the_cluster_takes_over_the_old_tags_and_rotation_goes_on() {
    let f = Fixture::new("rename").await;
    let spec = json!({"rotation": {"gracePeriod": "1s", "retainInactive": "1s"}});
    let old = Operator::start(f.env, &f.ns, &[], &["--cluster-name", "old-name"]);
    f.create("app", spec).await;
    let first = f.wait_ready("app").await.status.unwrap().access_key_id.unwrap();
    drop(old);

    let renamed = Operator::start(f.env, &f.ns, &[], &["--cluster-name", "new-name"]);
    let patch = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    f.wait_reason("app", "UserClaimed").await;
    drop(renamed);

    let _op =
        Operator::start(f.env, &f.ns, &[], &["--cluster-name", "new-name", "--previous-cluster-name", "old-name"]);
    let rotated = f
        .wait_for("app", Duration::from_secs(60), "rotated under the new name", |o| {
            o.status
                .as_ref()
                .is_some_and(|s| s.access_key_id.as_deref().is_some_and(|id| id != first) && s.keys.len() == 1)
        })
        .await;
    let second = rotated.status.unwrap().access_key_id.unwrap();
    let tags = f.user_tags().await;
    assert_eq!(tags["iam.keyop.dev/owner"], format!("new-name/{}/app", f.ns), "the claim moved");
    assert_eq!(tags[&second], format!("iam-key-operator:new-name/{}/app", f.ns));
    assert!(!tags.values().any(|v| v.contains("old-name")), "no tag of the old name is left: {tags:?}");
    let events = f.env.kubectl(["get", "events.events.k8s.io", "-n", &f.ns, "-o", "jsonpath={.items[*].reason}"]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("OwnershipRenamed"));
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty());
}
