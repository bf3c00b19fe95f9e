//! The floor: an ideal controller that makes only the calls no implementation can avoid, with
//! the operator's concurrency. For each resource, as soon as it exists: CreateAccessKey, one
//! TagUser (the key's ownership tag), create the Secret, one status patch (Ready=True).

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
};

use futures::StreamExt;
use iam_key_operator::crd::{ACCESS_KEY_ID_ANNOTATION, IamAccessKey, MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{OwnerReference, Time},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{cluster::Item, operator::CLUSTER};

#[derive(Default)]
pub struct FloorCounts {
    pub create_access_key: AtomicU64,
    pub tag_user: AtomicU64,
    pub secret_create: AtomicU64,
    pub status_patch: AtomicU64,
}

impl FloorCounts {
    pub fn iam_calls(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("CreateAccessKey".to_string(), self.create_access_key.load(Ordering::Relaxed) as f64),
            ("TagUser".to_string(), self.tag_user.load(Ordering::Relaxed) as f64),
        ])
    }

    pub fn kube_writes(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("Secret create".to_string(), self.secret_create.load(Ordering::Relaxed) as f64),
            ("IamAccessKey status".to_string(), self.status_patch.load(Ordering::Relaxed) as f64),
        ])
    }
}

/// Serve resources from `rx` until it closes, `concurrency` at a time.
pub async fn run(
    iam: aws_sdk_iam::Client,
    client: Client,
    ns: String,
    concurrency: usize,
    rx: mpsc::UnboundedReceiver<(Item, String)>,
    counts: &FloorCounts,
) {
    let keys: Api<IamAccessKey> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    let items = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    items
        .for_each_concurrent(concurrency, |(item, uid)| {
            let (iam, keys, secrets, ns) = (iam.clone(), keys.clone(), secrets.clone(), ns.clone());
            async move {
                let out = iam.create_access_key().user_name(&item.user).send().await.expect("CreateAccessKey");
                counts.create_access_key.fetch_add(1, Ordering::Relaxed);
                let key = out.access_key.expect("access key");
                let id = key.access_key_id().to_string();
                let tag = aws_sdk_iam::types::Tag::builder()
                    .key(&id)
                    .value(format!("iam-key-operator:{CLUSTER}/{ns}/{}", item.name))
                    .build()
                    .expect("tag");
                iam.tag_user().user_name(&item.user).tags(tag).send().await.expect("TagUser");
                counts.tag_user.fetch_add(1, Ordering::Relaxed);

                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(item.name.clone()),
                        labels: Some(BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())])),
                        annotations: Some(BTreeMap::from([(ACCESS_KEY_ID_ANNOTATION.into(), id.clone())])),
                        owner_references: Some(vec![OwnerReference {
                            api_version: "iam.keyop.dev/v1alpha1".into(),
                            kind: "IamAccessKey".into(),
                            name: item.name.clone(),
                            uid,
                            controller: Some(true),
                            block_owner_deletion: Some(true),
                        }]),
                        ..Default::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(BTreeMap::from([
                        ("AWS_ACCESS_KEY_ID".into(), ByteString(id.clone().into_bytes())),
                        ("AWS_SECRET_ACCESS_KEY".into(), ByteString(key.secret_access_key().as_bytes().to_vec())),
                    ])),
                    ..Default::default()
                };
                secrets.create(&PostParams::default(), &secret).await.expect("create Secret");
                counts.secret_create.fetch_add(1, Ordering::Relaxed);

                let now = Time(jiff::Timestamp::now());
                let created = key.create_date().map(|d| d.to_string());
                let status = json!({"status": {
                    "accessKeyId": id, "keyStatus": "Active", "secretName": item.name,
                    "createDate": created,
                    "keys": [{"accessKeyId": id, "phase": "Current", "createDate": created}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": now,
                        "message": format!("access key {id} is Active and published in Secret {}", item.name)}],
                }});
                keys.patch_status(&item.name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .expect("patch status");
                counts.status_patch.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
}
