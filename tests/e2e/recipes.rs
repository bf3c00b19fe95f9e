//! docs/recipes.md against a running operator: its IamAccessKey is reconciled, and the Secret
//! written carries exactly what the Reloader and External Secrets recipes rely on (the
//! annotations and labels from spec.secret, the Secret's name, its data keys). The Deployments are
//! accepted by the API server (server-side dry run); the PushSecrets, whose CRD is not installed
//! here, are checked field by field against ESO's `external-secrets.io/v1alpha1` PushSecret.

use std::collections::{BTreeMap, BTreeSet};

use crate::support;
use iam_key_operator::crd::IamAccessKey;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Secret};
use kube::api::PostParams;
use serde_json::Value;
use support::*;

/// Every document of every ```yaml block of docs/recipes.md.
fn recipe_documents() -> Vec<Value> {
    let text = std::fs::read_to_string(testenv::repo_root().join("docs/recipes.md")).expect("docs/recipes.md");
    let mut docs = vec![];
    for block in text.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().expect("closed block");
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("recipe YAML parses");
            if !value.is_null() {
                docs.push(value);
            }
        }
    }
    docs
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

/// The Secret names a Pod template references (envFrom, env valueFrom, volumes), and the data
/// keys it reads by name.
fn secret_references(pod: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut names, mut data_keys) = (BTreeSet::new(), BTreeSet::new());
    for c in pod["containers"].as_array().into_iter().flatten() {
        for e in c["envFrom"].as_array().into_iter().flatten() {
            names.extend(e["secretRef"]["name"].as_str().map(String::from));
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let r = &e["valueFrom"]["secretKeyRef"];
            names.extend(r["name"].as_str().map(String::from));
            data_keys.extend(r["key"].as_str().map(String::from));
        }
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        names.extend(v["secret"]["secretName"].as_str().map(String::from));
    }
    (names, data_keys)
}

