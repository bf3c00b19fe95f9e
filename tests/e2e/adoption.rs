//! Taking over what already exists, against the real API server and moto (enforcing
//! signatures): `spec.secret.creationPolicy` (Adopt, Merge, Orphan) and `spec.adopt` (a key
//! made by Terraform, a Crossplane connection Secret, or by hand), each path of docs/migration.md.

use crate::support;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use iam_key_operator::crd::{IamAccessKey, KeyPhase, OWNER_TAG};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::*;

/// A key made the way Terraform's `aws_iam_access_key` makes one: straight in IAM, with the
/// admin's credentials. `(id, secret)`.
async fn key_made_outside(f: &Fixture, user: &str) -> (String, String) {
    let out = f.env.iam_client().create_access_key().user_name(user).send().await.expect("CreateAccessKey");
    let key = out.access_key().expect("key");
    (key.access_key_id().to_string(), key.secret_access_key().to_string())
}

/// A Secret made by hand (or by `kubectl create secret generic`): `data` as plain strings.
async fn hand_made_secret(f: &Fixture, name: &str, extra: Value, data: &[(&str, &str)]) -> Secret {
    let mut secret = json!({"metadata": {"name": name}, "stringData": {}});
    for (k, v) in data {
        secret["stringData"][k] = json!(v);
    }
    merge(&mut secret, &extra);
    let secret: Secret = serde_json::from_value(secret).expect("Secret");
    f.secrets().create(&PostParams::default(), &secret).await.expect("create Secret")
}

