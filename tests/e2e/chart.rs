//! The Helm chart (charts/iam-key-operator) and the plain manifests (deploy/), against the real
//! helm, kubectl and kube-apiserver of the test environment: lint, schema, rendering with several
//! value sets, CRD copies, install, and then the operator binary run with nothing but the
//! installed ServiceAccount's token. No kubelet runs here, so "installed" means the API server
//! holds the objects, and "the RBAC is sufficient" means the binary, run outside the cluster with
//! the Deployment's own arguments and that identity, reconciles an example to Ready.

use crate::support;
use std::{
    collections::BTreeSet,
    fs::File,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use iam_key_operator::crd::IamAccessKey;
use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease, events::v1::Event, rbac::v1::ClusterRole};
use kube::{Api, api::PostParams};
use serde::Deserialize as _;
use serde_yaml::Value as Yaml;
use support::{Fixture, kubectl_ok, ready, tail, text};
use testenv::TestEnv;

const CHART: &str = "charts/iam-key-operator";
const CLUSTER: &str = "chart-test";

fn root() -> PathBuf {
    testenv::repo_root()
}

fn chart_dir() -> PathBuf {
    root().join(CHART)
}

/// `helm template` of the chart; panics with helm's message when it fails.
fn render(args: &[&str]) -> Vec<Yaml> {
    let out = try_render(args);
    assert!(out.status.success(), "helm template {args:?} failed:\n{}", text(&out));
    documents(&String::from_utf8_lossy(&out.stdout))
}

fn try_render(args: &[&str]) -> Output {
    let env = testenv::shared();
    let chart = chart_dir();
    // clusterName is required; a test's own --set comes later and wins.
    let mut all =
        vec!["template", "rel", chart.to_str().expect("utf-8"), "--namespace", "ops", "--set", "clusterName=test"];
    all.extend_from_slice(args);
    env.helm(all)
}

/// Two clusters with the same name sharing an AWS account delete each other's keys: the chart has
/// no default name and refuses to render without one, the binary refuses to start without one,
/// and `deploy/` leaves it to the overlay.
#[test]
fn the_cluster_name_is_never_implicit() {
    let out = try_render(&["--set", "clusterName="]);
    assert!(!out.status.success(), "the chart rendered without a cluster name");
    assert!(text(&out).contains("clusterName is required"), "{}", text(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_iam-key-operator"))
        .args(["run"])
        .env_remove("IKO_CLUSTER_NAME")
        .output()
        .expect("run the binary");
    assert!(!out.status.success(), "the operator started without --cluster-name");
    assert!(text(&out).contains("--cluster-name"), "{}", text(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_iam-key-operator"))
        .args(["run", "--cluster-name", "a", "--previous-cluster-name", "a"])
        .output()
        .expect("run the binary");
    assert!(!out.status.success() && text(&out).contains("must differ"), "{}", text(&out));
    let deploy = std::fs::read_to_string(root().join("deploy/deployment.yaml")).expect("deploy/deployment.yaml");
    assert!(!deploy.contains("- --cluster-name"), "deploy/ sets a cluster name every install would share");
    let docs = render(&["--set", "clusterName=prod-eu", "--set", "previousClusterName=default"]);
    let args = strings(
        &find(&docs, "Deployment", "rel-iam-key-operator").expect("Deployment")["spec"]["template"]["spec"]["containers"]
            [0]["args"],
    );
    for arg in ["--cluster-name=prod-eu", "--previous-cluster-name=default"] {
        assert!(args.contains(&arg.to_string()), "{arg} missing from {args:?}");
    }
}

fn documents(yaml: &str) -> Vec<Yaml> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Yaml::deserialize(d).expect("rendered YAML"))
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> Option<&'a Yaml> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn kinds(docs: &[Yaml]) -> BTreeSet<String> {
    docs.iter().filter_map(|d| d["kind"].as_str().map(str::to_string)).collect()
}

fn strings(v: &Yaml) -> Vec<String> {
    v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
}

/// `(apiGroup, resource, verb)` triples granted by a list of rules.
fn grants(rules: &Yaml) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules.as_sequence().into_iter().flatten() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    out.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    out
}

fn grant(group: &str, resource: &str, verb: &str) -> (String, String, String) {
    (group.into(), resource.into(), verb.into())
}

// ---------------------------------------------------------------------------------------------
// Files

fn yaml_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    names
}

