//! The Secret the operator writes: rendered from the spec's layout (`crate::template`), and
//! read back for a new layout where its key can be.

use std::collections::BTreeMap;

use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Resource, ResourceExt, api::DeleteParams, core::PartialObjectMeta};

use super::Context;
use crate::{
    crd::{
        ACCESS_KEY_ID_ANNOTATION, DATA_LAYOUT_ANNOTATION, IamAccessKey, LAYOUT_ANNOTATION, MANAGED_BY_LABEL,
        MANAGED_BY_VALUE, SECRET_AT_ANNOTATION,
    },
    error::Error,
    iam::SecretAccessKey,
    plan::SecretObservation,
    template::{self, Inputs, Layout, Locator, Values},
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

/// What a Secret holds besides its metadata.
pub struct Content {
    type_: String,
    data: BTreeMap<String, ByteString>,
    /// Where the secret stands in `data` (`SECRET_AT_ANNOTATION`).
    secret_at: Option<String>,
}

/// The Secret for a key, rendered from the spec's layout (a failure deletes nothing: the caller
/// decides). Never log it: it holds the secret access key.
pub fn render_secret(
    obj: &IamAccessKey,
    access_key_id: &str,
    secret: &SecretAccessKey,
    user_arn: &str,
) -> Result<Secret, Error> {
    let rendered = render(obj, access_key_id, secret, user_arn, Values::Real)?;
    let content = Content {
        type_: rendered.type_,
        data: rendered.data.into_iter().map(|(k, v)| (k, ByteString(v))).collect(),
        secret_at: rendered.locator.map(|l| l.to_string()),
    };
    Ok(build_secret(obj, access_key_id, content))
}

/// The dry run of the spec's layout with placeholder values, before any IAM write: a template
/// that does not render is refused with the engine's own message (it quotes placeholders only).
pub fn check_template(obj: &IamAccessKey) -> Result<(), Error> {
    let secret = SecretAccessKey::new(template::PLACEHOLDER_SECRET.into());
    let arn = format!("arn:aws:iam::{}:user/{}", template::PLACEHOLDER_ACCOUNT, obj.spec.user_name);
    render(obj, template::PLACEHOLDER_ACCESS_KEY_ID, &secret, &arn, Values::Placeholders).map(drop)
}

fn render(
    obj: &IamAccessKey,
    access_key_id: &str,
    secret: &SecretAccessKey,
    user_arn: &str,
    values: Values,
) -> Result<template::Rendered, Error> {
    let (namespace, name, secret_name) = (obj.namespace().unwrap_or_default(), obj.name_any(), secret_name(obj));
    let inputs = Inputs {
        access_key_id,
        secret,
        user_name: &obj.spec.user_name,
        user_arn,
        profile: &obj.spec.secret.profile,
        namespace: &namespace,
        name: &name,
        secret_name: &secret_name,
    };
    template::render(&Layout::of(&obj.spec.secret), &inputs, values).map_err(Error::InvalidTemplate)
}

/// The data a Secret holds, as it is (a new layout of its labels or annotations only): what the
/// operator wrote of it, where it keeps entries it did not write (`creationPolicy` Adopt, Merge).
pub fn held_content(held: &Secret) -> Content {
    let mut data = held.data.clone().unwrap_or_default();
    if let Some(written) = super::secret_policy::written_keys(held) {
        data.retain(|k, _| written.contains(k));
    }
    Content {
        type_: held.type_.clone().unwrap_or_else(|| "Opaque".into()),
        data,
        secret_at: held.metadata.annotations.as_ref().and_then(|a| a.get(SECRET_AT_ANNOTATION)).cloned(),
    }
}

/// The full Secret: the content with the spec's labels and annotations and ours.
pub fn build_secret(obj: &IamAccessKey, access_key_id: &str, content: Content) -> Secret {
    let spec = &obj.spec.secret;
    let mut labels = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    let mut annotations = spec.annotations.clone();
    annotations.insert(ACCESS_KEY_ID_ANNOTATION.into(), access_key_id.into());
    annotations.insert(LAYOUT_ANNOTATION.into(), layout_fingerprint(obj));
    annotations.insert(DATA_LAYOUT_ANNOTATION.into(), data_layout_fingerprint(obj));
    if let Some(at) = content.secret_at {
        annotations.insert(SECRET_AT_ANNOTATION.into(), at);
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(obj)),
            namespace: obj.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: obj.controller_owner_ref(&()).map(|r| vec![r]),
            ..Default::default()
        },
        type_: Some(content.type_),
        data: Some(content.data),
        ..Default::default()
    }
}