#[tokio::test]
async fn the_secret_carries_what_the_reloader_and_external_secrets_recipes_read() {
    let docs = recipe_documents();
    let f = Fixture::new("recipes").await;
    let _op = f.operator(&[]);

    // The recipes' IamAccessKey, in the fixture's namespace and for its IAM user.
    let resources = of_kind(&docs, "IamAccessKey");
    assert_eq!(resources.len(), 1, "the recipes share one IamAccessKey");
    let mut resource = resources[0].clone();
    let doc_ns = resource["metadata"]["namespace"].as_str().expect("namespace").to_string();
    resource["metadata"]["namespace"] = f.ns.clone().into();
    resource["spec"]["userName"] = f.user.clone().into();
    let resource: IamAccessKey = serde_json::from_value(resource).expect("an IamAccessKey");
    let name = resource.metadata.name.clone().expect("name");
    f.keys_api().create(&PostParams::default(), &resource).await.expect("create the recipes' IamAccessKey");
    f.wait_ready(&name).await;

    let secret_name = resource.spec.secret.name.clone().expect("the recipes name the Secret");
    let secret: Secret = f.secrets().get(&secret_name).await.expect("the operator's Secret");
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let data_keys: BTreeSet<String> = secret.data.clone().unwrap_or_default().into_keys().collect();
    // spec.secret's labels and annotations, exactly as written.
    assert!(!resource.spec.secret.labels.is_empty() && !resource.spec.secret.annotations.is_empty());
    for (k, v) in &resource.spec.secret.labels {
        assert_eq!(labels.get(k), Some(v), "label {k} on the Secret: {labels:?}");
    }
    for (k, v) in &resource.spec.secret.annotations {
        assert_eq!(annotations.get(k), Some(v), "annotation {k} on the Secret: {annotations:?}");
    }
    assert_eq!(data_keys, BTreeSet::from(["AWS_ACCESS_KEY_ID".to_string(), "AWS_SECRET_ACCESS_KEY".to_string()]));

    // Reloader: each Deployment is valid for the API server and points at this Secret the way its
    // annotation says.
    let deployments = of_kind(&docs, "Deployment");
    assert!(deployments.len() >= 3, "the three Reloader modes");
    let api: kube::Api<Deployment> = kube::Api::namespaced(f.client.clone(), &f.ns);
    for doc in deployments {
        let deploy_name = doc["metadata"]["name"].as_str().expect("name").to_string();
        assert_eq!(doc["metadata"]["namespace"], doc_ns.as_str(), "{deploy_name}: same namespace as the IamAccessKey");
        let mut doc = doc.clone();
        doc["metadata"]["namespace"] = f.ns.clone().into();
        let deploy: Deployment = serde_json::from_value(doc.clone()).expect("a Deployment");
        api.create(&PostParams { dry_run: true, ..Default::default() }, &deploy)
            .await
            .unwrap_or_else(|e| panic!("the API server refuses Deployment {deploy_name}: {e}"));
        let (referenced, read_keys) = secret_references(&doc["spec"]["template"]["spec"]);
        assert!(referenced.contains(&secret_name), "{deploy_name} does not use the Secret: {referenced:?}");
        assert!(read_keys.is_subset(&data_keys), "{deploy_name} reads {read_keys:?}; the Secret has {data_keys:?}");
        let a = string_map(&doc["metadata"]["annotations"]);
        if let Some(list) = a.get("secret.reloader.stakater.com/reload") {
            assert!(list.split(',').any(|s| s.trim() == secret_name), "{deploy_name} reloads on {list}");
        } else if a.get("reloader.stakater.com/search").map(String::as_str) == Some("true") {
            assert_eq!(annotations.get("reloader.stakater.com/match").map(String::as_str), Some("true"));
        } else {
            assert_eq!(a.get("reloader.stakater.com/auto").map(String::as_str), Some("true"), "{deploy_name}: {a:?}");
        }
    }

    // External Secrets: PushSecrets of ESO's v1alpha1 shape that select this Secret and push keys
    // it has.
    let pushes = of_kind(&docs, "PushSecret");
    assert!(pushes.len() >= 2, "by name and by label");
    let spec_fields: BTreeSet<String> =
        ["refreshInterval", "secretStoreRefs", "updatePolicy", "deletionPolicy", "selector", "data", "template"]
            .map(String::from)
            .into();
    for push in pushes {
        let push_name = push["metadata"]["name"].as_str().expect("name");
        assert_eq!(push["apiVersion"], "external-secrets.io/v1alpha1", "{push_name}");
        assert_eq!(push["metadata"]["namespace"], doc_ns.as_str(), "{push_name}: the Secret's namespace");
        let spec = &push["spec"];
        assert!(keys(spec).is_subset(&spec_fields), "{push_name}: unknown spec fields {:?}", keys(spec));
        for store in spec["secretStoreRefs"].as_array().expect("secretStoreRefs") {
            assert!(["SecretStore", "ClusterSecretStore"].contains(&store["kind"].as_str().expect("kind")));
            assert!(store["name"].is_string());
        }
        if let Some(p) = spec["updatePolicy"].as_str() {
            assert!(["Replace", "IfNotExists"].contains(&p), "{push_name}: updatePolicy {p}");
        }
        if let Some(p) = spec["deletionPolicy"].as_str() {
            assert!(["Delete", "None"].contains(&p), "{push_name}: deletionPolicy {p}");
        }
        let selector = &spec["selector"]["secret"];
        assert_eq!(keys(&spec["selector"]), BTreeSet::from(["secret".to_string()]), "{push_name}");
        match (selector["name"].as_str(), selector["selector"].is_object()) {
            (Some(n), false) => assert_eq!(n, secret_name, "{push_name} selects another Secret"),
            (None, true) => {
                assert_eq!(keys(&selector["selector"]), BTreeSet::from(["matchLabels".to_string()]));
                for (k, v) in string_map(&selector["selector"]["matchLabels"]) {
                    assert_eq!(labels.get(&k), Some(&v), "{push_name} selects by {k}={v}; the Secret has {labels:?}");
                }
            }
            other => panic!("{push_name}: selector.secret needs exactly one of name and selector: {other:?}"),
        }
        let data = spec["data"].as_array().expect("data");
        let pushed: BTreeSet<String> =
            data.iter().map(|d| d["match"]["secretKey"].as_str().expect("secretKey").to_string()).collect();
        assert_eq!(pushed, data_keys, "{push_name} pushes both keys of the Secret");
        for d in data {
            assert_eq!(keys(d), BTreeSet::from(["match".to_string()]), "{push_name}: {d}");
            assert_eq!(keys(&d["match"]), BTreeSet::from(["secretKey".to_string(), "remoteRef".to_string()]));
            let remote = &d["match"]["remoteRef"];
            assert!(remote["remoteKey"].as_str().is_some_and(|k| !k.is_empty()), "{push_name}: remoteKey");
            assert!(
                keys(remote).is_subset(&BTreeSet::from(["remoteKey".to_string(), "property".to_string()])),
                "{remote}"
            );
        }
    }
}