fn merge(into: &mut Value, extra: &Value) {
    match (into, extra) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// The controller owner reference of another tool's object (Crossplane's `AccessKey`, a
/// `VaultStaticSecret`, a Helm release): a ConfigMap named `name` stands in for it.
async fn another_controller(f: &Fixture, name: &str) -> Value {
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    let cm = Api::<ConfigMap>::namespaced(f.client.clone(), &f.ns).create(&PostParams::default(), &cm).await.unwrap();
    json!({"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": cm.metadata.uid.unwrap(), "controller": true})
}

/// `kubectl delete <owner> --cascade=orphan`, as its outcome: the Secret loses its owner
/// reference, then the owner (a ConfigMap standing in for Crossplane's AccessKey or VSO's
/// VaultStaticSecret) is deleted.
async fn orphan(f: &Fixture, secret: &str, owner: &str) {
    let release = json!({"metadata": {"ownerReferences": null}});
    f.secrets().patch(secret, &PatchParams::default(), &Patch::Merge(&release)).await.expect("orphan the Secret");
    kubectl_ok(f.env, &["delete", "configmap", owner, "-n", &f.ns]);
}

fn entries(s: &Secret) -> BTreeMap<String, String> {
    s.data.iter().flatten().map(|(k, ByteString(v))| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect()
}

fn status_of(obj: &IamAccessKey) -> iam_key_operator::crd::IamAccessKeyStatus {
    obj.status.clone().expect("status")
}

/// A consumer reading the Secret every 100 ms, as an application re-reading its credentials
/// would, and signing a request with what it finds. Counts reads that found a key, and those
/// whose key did not authenticate as the user (or that found no key once one had been there).
struct Consumer {
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicU64>,
    broken: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    fn start(f: &Fixture, secret: &str, id_key: &'static str, secret_key: &'static str) -> Consumer {
        let (stop, reads) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let broken = Arc::new(std::sync::Mutex::new(vec![]));
        let (api, env, user, name) = (f.secrets(), f.env, f.user.clone(), secret.to_string());
        let task = tokio::spawn({
            let (stop, reads, broken) = (stop.clone(), reads.clone(), broken.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let found = api.get_opt(&name).await.ok().flatten().map(|s| entries(&s));
                    match found.as_ref().and_then(|d| Some((d.get(id_key)?.clone(), d.get(secret_key)?.clone()))) {
                        Some((id, key)) => {
                            reads.fetch_add(1, Ordering::Relaxed);
                            if !authenticates_as(env, &id, &key, &user).await {
                                broken.lock().unwrap().push(format!("key {id} did not authenticate"));
                            }
                        }
                        None => broken.lock().unwrap().push(format!("no key in Secret {name}: {found:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Consumer { stop, reads, broken, task }
    }

    /// Stop; panics if any read found no working key.
    async fn assert_never_broken(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("consumer task");
        let broken = self.broken.lock().unwrap().clone();
        assert!(broken.is_empty(), "the consumer saw no working key {} time(s): {broken:?}", broken.len());
        self.reads.load(Ordering::Relaxed)
    }
}

#[tokio::test]
async fn a_terraform_made_key_is_adopted_verified_rotated_and_deleted_without_downtime() {
    let f = Fixture::new("adopt-tf").await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    // What `terraform apply` left: a key in IAM and a Secret holding it (plus a setting of the app's).
    let (tf_id, tf_secret) = key_made_outside(&f, &f.user).await;
    let env_data = [("AWS_ACCESS_KEY_ID", tf_id.as_str()), ("AWS_SECRET_ACCESS_KEY", tf_secret.as_str())];
    let extra = json!({"metadata": {"labels": {"team": "billing"}}, "stringData": {"BUCKET": "invoices"}});
    hand_made_secret(&f, "app-aws", extra, &env_data).await;
    let consumer = Consumer::start(&f, "app-aws", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY");

    let op = f.operator(&[]);
    f.create(
        "app",
        json!({
            "secret": {"name": "app-aws", "creationPolicy": "Adopt"},
            "adopt": {},
            "rotation": {"gracePeriod": "2s", "retainInactive": "1s"},
        }),
    )
    .await;
    let obj = f.wait_ready("app").await;
    let status = status_of(&obj);
    assert_eq!(status.access_key_id.as_deref(), Some(tf_id.as_str()), "the Terraform key is the current key");
    assert_eq!(status.rotation.as_ref().and_then(|r| r.last_reason.as_deref()), Some("Adopted"));
    assert_eq!(op.iam_calls(&["CreateAccessKey"]).await, 0, "adopted, not created");
    let tags = f.user_tags().await;
    assert_eq!(tags[&tf_id], "iam-key-operator:test/".to_string() + &f.ns + "/app", "tagged as the resource's");
    assert_eq!(tags[OWNER_TAG], format!("test/{}/app", f.ns), "the user is claimed");
    let held = f.secrets().get("app-aws").await.unwrap();
    assert_eq!(held.metadata.owner_references.as_ref().unwrap()[0].uid, obj.metadata.uid.clone().unwrap());
    assert_eq!(held.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"], "iam-key-operator");
    assert_eq!(held.metadata.labels.as_ref().unwrap()["team"], "billing", "its own label kept");
    assert_eq!(entries(&held)["BUCKET"], "invoices", "entries the operator does not write are kept");
    let adopted = f.wait_events("app", "KeyAdopted", |n| !n.is_empty()).await;
    assert!(adopted.iter().any(|n| n.contains(&tf_id) && n.contains("authenticates as")), "{adopted:?}");
    f.assert_consistent("app", &[]).await;

    // From now on it is managed like a key the operator created: a rotation retires it.
    let rotate = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    let obj = f
        .wait_for("app", Duration::from_secs(60), "the Terraform key retired and deleted", |o| {
            o.status.as_ref().is_some_and(|s| {
                s.keys.len() == 1 && s.keys[0].phase == KeyPhase::Current && s.access_key_id.as_ref() != Some(&tf_id)
            })
        })
        .await;
    assert!(!f.iam_keys().await.contains_key(&tf_id), "the adopted key was deleted after its rollback window");
    assert_eq!(status_of(&obj).rotation.unwrap().last_reason.as_deref(), Some("Serial"));
    assert_eq!(entries(&f.secrets().get("app-aws").await.unwrap())["BUCKET"], "invoices", "kept through rotation");
    f.assert_consistent("app", &[]).await;
    let reads = consumer.assert_never_broken().await;
    assert!(reads >= 20, "the consumer read the Secret throughout ({reads} reads)");

    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty(), "deleted like any key of the operator's");
    assert!(f.user_tags().await.is_empty(), "claim and key tags removed");
    assert!(f.secrets().get_opt("app-aws").await.unwrap().is_none(), "an adopted Secret is owned: deleted");
}

#[tokio::test]
async fn a_crossplane_connection_secret_is_adopted_in_place_keeping_its_shape_and_other_entries() {
    let f = Fixture::new("adopt-xp").await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    let (id, secret) = key_made_outside(&f, &f.user).await;
    // Crossplane's AccessKey controls its connection Secret.
    let controller = another_controller(&f, "accesskey-app").await;
    let extra = json!({
        "metadata": {"ownerReferences": [controller]},
        "type": "connection.crossplane.io/v1alpha1",
        "stringData": {"attribute.ses_smtp_password_v4": "derived", "endpoint": "https://iam.amazonaws.com"},
    });
    hand_made_secret(&f, "app-conn", extra, &[("username", &id), ("password", &secret)]).await;
    let consumer = Consumer::start(&f, "app-conn", "username", "password");
    let _op = f.operator(&[]);
    // The same shape as before (username/password), plus the Env entries.
    let template = json!({"data": {
        "username": "{{ access_key_id }}", "password": "{{ secret_access_key }}",
        "AWS_ACCESS_KEY_ID": "{{ access_key_id }}", "AWS_SECRET_ACCESS_KEY": "{{ secret_access_key }}",
    }});
    f.create(
        "app",
        json!({
            "secret": {"name": "app-conn", "creationPolicy": "Adopt", "template": template},
            "adopt": {},
            "rotation": {"gracePeriod": "1s", "retainInactive": "1s"},
        }),
    )
    .await;
    // Still controlled by Crossplane: refused, naming the controller and how to release it.
    let obj = f.wait_reason("app", "SecretConflict").await;
    let message = ready(&obj).unwrap().2;
    assert!(
        message.contains("controlled by ConfigMap accesskey-app") && message.contains("--cascade=orphan"),
        "{message}"
    );
    assert!(f.user_tags().await.is_empty(), "nothing written to IAM");
    // What `kubectl delete accesskey ... --cascade=orphan` (docs/migration.md) leaves: the Secret
    // without its owner reference. Done by hand here: the garbage collector that would do it is
    // shared with every other test, and slow to act when they keep it busy.
    orphan(&f, "app-conn", "accesskey-app").await;
    let obj = f.wait_ready("app").await;
    assert_eq!(status_of(&obj).access_key_id.as_deref(), Some(id.as_str()));
    let held = f.secrets().get("app-conn").await.unwrap();
    assert_eq!(held.type_.as_deref(), Some("connection.crossplane.io/v1alpha1"), "a Secret's type is kept");
    let data = entries(&held);
    assert_eq!((data["username"].as_str(), data["AWS_ACCESS_KEY_ID"].as_str()), (id.as_str(), id.as_str()));
    assert_eq!(data["endpoint"], "https://iam.amazonaws.com", "other connection details kept");
    assert!(f.events("app", "AdoptedEntriesKept").await.is_empty(), "the layout writes username/password");

    // A rotation writes the new key under the same names; the others stay.
    let rotate = json!({"spec": {"rotation": {"serial": 1}}});
    f.keys_api().patch("app", &PatchParams::default(), &Patch::Merge(&rotate)).await.unwrap();
    f.wait_for("app", Duration::from_secs(60), "rotated", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1 && s.access_key_id.as_ref() != Some(&id))
    })
    .await;
    let data = entries(&f.secrets().get("app-conn").await.unwrap());
    assert_ne!(data["username"], id);
    assert_eq!(data["username"], data["AWS_ACCESS_KEY_ID"]);
    assert_eq!(data["attribute.ses_smtp_password_v4"], "derived");
    consumer.assert_never_broken().await;
}

/// docs/migration.md's Vault path: a Vault Secrets Operator Secret (`access_key`, `secret_key`,
/// `_raw`), released by its VaultStaticSecret, adopted in place with the entries named, then
/// rotated at once so that the key Vault holds is deleted.
#[tokio::test]
async fn a_vault_static_role_secret_is_adopted_then_rotated_away() {
    let f = Fixture::new("adopt-vault").await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    let (id, secret) = key_made_outside(&f, &f.user).await;
    let owner = another_controller(&f, "vaultstaticsecret-uploader").await;
    let raw = format!("{{\"access_key\":\"{id}\",\"secret_key\":\"{secret}\"}}");
    let extra = json!({"metadata": {"ownerReferences": [owner]}, "stringData": {"_raw": raw}});
    hand_made_secret(&f, "uploader-aws", extra, &[("access_key", &id), ("secret_key", &secret)]).await;
    orphan(&f, "uploader-aws", "vaultstaticsecret-uploader").await;
    let consumer = Consumer::start(&f, "uploader-aws", "access_key", "secret_key");
    let _op = f.operator(&[]);
    f.create(
        "uploader",
        json!({
            "secret": {"name": "uploader-aws", "creationPolicy": "Adopt", "template": {"data": {
                "access_key": "{{ access_key_id }}", "secret_key": "{{ secret_access_key }}"}}},
            "adopt": {"accessKeyIdKey": "access_key", "secretAccessKeyKey": "secret_key"},
            "rotation": {"gracePeriod": "1s", "retainInactive": "1s"},
        }),
    )
    .await;
    let obj = f.wait_ready("uploader").await;
    assert_eq!(status_of(&obj).access_key_id.as_ref(), Some(&id));
    iam_key_operator::controller::request_rotation(f.client.clone(), &f.ns, "uploader").await.unwrap();
    f.wait_for("uploader", Duration::from_secs(60), "Vault's key rotated away", |o| {
        o.status.as_ref().is_some_and(|s| s.keys.len() == 1 && s.access_key_id.as_ref() != Some(&id))
    })
    .await;
    assert!(!f.iam_keys().await.contains_key(&id), "the key Vault holds is gone: deleting the role deletes nothing");
    let data = entries(&f.secrets().get("uploader-aws").await.unwrap());
    assert_ne!(data["access_key"], id);
    assert!(data["_raw"].contains(&id), "VSO's _raw entry is kept as it was (the guide says to delete it)");
    let status = status_of(&f.keys_api().get("uploader").await.unwrap());
    assert_eq!(f.iam_keys().await.into_keys().collect::<Vec<_>>(), vec![data["access_key"].clone()]);
    assert_eq!(status.access_key_id.as_ref(), Some(&data["access_key"]));
    assert!(f.authenticates(&data["access_key"], &data["secret_key"]).await);
    consumer.assert_never_broken().await;
}

/// Adopting from another Secret: it is only read; the resource's own Secret (Owner, created) gets
/// the key, and a Warning says the old Secret still holds it.
#[tokio::test]
async fn a_key_adopted_from_another_secret_is_published_in_a_new_one_and_the_old_one_is_only_read() {
    let f = Fixture::new("adopt-from").await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    let (id, secret) = key_made_outside(&f, &f.user).await;
    let source = hand_made_secret(&f, "tf-creds", json!({}), &[("id", &id), ("key", &secret)]).await;
    let _op = f.operator(&[]);
    let spec = json!({"secret": {"name": "app-aws"}, "adopt": {"secretName": "tf-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}});
    f.create("app", spec).await;
    let obj = f.wait_ready("app").await;
    assert_eq!(status_of(&obj).access_key_id.as_ref(), Some(&id));
    f.assert_consistent("app", &[]).await;
    let after = f.secrets().get("tf-creds").await.unwrap();
    assert_eq!(after.metadata.resource_version, source.metadata.resource_version, "only read");
    let warned = f.wait_events("app", "AdoptedFromAnotherSecret", |n| !n.is_empty()).await;
    assert!(warned.iter().any(|n| n.contains("tf-creds") && n.contains("app-aws")), "{warned:?}");
}

#[tokio::test]
async fn refused_adoptions_change_nothing_and_say_why() {
    let f = Fixture::without_policy("adopt-no").await;
    let iam = f.env.iam_client();
    let user = |suffix: &str| format!("{}-{suffix}", f.user);
    for suffix in ["policy", "other", "owned", "wrong"] {
        iam.create_user().user_name(user(suffix)).send().await.expect("CreateUser");
    }
    // Adoption is the platform team's to allow: "<user>-policy" is allowed, but not to adopt.
    f.allow(&format!("no-adopt-{}", f.ns), json!({"namespaces": [f.ns], "userNames": [user("policy")]})).await;
    let adopters = [user("other"), user("owned"), user("wrong")];
    let rule = json!({"namespaces": [f.ns], "userNames": adopters, "allowAdoption": true});
    f.allow(&format!("adopt-{}", f.ns), rule).await;
    let (policy_id, policy_secret) = key_made_outside(&f, &user("policy")).await;
    // A key of another user (the fixture's), in the Secret of "<user>-other".
    let (stranger_id, stranger_secret) = key_made_outside(&f, &f.user).await;
    // A key another cluster's resource owns (its tag on the user).
    let (owned_id, owned_secret) = key_made_outside(&f, &user("owned")).await;
    let tag =
        aws_sdk_iam::types::Tag::builder().key(&owned_id).value("iam-key-operator:prod/team-a/app").build().unwrap();
    iam.tag_user().user_name(user("owned")).tags(tag).send().await.unwrap();
    // A key whose Secret holds the wrong secret.
    let (wrong_id, _) = key_made_outside(&f, &user("wrong")).await;
    let wrong_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWRONGSECRET".to_string();
    let cases = [
        ("policy", policy_id, policy_secret, "allowAdoption"),
        ("other", stranger_id, stranger_secret, "is not a key of IAM user"),
        ("owned", owned_id, owned_secret, "owned by IamAccessKey prod/team-a/app"),
        ("wrong", wrong_id.clone(), wrong_secret, "does not authenticate"),
    ];
    let mut versions = BTreeMap::new();
    for (name, id, secret, _) in &cases {
        let data = [("AWS_ACCESS_KEY_ID", id.as_str()), ("AWS_SECRET_ACCESS_KEY", secret.as_str())];
        let s = hand_made_secret(&f, name, json!({}), &data).await;
        versions.insert(name.to_string(), s.metadata.resource_version.unwrap());
    }
    let op = f.operator(&[]);
    for (name, ..) in &cases {
        let spec = json!({"userName": user(name), "secret": {"name": name, "creationPolicy": "Adopt"}, "adopt": {}});
        f.create(name, spec).await;
    }
    for (name, id, secret, why) in &cases {
        let obj = f.wait_reason(name, "AdoptionRefused").await;
        let message = ready(&obj).unwrap().2;
        assert!(message.contains(why) && message.contains("nothing was changed"), "{name}: {message}");
        assert!(*name == "policy" || message.contains(id.as_str()), "{name}: names the key: {message}");
        assert!(!message.contains(secret.as_str()), "{name}: never the secret");
    }
    // A retry past the backoff changes nothing either.
    op.wait_reconciles(Some("AdoptionRefused"), 8).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0, "no tag, no key: nothing written to IAM");
    for (name, ..) in &cases {
        let s = f.secrets().get(name).await.unwrap();
        assert_eq!(s.metadata.resource_version.as_ref(), Some(&versions[*name]), "{name}: Secret untouched");
    }
    let tag_count = |u: String| {
        let iam = iam.clone();
        async move { iam.list_user_tags().user_name(u).send().await.unwrap().tags().len() }
    };
    assert_eq!(tag_count(user("owned")).await, 1, "only the other owner's tag");
    for suffix in ["policy", "other", "wrong"] {
        assert_eq!(tag_count(user(suffix)).await, 0, "{suffix}: not claimed");
    }
    assert_eq!(iam_keys(f.env, &user("wrong")).await.len(), 1, "no key created instead");

    // A Secret fixed to hold a working key of the user is adopted; the other key is left alone.
    let (fresh_id, fresh_secret) = key_made_outside(&f, &user("wrong")).await;
    let fix = json!({"stringData": {"AWS_ACCESS_KEY_ID": fresh_id, "AWS_SECRET_ACCESS_KEY": fresh_secret}});
    f.secrets().patch("wrong", &PatchParams::default(), &Patch::Merge(&fix)).await.unwrap();
    let status = status_of(&f.wait_ready("wrong").await);
    assert_eq!(status.access_key_id.as_ref(), Some(&fresh_id));
    assert_eq!(status.foreign_keys, 1, "{wrong_id} is not this resource's and stays untouched");
    assert_eq!(iam_keys(f.env, &user("wrong")).await.len(), 2);
}

#[tokio::test]
async fn merge_writes_only_its_entries_where_a_policy_allows_it_and_takes_them_back() {
    let f = Fixture::new("merge").await;
    // A Secret someone else owns (a Helm release, say): its entries, labels and owner stay.
    let owner = another_controller(&f, "release").await;
    let extra = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"}, "ownerReferences": [owner]}});
    let before = hand_made_secret(&f, "app-config", extra, &[("DATABASE_URL", "postgres://db")]).await;
    // No resync: what the operator does after its first pass, the watch made it do.
    let op = Operator::start(f.env, &f.ns, &[], &["--resync", "10m"]);
    f.create("app", json!({"secret": {"name": "app-config", "creationPolicy": "Merge"}})).await;
    let obj = f.wait_reason("app", "MergeNotAllowed").await;
    assert!(ready(&obj).unwrap().2.contains("allowSecretMerge"));
    op.wait_reconciles(Some("MergeNotAllowed"), 2).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0);
    assert_eq!(
        f.secrets().get("app-config").await.unwrap().metadata.resource_version,
        before.metadata.resource_version
    );

    f.allow_own_user(json!({"allowSecretMerge": true})).await;
    let obj = f.wait_ready("app").await;
    let id = status_of(&obj).access_key_id.unwrap();
    let held = f.secrets().get("app-config").await.unwrap();
    let data = entries(&held);
    assert_eq!((data["DATABASE_URL"].as_str(), data["AWS_ACCESS_KEY_ID"].as_str()), ("postgres://db", id.as_str()));
    let mut marked = before.metadata.labels.clone().unwrap_or_default();
    marked.insert("iam.keyop.dev/written-for".into(), obj.metadata.uid.clone().unwrap());
    assert_eq!(held.metadata.labels, Some(marked), "the owner's labels, and the mark the operator's watch selects");
    assert_eq!(held.metadata.owner_references, before.metadata.owner_references, "no owner reference of ours");
    f.assert_consistent("app", &[]).await;

    // The owner writes its Secret again as it was (a forced Helm upgrade, say): our entries go.
    // The watch sees it, and the operator merges a new key in at once, not at the next resync.
    let mut reapplied = before.clone();
    reapplied.metadata.resource_version = held.metadata.resource_version.clone();
    f.secrets().replace("app-config", &PostParams::default(), &reapplied).await.expect("the owner's write");
    let obj = f
        .wait_for("app", Duration::from_secs(30), "a new key merged in", |o| {
            status_of(o).access_key_id.is_some_and(|new| new != id) && ready(o).is_some_and(|r| r.0 == "True")
        })
        .await;
    let held = f.secrets().get("app-config").await.unwrap();
    assert_eq!(entries(&held)["AWS_ACCESS_KEY_ID"], status_of(&obj).access_key_id.unwrap());
    assert_eq!(entries(&held)["DATABASE_URL"], "postgres://db");
    f.assert_consistent("app", &[]).await;

    // Deletion takes back exactly what it wrote.
    f.delete("app").await;
    f.wait_gone("app", Duration::from_secs(30)).await;
    assert!(f.iam_keys().await.is_empty());
    let after = f.secrets().get("app-config").await.unwrap();
    assert_eq!(after.data, before.data, "only the merged entries are removed");
    assert_eq!(after.metadata.labels, before.metadata.labels, "the mark removed");
    let ours = after.metadata.annotations.unwrap_or_default();
    assert!(!ours.keys().any(|k| k.starts_with("iam.keyop.dev/")), "{ours:?}");

    // Merge never creates a Secret.
    f.create("missing", json!({"secret": {"name": "not-there", "creationPolicy": "Merge"}})).await;
    let obj = f.wait_reason("missing", "SecretNotFound").await;
    assert!(ready(&obj).unwrap().2.contains("never creates one"));
    assert!(f.secrets().get_opt("not-there").await.unwrap().is_none());
}

#[tokio::test]
async fn adopt_takes_over_a_free_secret_and_orphan_leaves_its_secret_behind() {
    let f = Fixture::new("orphan").await;
    f.allow_own_user(json!({"allowRetain": true})).await;
    // No resync: what the operator does after its first pass, the watch made it do.
    let op = Operator::start(f.env, &f.ns, &[], &["--resync", "10m"]);
    // Adopt without spec.adopt: a new key into a Secret made by hand, its other entries kept;
    // taking a Secret over is the platform team's to allow, like adopting a key.
    let before = hand_made_secret(&f, "shared", json!({}), &[("REGION", "eu-west-1")]).await;
    f.create("adopter", json!({"secret": {"name": "shared", "creationPolicy": "Adopt"}})).await;
    let obj = f.wait_reason("adopter", "AdoptionRefused").await;
    let message = ready(&obj).unwrap().2;
    assert!(message.contains("taking over the existing Secret shared is not allowed"), "{message}");
    op.wait_reconciles(Some("AdoptionRefused"), 2).await;
    assert_eq!(op.iam_calls(IAM_WRITES).await, 0);
    assert_eq!(f.secrets().get("shared").await.unwrap().metadata.resource_version, before.metadata.resource_version);
    // A ServiceAccount token is never taken over, allowed or not.
    let token: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token", "annotations": {"kubernetes.io/service-account.name": "default"}},
        "type": "kubernetes.io/service-account-token",
    }))
    .unwrap();
    f.secrets().create(&PostParams::default(), &token).await.unwrap();
    f.allow_own_user(json!({"allowRetain": true, "allowAdoption": true})).await;
    f.wait_ready("adopter").await;
    f.create("token-taker", json!({"secret": {"name": "token", "creationPolicy": "Adopt"}})).await;
    let obj = f.wait_reason("token-taker", "SecretConflict").await;
    assert!(ready(&obj).unwrap().2.contains("kubernetes.io/service-account-token"), "{:?}", ready(&obj));
    let token = f.secrets().get("token").await.unwrap();
    assert!(token.metadata.owner_references.is_none() && !entries(&token).contains_key("AWS_ACCESS_KEY_ID"));
    f.delete("token-taker").await;
    let data = entries(&f.secrets().get("shared").await.unwrap());
    assert_eq!(data["REGION"], "eu-west-1");
    f.assert_consistent("adopter", &[]).await;
    f.delete("adopter").await;
    f.wait_gone("adopter", Duration::from_secs(30)).await;
    assert!(f.secrets().get_opt("shared").await.unwrap().is_none(), "owned once adopted: deleted with it");

    // Orphan: no owner reference; with Retain, the key and its Secret outlive the resource.
    let user = format!("{}-orphan", f.user);
    f.env.iam_client().create_user().user_name(&user).send().await.unwrap();
    let spec =
        json!({"userName": user, "secret": {"name": "kept", "creationPolicy": "Orphan"}, "deletionPolicy": "Retain"});
    f.create("orphan", spec).await;
    let id = status_of(&f.wait_ready("orphan").await).access_key_id.unwrap();
    let held = f.secrets().get("kept").await.unwrap();
    assert!(held.metadata.owner_references.is_none(), "Orphan: no owner reference");
    // Deleted by someone: without an owner reference, the watch still knows whose it was.
    f.secrets().delete("kept", &Default::default()).await.expect("delete the Secret");
    let obj = f
        .wait_for("orphan", Duration::from_secs(30), "a new key in a new Secret", |o| {
            status_of(o).access_key_id.is_some_and(|new| new != id) && ready(o).is_some_and(|r| r.0 == "True")
        })
        .await;
    let id = status_of(&obj).access_key_id.unwrap();
    f.delete("orphan").await;
    f.wait_gone("orphan", Duration::from_secs(30)).await;
    let left = f.secrets().get("kept").await.unwrap();
    let data = entries(&left);
    assert_eq!(data["AWS_ACCESS_KEY_ID"], id, "the Secret stays, with its key");
    assert!(authenticates_as(f.env, &id, &data["AWS_SECRET_ACCESS_KEY"], &user).await, "and the key works");
    assert!(
        !left.metadata.annotations.unwrap_or_default().contains_key("iam.keyop.dev/written-for"),
        "no longer marked as the deleted resource's"
    );
}

/// The API server's message refusing a resource with this spec.
async fn refused(f: &Fixture, name: &str, spec: Value) -> String {
    let obj: IamAccessKey = serde_json::from_value(json!({
        "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKey", "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap();
    match f.keys_api().create(&PostParams::default(), &obj).await {
        Ok(_) => panic!("{name}: accepted"),
        Err(kube::Error::Api(e)) => e.message,
        Err(e) => panic!("{name}: {e}"),
    }
}

#[tokio::test]
async fn invalid_combinations_are_refused_by_the_api_server_naming_the_field_and_the_fix() {
    let f = Fixture::without_policy("adopt-crd").await;
    let u = f.user.clone();
    let message = refused(&f, "inplace", json!({"userName": u, "adopt": {}})).await;
    assert!(message.contains("spec.adopt") && message.contains("creationPolicy to Adopt"), "{message}");
    let message =
        refused(&f, "named", json!({"userName": u, "secret": {"name": "x"}, "adopt": {"secretName": "x"}})).await;
    assert!(message.contains("spec.adopt"), "{message}");
    let message =
        refused(&f, "half", json!({"userName": u, "adopt": {"secretName": "y", "accessKeyIdKey": "username"}})).await;
    assert!(message.contains("spec.adopt.accessKeyIdKey and spec.adopt.secretAccessKeyKey go together"), "{message}");
    let message =
        refused(&f, "labels", json!({"userName": u, "secret": {"creationPolicy": "Merge", "labels": {"a": "b"}}}))
            .await;
    assert!(message.contains("creationPolicy Merge") && message.contains("spec.secret.labels"), "{message}");
    // Accepted: adoption from another Secret, in place with Adopt or Merge.
    for (name, spec) in [
        ("from", json!({"userName": u, "adopt": {"secretName": "tf"}})),
        ("adopt", json!({"userName": u, "secret": {"creationPolicy": "Adopt"}, "adopt": {}})),
        (
            "merge",
            json!({"userName": u, "secret": {"name": "m", "creationPolicy": "Merge"}, "adopt": {"secretName": "m"}}),
        ),
    ] {
        f.create(name, spec).await;
    }
    // Between Owner and Adopt freely; to Orphan or Merge only with a new Secret name.
    let patch = |policy: &str, name: Option<&str>| {
        let mut secret = json!({"creationPolicy": policy});
        if let Some(n) = name {
            secret["name"] = n.into();
        }
        json!({"spec": {"secret": secret}})
    };
    let api = f.keys_api();
    api.patch("from", &PatchParams::default(), &Patch::Merge(&patch("Adopt", None))).await.expect("Owner -> Adopt");
    let err = api.patch("from", &PatchParams::default(), &Patch::Merge(&patch("Orphan", None))).await.unwrap_err();
    assert!(err.to_string().contains("give the Secret a new name"), "{err}");
    // In-place adoption keeps needing Adopt or Merge.
    let err = api.patch("adopt", &PatchParams::default(), &Patch::Merge(&patch("Owner", None))).await.unwrap_err();
    assert!(err.to_string().contains("spec.adopt reads the key"), "{err}");
    api.patch("from", &PatchParams::default(), &Patch::Merge(&patch("Orphan", Some("new"))))
        .await
        .expect("with a new name");
}

/// The operator aborts right after each write of an adoption, is restarted, and ends with the
/// adopted key current, tagged and published, no key created or deleted, and a consumer that
/// never saw a non-working key.
async fn crash_during_adoption_then_recover(point: &str) {
    let f = Fixture::new(&format!("adopt-{}", point.replace("after-adopt-", ""))).await;
    f.allow_own_user(json!({"allowAdoption": true})).await;
    let (id, secret) = key_made_outside(&f, &f.user).await;
    let data = [("AWS_ACCESS_KEY_ID", id.as_str()), ("AWS_SECRET_ACCESS_KEY", secret.as_str())];
    hand_made_secret(&f, "app", json!({"stringData": {"OTHER": "kept"}}), &data).await;
    let consumer = Consumer::start(&f, "app", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY");
    let mut op = f.operator(&[("IKO_FAILPOINT", point)]);
    f.create("app", json!({"secret": {"creationPolicy": "Adopt"}, "adopt": {}})).await;
    let status = op.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success() && op.log().contains(&format!("failpoint {point}")), "stopped at {point}");
    op.restart(&[]);
    let obj = f.wait_ready("app").await;
    let status = status_of(&obj);
    assert_eq!(status.access_key_id.as_ref(), Some(&id), "the adopted key, not a new one");
    assert_eq!(status.rotation.and_then(|r| r.last_reason).as_deref(), Some("Adopted"));
    assert_eq!(f.iam_keys().await.len(), 1, "nothing created, nothing deleted");
    assert_eq!(op.iam_calls(&["CreateAccessKey", "DeleteAccessKey"]).await, 0);
    assert_eq!(f.user_tags().await[&id], format!("iam-key-operator:test/{}/app", f.ns));
    assert_eq!(entries(&f.secrets().get("app").await.unwrap())["OTHER"], "kept");
    f.assert_consistent("app", &[]).await;
    consumer.assert_never_broken().await;
    op.assert_log_free_of(&secret);
}

#[tokio::test]
async fn crash_after_publishing_the_adopted_key() {
    crash_during_adoption_then_recover("after-adopt-publish").await;
}

#[tokio::test]
async fn crash_after_tagging_the_adopted_key() {
    crash_during_adoption_then_recover("after-adopt-tag").await;
}

/// Every IamAccessKey and IamAccessKeyPolicy of docs/migration.md is accepted by the API server as
/// written (server-side dry run).
#[tokio::test]
async fn the_migration_guides_yaml_is_accepted_by_the_api_server() {
    let env = testenv::shared();
    let ns = env.fresh_namespace("migration-doc").await.unwrap();
    let guide = std::fs::read_to_string(testenv::repo_root().join("docs/migration.md")).unwrap();
    let mut checked = BTreeMap::<String, usize>::new();
    for block in guide.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().expect("closed block");
        let indent = yaml.lines().find(|l| !l.trim().is_empty()).map_or(0, |l| l.len() - l.trim_start().len());
        let yaml: String = yaml.lines().map(|l| format!("{}\n", l.get(indent..).unwrap_or(""))).collect();
        for doc in serde_yaml::Deserializer::from_str(&yaml) {
            let mut value: Value = serde::Deserialize::deserialize(doc).expect("the guide's YAML parses");
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("namespace");
            }
            let path = env.dir().join(format!("migration-{kind}-{}.json", checked.values().sum::<usize>()));
            std::fs::write(&path, value.to_string()).unwrap();
            let out = env.kubectl(["apply", "--dry-run=server", "-n", &ns, "-f", path.to_str().unwrap()]);
            assert!(out.status.success(), "{kind} of docs/migration.md refused:\n{}", text(&out));
            *checked.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(checked.get("IamAccessKey"), Some(&3), "one per path: {checked:?}");
    assert_eq!(checked.get("IamAccessKeyPolicy"), Some(&1), "{checked:?}");
}