/// FNV-1a, hex: stable across versions and processes.
fn fingerprint(canonical: &serde_json::Value) -> String {
    let hash = canonical
        .to_string()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// Of the canonical JSON of the layout fields. Without a template, of exactly what it was before
/// templates existed: the Secrets written then are not stale.
pub fn layout_fingerprint(obj: &IamAccessKey) -> String {
    let s = &obj.spec.secret;
    fingerprint(&match &s.template {
        None => serde_json::json!([s.format, s.profile, s.labels, s.annotations]),
        Some(t) => serde_json::json!([s.format, s.profile, s.labels, s.annotations, t]),
    })
}

/// Of the data layout alone: type, templates and the profile they may name.
pub fn data_layout_fingerprint(obj: &IamAccessKey) -> String {
    let layout = Layout::of(&obj.spec.secret);
    fingerprint(&serde_json::json!([layout.type_, layout.data, obj.spec.secret.profile]))
}

/// Whether our Secret was written for another layout than the spec now asks for.
pub fn layout_stale(obj: &IamAccessKey, meta: Option<&PartialObjectMeta<Secret>>) -> bool {
    let written = meta.and_then(|m| m.metadata.annotations.as_ref()).and_then(|a| a.get(LAYOUT_ANNOTATION));
    written.is_some_and(|w| *w != layout_fingerprint(obj))
}

/// Whether our Secret's data was written for the data layout the spec asks for (only labels or
/// annotations changed).
pub fn data_layout_current(obj: &IamAccessKey, held: &Secret) -> bool {
    let written = held.metadata.annotations.as_ref().and_then(|a| a.get(DATA_LAYOUT_ANNOTATION));
    written.is_some_and(|w| *w == data_layout_fingerprint(obj))
}

/// The secret access key held by a Secret we wrote, where it can be read back: where its
/// `SECRET_AT_ANNOTATION` says, or, in a Secret written before templates existed, in either
/// built-in format. `None` when the data holds only values derived from it.
pub fn recover_secret(held: &Secret) -> Option<SecretAccessKey> {
    let annotations = held.metadata.annotations.as_ref();
    let data = held.data.as_ref()?;
    if let Some(at) = annotations.and_then(|a| a.get(SECRET_AT_ANNOTATION)) {
        let plain: BTreeMap<String, Vec<u8>> = data.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        return Locator::parse(at)?.read(&plain);
    }
    if annotations.is_some_and(|a| a.contains_key(DATA_LAYOUT_ANNOTATION)) {
        return None;
    }
    if let Some(v) = data.get("AWS_SECRET_ACCESS_KEY") {
        return String::from_utf8(v.0.clone()).ok().map(SecretAccessKey::new);
    }
    let file = String::from_utf8(data.get("credentials")?.0.clone()).ok()?;
    file.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "aws_secret_access_key")
        .map(|(_, v)| SecretAccessKey::new(v.trim().to_owned()))
}