#[test]
fn chart_and_deploy_crds_are_identical_to_the_generated_crds() {
    let generated = root().join("crds");
    let names = yaml_files(&generated);
    assert!(names.len() >= 2, "crds/ holds {names:?}");
    let copy = root().join("deploy/crds");
    assert_eq!(yaml_files(&copy), names, "{} holds other files than crds/", copy.display());
    for name in &names {
        let want = std::fs::read(generated.join(name)).expect("read crds/");
        let got = std::fs::read(copy.join(name)).expect("read the copy");
        assert!(want == got, "deploy/crds/{name} differs from crds/{name}: run make crds");
    }
    // The chart renders them from templates/crds.yaml: the same objects, plus the chart's labels
    // and (crds.keep) the resource policy.
    assert!(!chart_dir().join("crds").exists(), "the chart's crds/ would never be upgraded by Helm");
    let docs = render(&[]);
    for name in &names {
        let want: Yaml = serde_yaml::from_slice(&std::fs::read(generated.join(name)).expect("read")).expect("YAML");
        let crd_name = want["metadata"]["name"].as_str().expect("name");
        let mut got = find(&docs, "CustomResourceDefinition", crd_name).expect("rendered CRD").clone();
        assert_eq!(got["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm");
        assert_eq!(got["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
        let meta = got["metadata"].as_mapping_mut().expect("metadata");
        meta.remove("labels");
        meta.remove("annotations");
        assert!(got == want, "the chart's CRD {crd_name} differs from crds/{name}: run make crds");
    }
}

#[test]
fn helm_lint_passes_in_strict_mode() {
    let out = testenv::shared().helm(["lint", "--strict", chart_dir().to_str().expect("utf-8")]);
    assert!(out.status.success(), "helm lint --strict:\n{}", text(&out));
}

#[test]
fn default_values_render_a_restricted_leader_elected_operator_with_cluster_wide_rbac() {
    let docs = render(&[]);
    let name = "rel-iam-key-operator";
    let deploy = find(&docs, "Deployment", name).expect("Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // The "restricted" Pod Security Standard.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let sc = &container["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["serviceAccountName"], name);
    assert_eq!(container["image"], "iam-key-operator:0.1.0", "image tag defaults to appVersion");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    let args = strings(&container["args"]);
    for arg in [
        "run",
        "--leader-elect",
        "--lease-name=rel-iam-key-operator",
        "--metrics-addr=0.0.0.0:8080",
        "--metrics-auth=kubernetes",
    ] {
        assert!(args.contains(&arg.to_string()), "{arg} missing from {args:?}");
    }
    assert!(!args.iter().any(|a| a.starts_with("--namespace") || a.starts_with("--selector")), "{args:?}");
    // The downward API gives leader election its identity and the Lease's namespace.
    let env = container["env"].as_sequence().expect("env");
    for (var, field) in [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")] {
        let e = env.iter().find(|e| e["name"] == var).unwrap_or_else(|| panic!("{var} missing"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
    }

    let cluster_role = find(&docs, "ClusterRole", name).expect("ClusterRole");
    let granted = grants(&cluster_role["rules"]);
    for g in [
        grant("iam.keyop.dev", "iamaccesskeys", "watch"),
        grant("iam.keyop.dev", "iamaccesskeys/status", "patch"),
        grant("iam.keyop.dev", "iamaccesskeys/finalizers", "update"),
        grant("iam.keyop.dev", "iamaccesskeypolicies", "list"),
        grant("iam.keyop.dev", "iamaccesskeypolicies/status", "patch"),
        grant("", "secrets", "create"),
        grant("", "secrets", "update"),
        grant("", "namespaces", "watch"),
        grant("events.k8s.io", "events", "create"),
        grant("apps", "deployments", "patch"),
        // metrics.auth (on by default): the reviews behind /metrics.
        grant("authentication.k8s.io", "tokenreviews", "create"),
        grant("authorization.k8s.io", "subjectaccessreviews", "create"),
    ] {
        assert!(granted.contains(&g), "ClusterRole lacks {g:?}");
    }
    let reader = find(&docs, "ClusterRole", &format!("{name}-metrics-reader")).expect("metrics-reader ClusterRole");
    assert_eq!(reader["rules"].as_sequence().map(Vec::len), Some(1), "{reader:?}");
    assert_eq!(strings(&reader["rules"][0]["nonResourceURLs"]), ["/metrics"]);
    assert_eq!(strings(&reader["rules"][0]["verbs"]), ["get"]);
    assert!(find(&docs, "ClusterRoleBinding", &format!("{name}-metrics-reader")).is_none(), "no readers by default");
    // Never more than it needs: no wildcards, no spec writes, no patches of Secrets or events.
    assert!(!granted.iter().any(|(g, r, v)| g == "*" || r == "*" || v == "*"), "wildcard in {granted:?}");
    assert!(!granted.contains(&grant("iam.keyop.dev", "iamaccesskeys", "update")));
    assert!(
        !granted.contains(&grant("", "secrets", "patch"))
            && !granted.contains(&grant("events.k8s.io", "events", "patch"))
    );
    assert!(find(&docs, "ClusterRoleBinding", name).is_some());
    let lease_role = find(&docs, "Role", &format!("{name}-leader-election")).expect("leader-election Role");
    assert_eq!(lease_role["metadata"]["namespace"], "ops");
    assert!(grants(&lease_role["rules"]).contains(&grant("coordination.k8s.io", "leases", "create")));
    assert!(find(&docs, "RoleBinding", &format!("{name}-leader-election")).is_some());
    assert_eq!(docs.iter().filter(|d| d["kind"] == "Role").count(), 1, "only the leader-election Role");
    let service = find(&docs, "Service", &format!("{name}-metrics")).expect("metrics Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    assert!(find(&docs, "PodDisruptionBudget", name).is_some());
    assert!(find(&docs, "ServiceAccount", name).is_some());
    let optional = ["ServiceMonitor", "PrometheusRule", "NetworkPolicy"];
    assert!(optional.iter().all(|k| !kinds(&docs).contains(*k)), "optional objects rendered by default");
    // The CRDs are templates, so that helm upgrade upgrades them (tests/upgrade.rs).
    assert_eq!(docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").count(), 2);
    assert!(!kinds(&render(&["--set", "crds.enabled=false"])).contains("CustomResourceDefinition"));
    let unkept = render(&["--set", "crds.keep=false"]);
    assert!(
        unkept
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .all(|d| d["metadata"]["annotations"].is_null())
    );
}

#[test]
fn watch_namespaces_move_the_namespaced_rules_into_a_role_per_namespace() {
    let docs = render(&["--set", "watchNamespaces={team-a,team-b}", "--set", "selector=shard=1"]);
    let name = "rel-iam-key-operator";
    let args = strings(
        &find(&docs, "Deployment", name).expect("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"],
    );
    for arg in ["--namespace=team-a", "--namespace=team-b", "--selector=shard=1"] {
        assert!(args.contains(&arg.to_string()), "{arg} missing from {args:?}");
    }
    // Cluster-wide: only reading policies and namespace labels, the policies' status, and the
    // (cluster-scoped) reviews of metrics.auth.
    let mut cluster = grants(&find(&docs, "ClusterRole", name).expect("ClusterRole")["rules"]);
    for review in [
        grant("authentication.k8s.io", "tokenreviews", "create"),
        grant("authorization.k8s.io", "subjectaccessreviews", "create"),
        grant("iam.keyop.dev", "iamaccesskeypolicies/status", "patch"),
    ] {
        assert!(cluster.remove(&review), "ClusterRole lacks {review:?}");
    }
    let cluster_resources: BTreeSet<&str> = cluster.iter().map(|(_, r, _)| r.as_str()).collect();
    assert_eq!(cluster_resources, BTreeSet::from(["iamaccesskeypolicies", "namespaces"]));
    assert!(cluster.iter().all(|(_, _, v)| ["get", "list", "watch"].contains(&v.as_str())), "{cluster:?}");
    for ns in ["team-a", "team-b"] {
        let role = docs
            .iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == name && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no Role in {ns}"));
        let granted = grants(&role["rules"]);
        assert!(
            granted.contains(&grant("", "secrets", "create"))
                && granted.contains(&grant("iam.keyop.dev", "iamaccesskeys", "watch"))
        );
        let binding = docs
            .iter()
            .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["name"] == name && d["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("no RoleBinding in {ns}"));
        assert_eq!(binding["subjects"][0]["namespace"], "ops");
    }
}

#[test]
fn optional_monitoring_and_network_policy_render_when_enabled() {
    let docs = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=kube-prometheus",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "leaderElection.enabled=false",
    ]);
    let name = "rel-iam-key-operator";
    let monitor = find(&docs, "ServiceMonitor", name).expect("ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let rule = find(&docs, "PrometheusRule", name).expect("PrometheusRule");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().expect("rules");
    let expr = |alert: &str| -> String {
        let r = rules.iter().find(|r| r["alert"] == alert).unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(r["annotations"]["summary"].as_str().is_some_and(|s| !s.is_empty()));
        r["expr"].as_str().expect("expr").to_string()
    };
    assert!(expr("IamKeyOperatorReconcileErrors").contains(r#"iam_key_operator_reconciles_total{result!="ok"}"#));
    // The key alerts compare the exported timestamps with time(): no wait for a resync.
    assert!(
        expr("IamAccessKeyTooOld").contains("(time() - iam_key_operator_key_created_timestamp_seconds) > 7776000"),
        "90 days"
    );
    assert!(
        expr("IamAccessKeyRotationOverdue")
            .contains("(time() - iam_key_operator_next_rotation_timestamp_seconds) > 600")
    );
    // Prometheus templates survive Helm's templating.
    let summary = rules.iter().find(|r| r["alert"] == "IamAccessKeyTooOld").expect("rule")["annotations"]["summary"]
        .as_str()
        .expect("summary")
        .to_string();
    assert!(summary.contains("{{ $labels.namespace }}/{{ $labels.name }}"), "{summary}");
    let policy = find(&docs, "NetworkPolicy", name).expect("NetworkPolicy");
    let egress_ports: Vec<String> = policy["spec"]["egress"]
        .as_sequence()
        .expect("egress")
        .iter()
        .flat_map(|e| e["ports"].as_sequence().cloned().unwrap_or_default())
        .map(|p| serde_yaml::to_string(&p["port"]).expect("port").trim().to_string())
        .collect();
    for port in ["53", "443", "6443"] {
        assert!(egress_ports.contains(&port.to_string()), "egress port {port} missing: {egress_ports:?}");
    }
    assert!(!kinds(&docs).contains("Role"), "no leader-election Role without leader election");
    let args = strings(
        &find(&docs, "Deployment", name).expect("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"],
    );
    assert!(!args.iter().any(|a| a.starts_with("--leader-elect")), "{args:?}");
}

/// The dashboard ConfigMap: off by default; when on, the file of dashboards/ byte for byte under
/// the sidecar's label, which (like its namespace and annotations) can be changed.
#[test]
fn the_grafana_dashboard_configmap_renders_only_when_enabled_and_carries_the_json_unchanged() {
    let name = "rel-iam-key-operator-dashboard";
    let file = std::fs::read_to_string(chart_dir().join("dashboards/iam-key-operator.json")).expect("dashboard");
    serde_json::from_str::<serde_json::Value>(&file).expect("the dashboard is JSON");

    let docs = render(&[]);
    assert!(!kinds(&docs).contains("ConfigMap"), "a ConfigMap rendered by default");
    let docs = render(&["--set", "grafanaDashboard.enabled=false", "--set", "grafanaDashboard.namespace=monitoring"]);
    assert!(!kinds(&docs).contains("ConfigMap"), "a ConfigMap rendered while disabled");

    let docs = render(&["--set", "grafanaDashboard.enabled=true"]);
    let map = find(&docs, "ConfigMap", name).expect("dashboard ConfigMap");
    assert_eq!(map["metadata"]["namespace"], "ops");
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1", "the sidecar's default label, a string");
    assert_eq!(map["metadata"]["labels"]["app.kubernetes.io/instance"], "rel");
    assert!(map["metadata"]["annotations"].is_null(), "{map:?}");
    let data = map["data"].as_mapping().expect("data");
    assert_eq!(data.len(), 1, "one file: {:?}", data.keys().collect::<Vec<_>>());
    let carried = map["data"]["iam-key-operator.json"].as_str().expect("iam-key-operator.json");
    assert!(carried == file, "the ConfigMap's JSON differs from dashboards/iam-key-operator.json");

    let docs = render(&[
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "grafanaDashboard.label=example.com/dashboard",
        "--set-string",
        "grafanaDashboard.labelValue=iam",
        "--set",
        "grafanaDashboard.namespace=monitoring",
        "--set",
        "grafanaDashboard.annotations.grafana_folder=Security",
    ]);
    let map = find(&docs, "ConfigMap", name).expect("dashboard ConfigMap");
    assert_eq!(map["metadata"]["namespace"], "monitoring");
    assert_eq!(map["metadata"]["labels"]["example.com/dashboard"], "iam");
    assert!(map["metadata"]["labels"]["grafana_dashboard"].is_null(), "{map:?}");
    assert_eq!(map["metadata"]["annotations"]["grafana_folder"], "Security");
    assert_eq!(map["data"]["iam-key-operator.json"].as_str(), Some(file.as_str()));
}

#[test]
fn metrics_auth_renders_the_reviews_the_reader_role_and_the_scrape_token() {
    let name = "rel-iam-key-operator";
    let reader = format!("{name}-metrics-reader");
    let endpoint =
        |docs: &[Yaml]| find(docs, "ServiceMonitor", name).expect("ServiceMonitor")["spec"]["endpoints"][0].clone();
    let args = |docs: &[Yaml]| {
        strings(
            &find(docs, "Deployment", name).expect("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"],
        )
    };
    let reviews = [
        grant("authentication.k8s.io", "tokenreviews", "create"),
        grant("authorization.k8s.io", "subjectaccessreviews", "create"),
    ];

    // On by default: Prometheus sends its own ServiceAccount token.
    let docs = render(&["--set", "metrics.serviceMonitor.enabled=true"]);
    let e = endpoint(&docs);
    assert_eq!(e["bearerTokenFile"], "/var/run/secrets/kubernetes.io/serviceaccount/token");
    assert!(e["authorization"].is_null() && e["scheme"].is_null(), "{e:?}");

    // A token from a Secret instead.
    let docs = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.bearerTokenSecret.name=prom-token",
    ]);
    let e = endpoint(&docs);
    assert_eq!(e["authorization"]["type"], "Bearer");
    assert_eq!(e["authorization"]["credentials"]["name"], "prom-token");
    assert_eq!(e["authorization"]["credentials"]["key"], "token");
    assert!(e["bearerTokenFile"].is_null(), "{e:?}");

    // Readers are bound to the metrics-reader role.
    let docs = render(&[
        "--set",
        "metrics.auth.readers[0].kind=ServiceAccount",
        "--set",
        "metrics.auth.readers[0].name=prometheus-k8s",
        "--set",
        "metrics.auth.readers[0].namespace=monitoring",
        "--set",
        "metrics.auth.readers[1].kind=ServiceAccount",
        "--set",
        "metrics.auth.readers[1].name=scraper",
        "--set",
        "metrics.auth.readers[2].kind=Group",
        "--set",
        "metrics.auth.readers[2].name=observers",
    ]);
    let binding = find(&docs, "ClusterRoleBinding", &reader).expect("metrics-reader ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], reader.as_str());
    let subjects = binding["subjects"].as_sequence().expect("subjects");
    assert_eq!(subjects.len(), 3);
    assert_eq!(subjects[0]["name"], "prometheus-k8s");
    assert_eq!(subjects[0]["namespace"], "monitoring");
    assert_eq!(subjects[1]["namespace"], "ops", "a ServiceAccount defaults to the release namespace");
    assert_eq!(subjects[2]["kind"], "Group");
    assert_eq!(subjects[2]["apiGroup"], "rbac.authorization.k8s.io");

    // Off: open /metrics, no reviews, no reader role, no token in the ServiceMonitor.
    let docs = render(&["--set", "metrics.auth.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"]);
    assert!(args(&docs).contains(&"--metrics-auth=none".to_string()), "{:?}", args(&docs));
    let granted = grants(&find(&docs, "ClusterRole", name).expect("ClusterRole")["rules"]);
    assert!(reviews.iter().all(|r| !granted.contains(r)), "{granted:?}");
    assert!(find(&docs, "ClusterRole", &reader).is_none());
    let e = endpoint(&docs);
    assert!(e["bearerTokenFile"].is_null() && e["authorization"].is_null(), "{e:?}");
}

#[test]
fn schema_refuses_mistyped_and_unknown_values_naming_them() {
    for (set, named) in [
        ("replicaCount=two", "replicaCount"),
        ("replicaCoutn=2", "replicaCoutn"),
        ("operator.logFormat=xml", "logFormat"),
        ("operator.resync=an hour", "resync"),
        ("operator.iamRate=fast", "iamRate"),
        ("operator.iamRateMax=-1", "iamRateMax"),
        ("clusterName=prod/eu", "clusterName"),
        ("metrics.port=0", "port"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("leaderElection.enable=true", "enable"),
        ("metrics.auth.enabled=yes", "enabled"),
        ("metrics.auth.readers[0].kind=Pod", "kind"),
        ("grafanaDashboard.enabled=yes", "enabled"),
        ("grafanaDashboard.label=not a label", "label"),
    ] {
        // --set-string keeps "two" a string; --set would too, but be explicit about the type.
        let flag = if set.starts_with("metrics.port") { "--set" } else { "--set-string" };
        let out = try_render(&[flag, set]);
        assert!(!out.status.success(), "helm template accepted {set}");
        let message = text(&out);
        assert!(message.contains(named), "the refusal of {set} does not name {named}:\n{message}");
    }
    // A percentage is a valid disruption budget.
    let docs = render(&["--set", "podDisruptionBudget.minAvailable=50%"]);
    let pdb = find(&docs, "PodDisruptionBudget", "rel-iam-key-operator").expect("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], "50%");
    assert!(pdb["spec"]["maxUnavailable"].is_null(), "minAvailable replaces maxUnavailable");
}

/// Leaf paths of values.yaml: a key whose schema describes its properties is walked into;
/// anything else (scalars, lists, free-form objects such as `resources`) is a leaf.
fn value_paths(values: &Yaml, schema: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in values.as_mapping().expect("mapping") {
        let key = key.as_str().expect("string key");
        let path = if prefix.is_empty() { key.to_string() } else { format!("{prefix}.{key}") };
        let sub = &schema["properties"][key];
        assert!(!sub.is_null(), "values.schema.json does not describe {path}");
        assert!(sub["description"].as_str().is_some_and(|d| !d.is_empty()), "{path} has no description in the schema");
        if sub["properties"].is_object() && value.is_mapping() {
            // A structured object: every schema property must be in values.yaml too.
            for prop in sub["properties"].as_object().expect("properties").keys() {
                assert!(value.get(prop.as_str()).is_some(), "{path}.{prop} is in the schema but not in values.yaml");
            }
            value_paths(value, sub, &path, out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_value_is_described_in_values_yaml_the_readme_and_the_schema() {
    let dir = chart_dir();
    let values_text = std::fs::read_to_string(dir.join("values.yaml")).expect("values.yaml");
    let values: Yaml = serde_yaml::from_str(&values_text).expect("values.yaml");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("values.schema.json")).expect("schema")).expect("JSON");
    assert_eq!(schema["additionalProperties"], false, "the schema must refuse unknown top-level values");
    let mut leaves = Vec::new();
    value_paths(&values, &schema, "", &mut leaves);
    assert!(leaves.len() > 50, "only {} values found", leaves.len());
    for top in schema["properties"].as_object().expect("properties").keys() {
        assert!(top == "global" || values.get(top.as_str()).is_some(), "schema property {top} is not in values.yaml");
    }

    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
    let documented: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next().map(str::to_string))
        .filter(|p| !p.contains(' '))
        .collect();
    for leaf in &leaves {
        assert!(documented.contains(leaf), "README.md's values table lacks `{leaf}`");
    }
    let leaf_set: BTreeSet<&String> = leaves.iter().collect();
    for row in documented.iter().filter(|r| r.chars().next().is_some_and(|c| c.is_ascii_lowercase())) {
        assert!(leaf_set.contains(row), "README.md documents `{row}`, which is not a value");
    }

    // In values.yaml, each documented key has a comment right above it (or on its line).
    let documented_paths: BTreeSet<String> = {
        let mut all = BTreeSet::new();
        for leaf in &leaves {
            let parts: Vec<&str> = leaf.split('.').collect();
            for i in 1..=parts.len() {
                all.insert(parts[..i].join("."));
            }
        }
        all
    };
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut previous = "";
    for line in values_text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_key = trimmed.split(':').next().is_some_and(|k| {
            !k.is_empty() && !k.starts_with('#') && !k.starts_with('-') && k.chars().all(|c| c.is_ascii_alphanumeric())
        }) && trimmed.contains(':');
        if is_key {
            let key = trimmed.split(':').next().expect("key");
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            let path = match stack.last() {
                Some((_, parent)) => format!("{parent}.{key}"),
                None => key.to_string(),
            };
            if documented_paths.contains(&path) {
                assert!(
                    previous.trim_start().starts_with('#') || line.contains(" # "),
                    "values.yaml: `{path}` has no comment above it"
                );
            }
            stack.push((indent, path));
        }
        if !trimmed.is_empty() {
            previous = line;
        }
    }
}

#[test]
fn deploy_manifests_grant_the_same_rules_as_the_chart() {
    let docs = render(&[]);
    let chart_rules = grants(&find(&docs, "ClusterRole", "rel-iam-key-operator").expect("ClusterRole")["rules"]);
    let chart_lease = grants(&find(&docs, "Role", "rel-iam-key-operator-leader-election").expect("Role")["rules"]);
    let chart_edit = grants(&find(&docs, "ClusterRole", "rel-iam-key-operator-edit").expect("edit")["rules"]);
    let deploy = documents(&std::fs::read_to_string(root().join("deploy/rbac.yaml")).expect("deploy/rbac.yaml"));
    assert_eq!(grants(&find(&deploy, "ClusterRole", "iam-key-operator").expect("ClusterRole")["rules"]), chart_rules);
    assert_eq!(grants(&find(&deploy, "Role", "iam-key-operator-leader-election").expect("Role")["rules"]), chart_lease);
    assert_eq!(grants(&find(&deploy, "ClusterRole", "iam-key-operator-edit").expect("edit")["rules"]), chart_edit);
    assert_eq!(
        find(&deploy, "ClusterRole", "iam-key-operator-metrics-reader").expect("metrics-reader")["rules"],
        find(&docs, "ClusterRole", "rel-iam-key-operator-metrics-reader").expect("metrics-reader")["rules"]
    );
    // Same container settings where it matters.
    let chart_pod = &find(&docs, "Deployment", "rel-iam-key-operator").expect("Deployment")["spec"]["template"]["spec"];
    let deploy_docs =
        documents(&std::fs::read_to_string(root().join("deploy/deployment.yaml")).expect("deploy/deployment.yaml"));
    let deploy_pod =
        &find(&deploy_docs, "Deployment", "iam-key-operator").expect("Deployment")["spec"]["template"]["spec"];
    let (deploy_container, chart_container) = (&deploy_pod["containers"][0], &chart_pod["containers"][0]);
    for field in ["securityContext", "resources"] {
        assert_eq!(deploy_container[field], chart_container[field], "container {field}");
    }
    for args in [&deploy_container["args"], &chart_container["args"]] {
        assert!(strings(args).contains(&"--metrics-auth=kubernetes".to_string()), "/metrics is public: {args:?}");
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(deploy_container[probe]["httpGet"], chart_container[probe]["httpGet"], "{probe}");
    }
    assert_eq!(deploy_pod["securityContext"], chart_pod["securityContext"]);
}

// ---------------------------------------------------------------------------------------------
// Against the API server

async fn restricted_namespace(env: &TestEnv, prefix: &str) -> String {
    let ns = env.fresh_namespace(prefix).await.expect("namespace");
    let out = env.kubectl([
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/warn=restricted",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    ns
}

fn assert_no_pod_security_warning(what: &str, out: &Output) {
    let message = text(out);
    assert!(
        !message.to_lowercase().contains("podsecurity"),
        "{what} violates the restricted Pod Security Standard:\n{message}"
    );
}

fn helm_install(env: &TestEnv, release: &str, ns: &str, args: &[&str]) {
    let chart = chart_dir();
    // The shared environment has the CRDs already, from crds/ (tests/upgrade.rs installs them
    // with the chart).
    let mut all =
        vec!["install", release, chart.to_str().expect("utf-8"), "--namespace", ns, "--set", "crds.enabled=false"];
    all.extend_from_slice(args);
    let out = env.helm(&all);
    assert!(out.status.success(), "helm install {release}:\n{}", text(&out));
    assert_no_pod_security_warning("the chart's Deployment", &out);
    assert!(text(&out).contains("STATUS: deployed"), "{}", text(&out));
}

/// A TokenRequest token of the ServiceAccount (audience: the API server).
fn service_account_token(env: &TestEnv, ns: &str, sa: &str) -> String {
    kubectl_ok(env, &["create", "token", sa, "--namespace", ns, "--duration", "1h"]).trim().to_string()
}

/// The operator binary, started with the installed Deployment's arguments and environment,
/// outside the cluster, as the Deployment's ServiceAccount.
struct InstalledOperator {
    env: &'static TestEnv,
    child: Option<Child>,
    log_path: PathBuf,
    port: u16,
    pod_name: String,
    probes: Vec<String>,
    release_ns: String,
    deployment: String,
}

impl InstalledOperator {
    async fn start(env: &'static TestEnv, release_ns: &str, deployment: &str, extra_args: &[&str]) -> Self {
        let client = env.kube_client().await.expect("client");
        let deploy = Api::<Deployment>::namespaced(client, release_ns).get(deployment).await.expect("Deployment");
        let pod = deploy.spec.template.spec.expect("pod spec");
        let sa = pod.service_account_name.clone().expect("serviceAccountName");
        let container = &pod.containers[0];
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        // The Deployment's arguments, listening on loopback instead of the Pod's address.
        let mut args: Vec<String> = container
            .args
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|a| if a.starts_with("--metrics-addr=") { format!("--metrics-addr=127.0.0.1:{port}") } else { a })
            .collect();
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let pod_name = format!("{deployment}-7d4b9c-{port}");
        let kubeconfig = support::identity::service_account_kubeconfig(env, release_ns, &sa);
        let log_path = env.dir().join(format!("installed-operator-{release_ns}.log"));
        let log = File::create(&log_path).expect("log file");
        let mut cmd: Command = env.command(env!("CARGO_BIN_EXE_iam-key-operator"));
        let (key_id, secret) = support::identity::operator_aws_key(env);
        cmd.args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("AWS_ACCESS_KEY_ID", key_id)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env_remove("IKO_FAILPOINT");
        // The container's environment, with the downward API filled in as the kubelet would.
        for var in container.env.clone().unwrap_or_default() {
            let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
                (Some(v), _) => v.clone(),
                (None, Some(field)) if field.field_path == "metadata.name" => pod_name.clone(),
                (None, Some(field)) if field.field_path == "metadata.namespace" => release_ns.to_string(),
                _ => panic!("the test cannot provide env var {} of the Deployment", var.name),
            };
            cmd.env(&var.name, value);
        }
        let probes = [&container.liveness_probe, &container.readiness_probe]
            .into_iter()
            .filter_map(|p| p.as_ref()?.http_get.as_ref()?.path.clone())
            .collect();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn iam-key-operator");
        InstalledOperator {
            env,
            child: Some(child),
            log_path,
            port,
            pod_name,
            probes,
            release_ns: release_ns.to_string(),
            deployment: deployment.to_string(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.get_as(path, None).await
    }

    /// GET with `Authorization: Bearer <token>` when a token is given.
    async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        loop {
            let mut request = client.get(&url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Ok(r) = request.send().await {
                let status = r.status().as_u16();
                return (status, r.text().await.unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "nothing answers {url}; log:\n{}", tail(&self.log(), 30));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `/metrics` as a ServiceAccount bound to the chart's metrics-reader ClusterRole (what the
    /// chart's `metrics.auth` asks of a scraper).
    async fn scrape(&self) -> (u16, String) {
        let sa = "metrics-scraper";
        let reader = format!("{}-metrics-reader", self.deployment);
        let binding = format!("{}-{sa}", self.release_ns);
        kubectl_ok(self.env, &["create", "serviceaccount", sa, "--namespace", &self.release_ns]);
        kubectl_ok(
            self.env,
            &[
                "create",
                "clusterrolebinding",
                &binding,
                "--clusterrole",
                &reader,
                "--serviceaccount",
                &format!("{}:{sa}", self.release_ns),
            ],
        );
        let token = service_account_token(self.env, &self.release_ns, sa);
        self.get_as("/metrics", Some(&token)).await
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
            panic!("the operator exited ({status}); log:\n{}", tail(&self.log(), 40));
        }
    }
}

impl Drop for InstalledOperator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// deploy/examples/iamaccesskey.yaml, for this fixture's namespace and IAM user.
fn apply_example(f: &Fixture) -> String {
    let path = root().join("deploy/examples/iamaccesskey.yaml");
    let mut example: Yaml = serde_yaml::from_str(&std::fs::read_to_string(&path).expect("example")).expect("YAML");
    example["spec"]["userName"] = Yaml::String(f.user.clone());
    let name = example["metadata"]["name"].as_str().expect("name").to_string();
    let file = f.env.dir().join(format!("example-{}.yaml", f.ns));
    std::fs::write(&file, serde_yaml::to_string(&example).expect("yaml")).expect("write");
    kubectl_ok(f.env, &["apply", "--namespace", &f.ns, "-f", file.to_str().expect("utf-8")]);
    name
}

/// Waits for Ready=True; fails early, with the operator's log, when the operator exits or an
/// API call is forbidden.
async fn wait_ready_or_explain(f: &Fixture, op: &mut InstalledOperator, name: &str) -> IamAccessKey {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let obj = f.keys_api().get_opt(name).await.expect("get IamAccessKey");
        if let Some(obj) = &obj
            && ready(obj).is_some_and(|(s, _, _)| s == "True")
        {
            return obj.clone();
        }
        op.assert_running();
        let log = op.log();
        if let Some(line) = log.lines().find(|l| l.to_lowercase().contains("forbidden")) {
            panic!("the installed identity lacks a permission: {line}\nlog:\n{}", tail(&log, 30));
        }
        if Instant::now() > deadline {
            panic!(
                "{}/{name} not Ready after 90s; Ready: {:?}\noperator log:\n{}",
                f.ns,
                obj.as_ref().and_then(ready),
                tail(&log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every successful identity run must show: Ready, a working key in the Secret, events,
/// probes and metrics answering, and no authorization failure anywhere in the log.
async fn assert_reconciled_with_sufficient_rbac(f: &Fixture, op: &mut InstalledOperator, name: &str) {
    let obj = wait_ready_or_explain(f, op, name).await;
    let status = obj.status.expect("status");
    let secret = status.secret_name.expect("secretName");
    let (id, key) = f.secret_creds(&secret).await.expect("Secret with the key");
    assert_eq!(Some(&id), status.access_key_id.as_ref());
    assert!(f.authenticates(&id, &key).await, "the published key authenticates as {}", f.user);
    // Events went through (events.k8s.io create).
    let events = kubectl_ok(f.env, &["get", "events.events.k8s.io", "--namespace", &f.ns, "-o", "json"]);
    let events: serde_json::Value = serde_json::from_str(&events).expect("events JSON");
    assert!(
        events["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|e| e["reportingController"] == "iam-key-operator")),
        "no event from iam-key-operator in {}",
        f.ns
    );
    for probe in op.probes.clone() {
        assert_eq!(op.get(&probe).await.0, 200, "probe {probe}");
    }
    let (code, metrics) = op.scrape().await;
    assert_eq!(code, 200, "{metrics}");
    assert!(metrics.contains("iam_key_operator_reconciles_total"), "metrics:\n{metrics}");
    let log = op.log();
    assert!(!log.to_lowercase().contains("forbidden"), "an API call was forbidden:\n{}", tail(&log, 40));
    assert!(!log.contains(&key), "the secret access key is in the log");
}

#[tokio::test]
async fn helm_install_then_the_installed_identity_reconciles_an_example_to_ready() {
    let f = Fixture::with_user_path("chart-app", "/k8s/").await;
    let release_ns = restricted_namespace(f.env, "chart-rel").await;
    let release = "iko-cluster";
    helm_install(f.env, release, &release_ns, &["--set", &format!("clusterName={CLUSTER}")]);

    // The API server holds what the chart installs.
    let name = format!("{release}-iam-key-operator");
    let metrics = format!("{name}-metrics");
    let lease_role = format!("{name}-leader-election");
    for (kind, object) in [
        ("deployment", &name),
        ("serviceaccount", &name),
        ("service", &metrics),
        ("poddisruptionbudget", &name),
        ("role", &lease_role),
        ("rolebinding", &lease_role),
    ] {
        kubectl_ok(f.env, &["get", kind, object, "--namespace", &release_ns]);
    }
    kubectl_ok(f.env, &["get", "clusterrole", &name]);
    kubectl_ok(f.env, &["get", "clusterrolebinding", &name]);

    // The cluster-wide install, limited to the test namespace so it leaves other tests alone.
    let mut op = InstalledOperator::start(f.env, &release_ns, &name, &[&format!("--namespace={}", f.ns)]).await;
    let example = apply_example(&f);
    assert_reconciled_with_sufficient_rbac(&f, &mut op, &example).await;

    // Leader election ran with the installed identity in the release namespace.
    let lease = Api::<Lease>::namespaced(f.client.clone(), &release_ns).get(&name).await.expect("the Lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity), Some(op.pod_name.clone()));
    let tags = f.user_tags().await;
    assert_eq!(tags["iam.keyop.dev/owner"], format!("{CLUSTER}/{}/{example}", f.ns), "clusterName from the chart");
}

#[tokio::test]
async fn watch_namespaces_install_reconciles_with_namespaced_roles_only() {
    let f = Fixture::with_user_path("chart-ns-app", "/k8s/").await;
    let other = f.env.fresh_namespace("chart-ns-other").await.expect("namespace");
    let release_ns = restricted_namespace(f.env, "chart-ns-rel").await;
    let release = "iko-namespaced";
    helm_install(
        f.env,
        release,
        &release_ns,
        &[
            "--set",
            &format!("watchNamespaces={{{}}}", f.ns),
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicaCount=1",
            "--set",
            &format!("clusterName={CLUSTER}"),
        ],
    );
    let name = format!("{release}-iam-key-operator");
    let sa = format!("system:serviceaccount:{release_ns}:{name}");
    let can = |verb: &str, resource: &str, ns: &str| {
        let out = f.env.kubectl(["auth", "can-i", verb, resource, "--namespace", ns, "--as", &sa]);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can("create", "secrets", &f.ns), "may write Secrets in the watched namespace");
    assert!(!can("get", "secrets", &other), "must not read Secrets outside the watched namespaces");
    assert!(!can("list", "secrets", &release_ns));
    assert!(can("list", "iamaccesskeypolicies.iam.keyop.dev", &other), "policies are cluster-wide");

    // No extra --namespace: the Deployment's own arguments carry the scope.
    let mut op = InstalledOperator::start(f.env, &release_ns, &name, &[]).await;
    let example = apply_example(&f);
    assert_reconciled_with_sufficient_rbac(&f, &mut op, &example).await;
}

#[tokio::test]
async fn a_missing_rbac_rule_is_reported_as_a_forbidden_kubernetes_error() {
    let f = Fixture::with_user_path("chart-deny-app", "/k8s/").await;
    let release_ns = restricted_namespace(f.env, "chart-deny-rel").await;
    let release = "iko-deny";
    helm_install(f.env, release, &release_ns, &["--set", &format!("clusterName={CLUSTER}")]);
    let name = format!("{release}-iam-key-operator");

    // Take `create` away from the Secrets rule, as a hand-edited or outdated ClusterRole would.
    let roles: Api<ClusterRole> = Api::all(f.client.clone());
    let installed = roles.get(&name).await.expect("ClusterRole");
    let mut reduced = installed.clone();
    for rule in reduced.rules.iter_mut().flatten() {
        if rule.resources.as_ref().is_some_and(|r| r.contains(&"secrets".to_string())) {
            rule.verbs.retain(|v| v != "create");
        }
    }
    assert_ne!(installed.rules, reduced.rules, "the ClusterRole has a secrets rule");
    roles.replace(&name, &PostParams::default(), &reduced).await.expect("replace ClusterRole");

    let mut op = InstalledOperator::start(f.env, &release_ns, &name, &[&format!("--namespace={}", f.ns)]).await;
    let example = apply_example(&f);
    let obj = f.wait_reason(&example, "KubernetesError").await;
    let (status, _, message) = ready(&obj).expect("Ready condition");
    assert_eq!(status, "False");
    assert!(
        message.contains("forbidden") && message.contains("secrets"),
        "the condition should say which call was forbidden: {message}"
    );
    // The API server's own words, not a dump of the client's status struct; the same in the event.
    assert!(
        message.starts_with(r#"creating the Secret: secrets is forbidden: User "system:serviceaccount:"#)
            && message
                .contains(&format!(r#"cannot create resource "secrets" in API group "" in the namespace "{}""#, f.ns))
            && message.ends_with("(403 Forbidden)"),
        "{message}"
    );
    for dump in ["Status {", "ApiError", "Some(", "details"] {
        assert!(!message.contains(dump), "{dump:?} in {message}");
    }
    // Nothing of the refused object: no word as long as a secret access key (40) or its base64.
    let secret_like = |w: &&str| w.len() >= 40;
    assert!(
        !message.split(|c: char| !(c.is_ascii_alphanumeric() || "+/=".contains(c))).any(|w| secret_like(&w)),
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(f.client.clone(), &f.ns);
    // The event follows the status write.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let notes: Vec<String> = events
            .list(&Default::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("KubernetesError"))
            .filter_map(|e| e.note)
            .collect();
        if notes.contains(&message) {
            break;
        }
        assert!(Instant::now() < deadline, "a KubernetesError event with the condition's message: {notes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(f.secrets().get_opt("uploader-aws").await.expect("get").is_none(), "no Secret without create");
    op.assert_running();

    // Give the verb back (the installed rules): the same resource becomes Ready, and IAM ends
    // with exactly the one key status names (the unpublished attempts were cleaned up).
    let mut restored = roles.get(&name).await.expect("ClusterRole");
    restored.rules = installed.rules.clone();
    roles.replace(&name, &PostParams::default(), &restored).await.expect("restore ClusterRole");
    // Wake the resource now rather than at the end of its backoff.
    kubectl_ok(f.env, &["annotate", "iamaccesskey", &example, "--namespace", &f.ns, "test/nudge=1", "--overwrite"]);
    let obj = f
        .wait_for(&example, Duration::from_secs(120), "Ready=True", |o| ready(o).is_some_and(|(s, _, _)| s == "True"))
        .await;
    assert_eq!(ready(&obj).expect("Ready").1, "Ready");
    f.assert_consistent(&example, &[]).await;
}

#[tokio::test]
async fn metrics_answer_only_a_token_the_api_server_allows_and_probes_stay_open() {
    let env = testenv::shared();
    let release_ns = restricted_namespace(env, "chart-metrics-rel").await;
    // The operator watches only an empty namespace: this test is about its HTTP endpoints.
    let idle = env.fresh_namespace("chart-metrics-idle").await.expect("namespace");
    let release = "iko-metrics";
    helm_install(
        env,
        release,
        &release_ns,
        &[
            "--set",
            &format!("clusterName={CLUSTER}"),
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "replicaCount=1",
            "--set",
            "metrics.auth.readers[0].kind=ServiceAccount",
            "--set",
            "metrics.auth.readers[0].name=prometheus",
        ],
    );
    let name = format!("{release}-iam-key-operator");
    for sa in ["prometheus", "tenant"] {
        kubectl_ok(env, &["create", "serviceaccount", sa, "--namespace", &release_ns]);
    }
    let mut op = InstalledOperator::start(env, &release_ns, &name, &[&format!("--namespace={idle}")]).await;

    // Probes: open, whatever the token.
    assert_eq!(op.get("/healthz").await.0, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while op.get("/readyz").await.0 != 200 {
        op.assert_running();
        assert!(Instant::now() < deadline, "/readyz never 200; log:\n{}", tail(&op.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(op.get_as("/healthz", Some("not-a-token")).await.0, 200);

    let reader = service_account_token(env, &release_ns, "prometheus");
    let tenant = service_account_token(env, &release_ns, "tenant");
    let operator = service_account_token(env, &release_ns, &name);
    let mut codes = Vec::new();
    for (who, token, want) in [
        ("no token", None, 401),
        ("a token the API server does not know", Some("not-a-token"), 401),
        ("a ServiceAccount without the grant", Some(tenant.as_str()), 403),
        ("the operator's own ServiceAccount", Some(operator.as_str()), 403),
        ("a ServiceAccount bound to the chart's metrics-reader", Some(reader.as_str()), 200),
        ("the same again (cached verdict)", Some(reader.as_str()), 200),
        ("the refused one again (cached verdict)", Some(tenant.as_str()), 403),
    ] {
        let (code, body) = op.get_as("/metrics", token).await;
        assert_eq!(code, want, "/metrics with {who}: {body}\nlog:\n{}", tail(&op.log(), 30));
        if code == 200 {
            assert!(body.contains("iam_key_operator_reconcile_duration_seconds_count"), "{body}");
        } else {
            assert!(!body.contains("iam_key_operator_"), "metrics leaked with {who}: {body}");
        }
        codes.push(format!("{who}: {code}"));
    }
    eprintln!("/metrics answered {}", codes.join(", "));
    // The operator's identity had what the reviews need (a refused review would be a 500).
    op.assert_running();
    let log = op.log();
    assert!(!log.to_lowercase().contains("forbidden"), "an API call was forbidden:\n{}", tail(&log, 40));
    assert!(!log.contains(&reader) && !log.contains(&tenant), "a bearer token is in the log");
}

#[tokio::test]
async fn kustomize_base_applies_with_kubectl_and_meets_the_restricted_standard() {
    let env = testenv::shared();
    let deploy = root().join("deploy");
    // What the README tells people to run (a server-side dry run cannot stand in for it: the
    // namespaced objects need the namespace the same apply creates).
    let out = env.kubectl(["apply", "-k", deploy.to_str().expect("utf-8")]);
    assert!(out.status.success(), "kubectl apply -k deploy/:\n{}", text(&out));
    // The namespace enforces "restricted" and warns; the Deployment must not draw a warning.
    assert_no_pod_security_warning("deploy/deployment.yaml", &out);
    let ns = "iam-key-operator";
    let labels = kubectl_ok(env, &["get", "namespace", ns, "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains(r#""pod-security.kubernetes.io/enforce":"restricted""#), "{labels}");
    for (kind, name) in [
        ("deployment", "iam-key-operator"),
        ("serviceaccount", "iam-key-operator"),
        ("service", "iam-key-operator-metrics"),
        ("role", "iam-key-operator-leader-election"),
        ("rolebinding", "iam-key-operator-leader-election"),
        ("poddisruptionbudget", "iam-key-operator"),
    ] {
        kubectl_ok(env, &["get", kind, name, "--namespace", ns]);
    }
    kubectl_ok(env, &["get", "clusterrole", "iam-key-operator"]);
    kubectl_ok(env, &["get", "clusterrolebinding", "iam-key-operator"]);
    let sa = "system:serviceaccount:iam-key-operator:iam-key-operator";
    for (verb, resource) in [
        ("patch", "iamaccesskeys/status"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
    ] {
        let can = env.kubectl(["auth", "can-i", verb, resource, "--all-namespaces", "--as", sa]);
        assert_eq!(String::from_utf8_lossy(&can.stdout).trim(), "yes", "{verb} {resource}");
    }
    // The arguments are ones the binary accepts.
    let args = kubectl_ok(
        env,
        &[
            "get",
            "deployment",
            "iam-key-operator",
            "--namespace",
            ns,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].args}",
        ],
    );
    let args: Vec<String> = serde_json::from_str(&args).expect("args JSON");
    assert_binary_accepts(&args);
    // Applying again changes nothing (what a GitOps sync loop relies on). Compared by
    // resourceVersion: kubectl reports a PodDisruptionBudget "configured" even when its patch
    // changes nothing.
    let versions = || {
        kubectl_ok(
            env,
            &[
                "get",
                "-k",
                deploy.to_str().expect("utf-8"),
                "-o",
                r#"jsonpath={range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}"#,
            ],
        )
    };
    let before = versions();
    assert!(before.lines().count() >= 12, "{before}");
    kubectl_ok(env, &["apply", "-k", deploy.to_str().expect("utf-8")]);
    assert_eq!(versions(), before, "a second apply changed objects");
}

/// `iam-key-operator <args> --help` parses the arguments without running anything.
fn assert_binary_accepts(args: &[String]) {
    let mut with_help = args.to_vec();
    with_help.push("--help".into());
    let out = Command::new(env!("CARGO_BIN_EXE_iam-key-operator")).args(&with_help).output().expect("run the binary");
    assert!(out.status.success(), "iam-key-operator refuses {args:?}:\n{}", text(&out));
}

#[test]
fn rendered_arguments_are_accepted_by_the_binary() {
    for set in [
        &[][..],
        &["--set", "watchNamespaces={a,b}", "--set", "selector=shard=1", "--set", "operator.logFormat=text"][..],
        &["--set", "leaderElection.enabled=false"][..],
        &["--set", "metrics.auth.enabled=false"][..],
        &["--set", "operator.iamRate=0"][..],
        &["--set", "operator.iamRate=2.5", "--set", "operator.iamBurst=5"][..],
        &["--set", "operator.iamRateMax=100", "--set", "operator.iamRateMin=0.5"][..],
    ] {
        let docs = render(set);
        let deploy = find(&docs, "Deployment", "rel-iam-key-operator").expect("Deployment");
        assert_binary_accepts(&strings(&deploy["spec"]["template"]["spec"]["containers"][0]["args"]));
    }
    // The adaptive rate by default; a fixed one only when asked for.
    let args = |set: &[&str]| {
        let docs = render(set);
        let deploy = find(&docs, "Deployment", "rel-iam-key-operator").expect("Deployment");
        strings(&deploy["spec"]["template"]["spec"]["containers"][0]["args"])
    };
    let default = args(&[]);
    assert!(default.iter().any(|a| a == "--iam-rate-max=50") && default.iter().any(|a| a == "--iam-rate-min=1"));
    assert!(!default.iter().any(|a| a.starts_with("--iam-rate=")), "adaptive by default: {default:?}");
    assert!(args(&["--set", "operator.iamRate=0"]).iter().any(|a| a == "--iam-rate=0"), "0 stays unlimited");
}

#[tokio::test]
async fn every_optional_object_is_valid_for_the_api_server() {
    // NetworkPolicy, PodDisruptionBudget (as a percentage), extra env, pull secrets, probes...
    // checked by the API server's own validation (server-side dry run). ServiceMonitor and
    // PrometheusRule need the prometheus-operator CRDs, which this API server does not have.
    let env = testenv::shared();
    let ns = env.fresh_namespace("chart-options").await.expect("namespace");
    let chart = chart_dir();
    let values = env.dir().join(format!("values-{ns}.yaml"));
    std::fs::write(
        &values,
        r#"
networkPolicy:
  enabled: true
  metricsFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
  extraEgress:
    - to: [{ipBlock: {cidr: 10.0.0.0/8}}]
      ports: [{port: 4566, protocol: TCP}]
podDisruptionBudget: {minAvailable: 50%}
grafanaDashboard: {enabled: true, annotations: {grafana_folder: Security}}
imagePullSecrets: [{name: regcred}]
extraEnv:
  - {name: HTTPS_PROXY, value: "http://proxy:3128"}
  - name: FROM_SECRET
    valueFrom: {secretKeyRef: {name: proxy, key: url}}
aws: {region: eu-west-1, iamEndpoint: "http://localstack:4566", stsEndpoint: "http://localstack:4566"}
serviceAccount: {annotations: {eks.amazonaws.com/role-arn: "arn:aws:iam::111122223333:role/iko"}}
priorityClassName: system-cluster-critical
topologySpreadConstraints:
  - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway,
     labelSelector: {matchLabels: {app.kubernetes.io/name: iam-key-operator}}}
tolerations: [{key: dedicated, operator: Equal, value: platform, effect: NoSchedule}]
clusterName: prod-eu
previousClusterName: default
metrics:
  service: {type: NodePort}
  auth:
    readers:
      - {kind: ServiceAccount, name: prometheus-k8s, namespace: monitoring}
      - {kind: User, name: jane@example.com}
admissionPolicy:
  enabled: true
  validationActions: [Warn, Audit]
  namespaceSelector: {matchLabels: {chart-options-test: never-matches}}
"#,
    )
    .expect("values");
    let out = env.helm([
        "template",
        "opts",
        chart.to_str().expect("utf-8"),
        "--namespace",
        &ns,
        "-f",
        values.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let docs = documents(&String::from_utf8_lossy(&out.stdout));
    assert!(kinds(&docs).contains("NetworkPolicy"));
    assert!(find(&docs, "ConfigMap", "opts-iam-key-operator-dashboard").is_some());
    // The API server compiles the admission policy's CEL on the dry run too (tests/e2e/admission.rs
    // exercises it).
    assert!(
        kinds(&docs).contains("ValidatingAdmissionPolicy") && kinds(&docs).contains("ValidatingAdmissionPolicyBinding")
    );
    assert!(find(&docs, "ClusterRoleBinding", "opts-iam-key-operator-metrics-reader").is_some());
    let rendered = env.dir().join(format!("rendered-{ns}.yaml"));
    let all: Vec<String> = docs.iter().map(|d| serde_yaml::to_string(d).expect("yaml")).collect();
    std::fs::write(&rendered, all.join("---\n")).expect("write");
    let out = env.kubectl(["apply", "--dry-run=server", "-f", rendered.to_str().expect("utf-8")]);
    assert!(out.status.success(), "the API server refuses the rendered chart:\n{}", text(&out));
}

#[tokio::test]
async fn examples_are_accepted_by_the_api_server() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("chart-examples").await.expect("namespace");
    let examples = root().join("deploy/examples");
    let names = yaml_files(&examples);
    assert!(names.len() >= 7, "{names:?}");
    for name in names {
        let path = examples.join(&name);
        let out = env.kubectl(["apply", "--dry-run=server", "--namespace", &ns, "-f", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{name}:\n{}", text(&out));
    }
}
