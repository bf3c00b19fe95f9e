//! The Secret the operator writes (pure: builds the object, touches no client).

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Resource, ResourceExt, api::DeleteParams, core::PartialObjectMeta};

use super::Context;
use crate::{
    crd::{
        ACCESS_KEY_ID_ANNOTATION, IamAccessKey, LAYOUT_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SecretFormat,
    },
    error::Error,
    iam::SecretAccessKey,
    plan::SecretObservation,
};

/// Delete the resource's Secret; one already gone is fine.
pub async fn delete_secret(ctx: &Context, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => ctx.metrics.kube_write("Secret", "delete"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::Kube { call: "deleting the Secret", source: e }),
    }
    Ok(())
}

/// Name of the Secret the resource publishes to.
pub fn secret_name(obj: &IamAccessKey) -> String {
    obj.spec.secret.name.clone().unwrap_or_else(|| obj.name_any())
}

/// The full Secret for a key. Never log it: it holds the secret access key.
pub fn build_secret(obj: &IamAccessKey, access_key_id: &str, secret: &SecretAccessKey) -> Secret {
    let spec = &obj.spec.secret;
    let mut labels = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    let mut annotations = spec.annotations.clone();
    annotations.insert(ACCESS_KEY_ID_ANNOTATION.into(), access_key_id.into());
    annotations.insert(LAYOUT_ANNOTATION.into(), layout_fingerprint(obj));
    let data: BTreeMap<String, ByteString> = match spec.format {
        SecretFormat::Env => BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".into(), ByteString(access_key_id.as_bytes().to_vec())),
            ("AWS_SECRET_ACCESS_KEY".into(), ByteString(secret.expose().as_bytes().to_vec())),
        ]),
        SecretFormat::CredentialsFile => {
            let file = format!(
                "[{}]\naws_access_key_id = {access_key_id}\naws_secret_access_key = {}\n",
                spec.profile,
                secret.expose()
            );
            BTreeMap::from([("credentials".into(), ByteString(file.into_bytes()))])
        }
    };
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(obj)),
            namespace: obj.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: obj.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// FNV-1a over the canonical JSON of the layout fields (stable across versions and processes).
pub fn layout_fingerprint(obj: &IamAccessKey) -> String {
    let s = &obj.spec.secret;
    let canonical = serde_json::json!([s.format, s.profile, s.labels, s.annotations]).to_string();
    let hash =
        canonical.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// Whether our Secret was written for another layout than the spec now asks for.
pub fn layout_stale(obj: &IamAccessKey, meta: Option<&PartialObjectMeta<Secret>>) -> bool {
    let written = meta.and_then(|m| m.metadata.annotations.as_ref()).and_then(|a| a.get(LAYOUT_ANNOTATION));
    written.is_some_and(|w| *w != layout_fingerprint(obj))
}

/// The secret access key held by a Secret we wrote (in either format).
pub fn secret_in(secret: &Secret) -> Option<SecretAccessKey> {
    let data = secret.data.as_ref()?;
    if let Some(v) = data.get("AWS_SECRET_ACCESS_KEY") {
        return String::from_utf8(v.0.clone()).ok().map(SecretAccessKey::new);
    }
    let file = String::from_utf8(data.get("credentials")?.0.clone()).ok()?;
    file.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "aws_secret_access_key")
        .map(|(_, v)| SecretAccessKey::new(v.trim().to_owned()))
}

/// Classify the Secret's metadata: ours only if it names this very resource (by UID) as owner.
pub fn observe_secret(obj: &IamAccessKey, meta: Option<&PartialObjectMeta<Secret>>) -> SecretObservation {
    let Some(meta) = meta else {
        return SecretObservation::Missing;
    };
    let uid = obj.uid();
    let owned = meta.metadata.owner_references.iter().flatten().any(|r| Some(&r.uid) == uid.as_ref());
    if !owned {
        return SecretObservation::NotOurs;
    }
    let access_key_id = meta.metadata.annotations.as_ref().and_then(|a| a.get(ACCESS_KEY_ID_ANNOTATION)).cloned();
    SecretObservation::Ours { access_key_id }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::IamAccessKeySpec;

    fn resource(format: &str) -> IamAccessKey {
        let spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({
            "userName": "u", "secret": {"format": format, "profile": "ci", "labels": {"team": "a"}}
        }))
        .unwrap();
        let mut obj = IamAccessKey::new("k", spec);
        obj.metadata.namespace = Some("ns".into());
        obj.metadata.uid = Some("uid-1".into());
        obj
    }

    #[test]
    fn env_format_has_both_variables_label_annotation_and_owner() {
        let s = build_secret(&resource("Env"), "AKIA1", &SecretAccessKey::new("s3cr3t".into()));
        let data = s.data.unwrap();
        assert_eq!(data["AWS_ACCESS_KEY_ID"].0, b"AKIA1");
        assert_eq!(data["AWS_SECRET_ACCESS_KEY"].0, b"s3cr3t");
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels["team"], "a");
        assert_eq!(s.metadata.annotations.unwrap()[ACCESS_KEY_ID_ANNOTATION], "AKIA1");
        assert_eq!(s.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }

    #[test]
    fn credentials_file_format_uses_the_profile() {
        let s = build_secret(&resource("CredentialsFile"), "AKIA1", &SecretAccessKey::new("x".into()));
        let file = String::from_utf8(s.data.unwrap()["credentials"].0.clone()).unwrap();
        assert_eq!(file, "[ci]\naws_access_key_id = AKIA1\naws_secret_access_key = x\n");
    }

    #[test]
    fn the_secret_is_read_back_from_either_format_and_a_layout_change_is_seen() {
        let env = resource("Env");
        let file = resource("CredentialsFile");
        for obj in [&env, &file] {
            let s = build_secret(obj, "AKIA1", &SecretAccessKey::new("s3cr3t".into()));
            assert_eq!(secret_in(&s).map(|k| k.expose().to_owned()).as_deref(), Some("s3cr3t"));
        }
        let written = build_secret(&env, "AKIA1", &SecretAccessKey::new("x".into()));
        let meta = PartialObjectMeta::<Secret> { metadata: written.metadata, ..Default::default() };
        assert!(!layout_stale(&env, Some(&meta)));
        assert!(layout_stale(&file, Some(&meta)), "format changed");
        let mut relabelled = env.clone();
        relabelled.spec.secret.labels.insert("team".into(), "b".into());
        assert!(layout_stale(&relabelled, Some(&meta)), "labels changed");
    }

    #[test]
    fn a_secret_owned_by_another_uid_is_not_ours() {
        let obj = resource("Env");
        let mut meta = PartialObjectMeta::<Secret>::default();
        assert_eq!(observe_secret(&obj, Some(&meta)), SecretObservation::NotOurs);
        let mut r = obj.controller_owner_ref(&()).unwrap();
        meta.metadata.owner_references = Some(vec![r.clone()]);
        assert_eq!(observe_secret(&obj, Some(&meta)), SecretObservation::Ours { access_key_id: None });
        r.uid = "other".into();
        meta.metadata.owner_references = Some(vec![r]);
        assert_eq!(observe_secret(&obj, Some(&meta)), SecretObservation::NotOurs);
        assert_eq!(observe_secret(&obj, None), SecretObservation::Missing);
    }
}