/// Classify the Secret's metadata: ours only if it names this very resource (by UID): as owner,
/// or, under `creationPolicy` Merge and Orphan, in its `written-for` annotation
/// (`secret_policy::classify`, which also says why a Secret is not ours to write).
pub fn observe_secret(obj: &IamAccessKey, meta: Option<&PartialObjectMeta<Secret>>) -> SecretObservation {
    super::secret_policy::classify(obj, meta.map(|m| &m.metadata)).0
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

    const ARN: &str = "arn:aws:iam::123456789012:user/u";

    fn written(obj: &IamAccessKey, secret: &str) -> Secret {
        render_secret(obj, "AKIA1", &SecretAccessKey::new(secret.into()), ARN).unwrap()
    }

    #[test]
    fn env_format_has_both_variables_label_annotation_and_owner() {
        let s = written(&resource("Env"), "s3cr3t");
        let data = s.data.unwrap();
        assert_eq!(data["AWS_ACCESS_KEY_ID"].0, b"AKIA1");
        assert_eq!(data["AWS_SECRET_ACCESS_KEY"].0, b"s3cr3t");
        let labels = s.metadata.labels.unwrap();
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        assert_eq!(labels["team"], "a");
        assert_eq!(s.metadata.annotations.unwrap()[ACCESS_KEY_ID_ANNOTATION], "AKIA1");
        assert_eq!(s.metadata.owner_references.unwrap()[0].uid, "uid-1");
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
    }

    #[test]
    fn credentials_file_format_uses_the_profile() {
        let s = written(&resource("CredentialsFile"), "x");
        let file = String::from_utf8(s.data.unwrap()["credentials"].0.clone()).unwrap();
        assert_eq!(file, "[ci]\naws_access_key_id = AKIA1\naws_secret_access_key = x\n");
    }

    /// Secrets written before templates existed: no data layout, no locator, the same
    /// fingerprint as then.
    fn legacy(obj: &IamAccessKey, secret: &str) -> Secret {
        let mut s = written(obj, secret);
        let annotations = s.metadata.annotations.as_mut().unwrap();
        annotations.remove(DATA_LAYOUT_ANNOTATION);
        annotations.remove(SECRET_AT_ANNOTATION);
        s
    }

    #[test]
    fn the_secret_is_read_back_where_it_stands_and_a_layout_change_is_seen() {
        let env = resource("Env");
        let file = resource("CredentialsFile");
        for obj in [&env, &file] {
            for s in [written(obj, "s3cr3t"), legacy(obj, "s3cr3t")] {
                assert_eq!(recover_secret(&s).map(|k| k.expose().to_owned()).as_deref(), Some("s3cr3t"));
            }
        }
        let meta = |s: Secret| PartialObjectMeta::<Secret> { metadata: s.metadata, ..Default::default() };
        assert!(!layout_stale(&env, Some(&meta(written(&env, "x")))));
        assert_eq!(
            legacy(&env, "x").metadata.annotations.unwrap()[LAYOUT_ANNOTATION],
            "2716f4363e72eb3c",
            "the fingerprint of a spec without a template is the one older versions wrote"
        );
        assert!(layout_stale(&file, Some(&meta(written(&env, "x")))), "format changed");
        let mut relabelled = env.clone();
        relabelled.spec.secret.labels.insert("team".into(), "b".into());
        assert!(layout_stale(&relabelled, Some(&meta(written(&env, "x")))), "labels changed");
        assert!(data_layout_current(&relabelled, &written(&env, "x")), "the data layout did not");
        assert!(!data_layout_current(&file, &written(&env, "x")));
        assert!(!data_layout_current(&env, &legacy(&env, "x")), "unknown for a Secret of an older version");
    }

    #[test]
    fn a_derived_only_layout_cannot_be_read_back_and_a_relabel_keeps_its_data() {
        let mut smtp = resource("Env");
        smtp.spec.secret.template = Some(serde_json::from_value(serde_json::json!({
            "type": "kubernetes.io/basic-auth",
            "data": {"username": "{{ access_key_id }}", "password": "{{ ses_smtp_password(secret_access_key, 'eu-west-1') }}"},
        })).unwrap());
        let s = written(&smtp, "s3cr3t");
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert!(recover_secret(&s).is_none());
        let mut relabelled = smtp.clone();
        relabelled.spec.secret.labels.insert("team".into(), "b".into());
        assert!(data_layout_current(&relabelled, &s));
        let rewritten = build_secret(&relabelled, "AKIA1", held_content(&s));
        assert_eq!((rewritten.data, rewritten.type_), (s.data.clone(), s.type_.clone()));
        assert_eq!(rewritten.metadata.labels.unwrap()["team"], "b");
        check_template(&smtp).unwrap();
        smtp.spec.secret.template.as_mut().unwrap().data.insert("bad".into(), "{{ nope }}".into());
        let e = check_template(&smtp).unwrap_err();
        assert_eq!(e.reason(), "InvalidTemplate");
        assert!(
            e.to_string().starts_with(r#"spec.secret.template.data["bad"] line 1, column 4: undefined value"#),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_template_examples_render() {
        use serde::Deserialize;
        let text = include_str!("../../deploy/examples/templates.yaml");
        let mut seen = 0;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let obj = IamAccessKey::deserialize(doc).unwrap();
            check_template(&obj).unwrap_or_else(|e| panic!("{}: {e}", obj.metadata.name.as_deref().unwrap_or("?")));
            assert!(obj.spec.secret.template.is_some());
            seen += 1;
        }
        assert_eq!(seen, 2);
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
