//! `spec.secret.creationPolicy`: whose the Secret is. How a Secret is recognised as this
//! resource's, which existing Secret it may write into, what a write keeps of what was there,
//! and what deletion leaves. Pure functions over Secrets, and the one write deletion makes
//! instead of deleting the Secret (`release`).
//!
//! | policy | marked as ours by        | an existing Secret not ours          | writes keep                | deletion            |
//! |--------|--------------------------|--------------------------------------|----------------------------|---------------------|
//! | Owner  | owner reference          | refused (SecretConflict)             | nothing (replaced whole)   | deleted             |
//! | Adopt  | owner reference          | taken over, unless another controls it | entries not written by us | deleted             |
//! | Merge  | `written-for` annotation | written into, unless an IamAccessKey's | everything not written by us | our entries removed |
//! | Orphan | `written-for` annotation | refused (SecretConflict)             | nothing (replaced whole)   | left, unmarked      |

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::ResourceExt;

use crate::{
    crd::{
        ACCESS_KEY_ID_ANNOTATION, CreationPolicy, DATA_LAYOUT_ANNOTATION, IamAccessKey, LAYOUT_ANNOTATION,
        SECRET_AT_ANNOTATION, WRITTEN_FOR_ANNOTATION, WRITTEN_FOR_LABEL, WRITTEN_KEYS_ANNOTATION,
    },
    plan::SecretObservation,
};

/// The annotations the operator writes for its own bookkeeping: replaced on each write, removed
/// when it leaves a Secret.
const BOOKKEEPING: &[&str] = &[
    ACCESS_KEY_ID_ANNOTATION,
    LAYOUT_ANNOTATION,
    DATA_LAYOUT_ANNOTATION,
    SECRET_AT_ANNOTATION,
    WRITTEN_FOR_ANNOTATION,
    WRITTEN_KEYS_ANNOTATION,
];

/// How the Secret's metadata stands to the resource under its creation policy, and, when it
/// is not the resource's to write, why (for the SecretConflict message).
pub fn classify(obj: &IamAccessKey, meta: Option<&ObjectMeta>) -> (SecretObservation, Option<String>) {
    let Some(meta) = meta else { return (SecretObservation::Missing, None) };
    let policy = obj.spec.secret.creation_policy;
    let uid = obj.uid().unwrap_or_default();
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    let annotation = |name: &str| meta.annotations.as_ref().and_then(|a| a.get(name));
    let ours = if policy.owns() {
        refs.iter().any(|r| r.uid == uid)
    } else {
        annotation(WRITTEN_FOR_ANNOTATION).is_some_and(|u| *u == uid)
    };
    if ours {
        return (SecretObservation::Ours { access_key_id: annotation(ACCESS_KEY_ID_ANNOTATION).cloned() }, None);
    }
    let is_access_key = |r: &&OwnerReference| r.kind == "IamAccessKey" && r.api_version.starts_with("iam.keyop.dev/");
    let why = if let Some(r) = refs.iter().find(is_access_key) {
        format!("belongs to IamAccessKey {} (owner reference): two resources cannot share a Secret", r.name)
    } else if annotation(WRITTEN_FOR_ANNOTATION).is_some() {
        format!(
            "holds the entries of another IamAccessKey (annotation {WRITTEN_FOR_ANNOTATION}): two resources cannot share a Secret"
        )
    } else {
        match (policy, refs.iter().find(|r| r.controller == Some(true))) {
            (CreationPolicy::Merge, _) => return (SecretObservation::Available, None),
            (CreationPolicy::Adopt, None) => return (SecretObservation::Available, None),
            (CreationPolicy::Adopt, Some(r)) => format!(
                "is controlled by {} {} (owner reference), which would fight over it: creationPolicy Adopt takes over only a Secret no controller owns; release it there first (e.g. kubectl delete {} {} --cascade=orphan, keeping its key with that tool's own orphan/retain setting), or use creationPolicy Merge where a policy allows it",
                r.kind,
                r.name,
                r.kind.to_lowercase(),
                r.name
            ),
            (CreationPolicy::Owner | CreationPolicy::Orphan, _) => {
                "was not created by this IamAccessKey: delete it, set spec.secret.name to a free name, or set spec.secret.creationPolicy to Adopt to take it over".into()
            }
        }
    };
    (SecretObservation::NotOurs, Some(why))
}

/// Why a Secret of this type is never taken over or written into (`None`: it may be). The
/// Kubernetes types other than `Opaque` and `kubernetes.io/basic-auth` hold other credentials
/// (a ServiceAccount's token, registry or TLS credentials): a resource must not turn them into its
/// own, nor have them deleted with it. Types outside `kubernetes.io/` (Crossplane's connection
/// Secrets, say) are another tool's way of naming `Opaque`.
pub fn refused_type(type_: Option<&str>) -> Option<String> {
    match type_ {
        None | Some("Opaque" | "kubernetes.io/basic-auth") => None,
        Some(t) if t.starts_with("kubernetes.io/") || t.starts_with("bootstrap.kubernetes.io/") => Some(format!(
            "is of type {t}, which holds other credentials: it is never taken over or written into; set spec.secret.name to a free name"
        )),
        Some(_) => None,
    }
}

/// The Secret to send for `ours` (rendered by `secret::build_secret`, which always sets the
/// resource's owner reference), given what the API server holds (`None`: create it).
///
/// `Owner` and `Orphan` replace the Secret whole. `Adopt` and `Merge` keep what they did not
/// write: the data entries other than those `written-keys` lists (the entries the previous write
/// made, so that a new layout leaves none behind), the other labels, annotations and owner
/// references, and the Secret's type (immutable) unless the template names one.
pub fn prepare_write(obj: &IamAccessKey, mut ours: Secret, held: Option<&Secret>) -> Secret {
    let policy = obj.spec.secret.creation_policy;
    let uid = obj.uid().unwrap_or_default();
    if !policy.owns() {
        ours.metadata.labels.get_or_insert_with(BTreeMap::new).insert(WRITTEN_FOR_LABEL.into(), uid.clone());
        ours.metadata.annotations.get_or_insert_with(BTreeMap::new).insert(WRITTEN_FOR_ANNOTATION.into(), uid.clone());
        ours.metadata.owner_references = None;
    }
    let annotations = ours.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if policy.keeps_others() {
        let written: Vec<&String> = ours.data.iter().flatten().map(|(k, _)| k).collect();
        let list = written.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",");
        annotations.insert(WRITTEN_KEYS_ANNOTATION.into(), list);
    }
    let Some(held) = held else { return ours };
    if !policy.keeps_others() {
        ours.metadata.resource_version = held.metadata.resource_version.clone();
        return ours;
    }
    // A Secret of ours written before `written-keys` existed (under Owner, say) is ours whole.
    let ours_already = matches!(classify(obj, Some(&held.metadata)).0, SecretObservation::Ours { .. });
    let mut out = without_our_entries(held, ours_already);
    let meta = &mut out.metadata;
    meta.annotations.get_or_insert_with(BTreeMap::new).extend(ours.metadata.annotations.unwrap_or_default());
    if !policy.owns() {
        meta.labels.get_or_insert_with(BTreeMap::new).insert(WRITTEN_FOR_LABEL.into(), uid);
    }
    if policy == CreationPolicy::Adopt {
        meta.labels.get_or_insert_with(BTreeMap::new).extend(ours.metadata.labels.unwrap_or_default());
        let refs = meta.owner_references.get_or_insert_with(Vec::new);
        for r in ours.metadata.owner_references.unwrap_or_default() {
            if !refs.iter().any(|held| held.uid == r.uid) {
                refs.push(r);
            }
        }
    }
    out.data.get_or_insert_with(BTreeMap::new).extend(ours.data.unwrap_or_default());
    if obj.spec.secret.template.as_ref().is_some_and(|t| t.type_.is_some()) || out.type_.is_none() {
        out.type_ = ours.type_;
    }
    out
}

/// The data keys the operator wrote into a Secret whose other entries it keeps (`None`: the
/// Secret does not say; all of it is ours, as in a Secret written before this existed).
pub fn written_keys(held: &Secret) -> Option<Vec<String>> {
    let list = held.metadata.annotations.as_ref()?.get(WRITTEN_KEYS_ANNOTATION)?;
    Some(list.split(',').filter(|k| !k.is_empty()).map(str::to_owned).collect())
}

/// `held` without what the operator wrote into it: the entries `written-keys` lists (all of
/// them, for a Secret of ours that does not say, `ours_whole`), the bookkeeping annotations and
/// the `written-for` label. The other labels and the owner references stay.
pub fn without_our_entries(held: &Secret, ours_whole: bool) -> Secret {
    let mut out = held.clone();
    let written = written_keys(held);
    if let Some(data) = out.data.as_mut() {
        match written {
            Some(written) => data.retain(|k, _| !written.contains(k)),
            None if ours_whole => data.clear(),
            None => {}
        }
    }
    if let Some(annotations) = out.metadata.annotations.as_mut() {
        annotations.retain(|k, _| !BOOKKEEPING.contains(&k.as_str()));
    }
    unmark(&mut out);
    out.metadata.managed_fields = None;
    out
}

/// Without the `written-for` label (the annotation goes with the bookkeeping).
fn unmark(secret: &mut Secret) {
    if let Some(labels) = secret.metadata.labels.as_mut() {
        labels.remove(WRITTEN_FOR_LABEL);
    }
}

/// `Orphan` at deletion: the Secret as it is, without the mark that made it this resource's, so
/// that a later resource may adopt it.
pub fn left_behind(held: &Secret) -> Secret {
    let mut out = held.clone();
    if let Some(annotations) = out.metadata.annotations.as_mut() {
        annotations.remove(WRITTEN_FOR_ANNOTATION);
    }
    unmark(&mut out);
    out.metadata.managed_fields = None;
    out
}

/// Deletion under `Orphan` (the Secret is left, unmarked) or `Merge` (this resource's entries
/// are removed): a replace conditional on the version just read. A Secret already gone is fine.
pub async fn release(ctx: &super::Context, obj: &IamAccessKey) -> Result<(), crate::error::Error> {
    use crate::error::KubeContext;
    let api: kube::Api<Secret> = kube::Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let name = super::secret::secret_name(obj);
    let Some(held) = api.get_opt(&name).await.context("reading the Secret")? else { return Ok(()) };
    // Someone else's by now: nothing of ours to take back.
    if !matches!(classify(obj, Some(&held.metadata)).0, SecretObservation::Ours { .. }) {
        return Ok(());
    }
    let out = match obj.spec.secret.creation_policy {
        CreationPolicy::Merge => without_our_entries(&held, false),
        _ => left_behind(&held),
    };
    let params = kube::api::PostParams { field_manager: Some(crate::crd::FIELD_MANAGER.into()), ..Default::default() };
    api.replace(&name, &params, &out).await.context("releasing the Secret")?;
    ctx.metrics.kube_write("Secret", "replace");
    Ok(())
}

/// Whether `ours` (a rendered Secret) holds the data key.
pub fn writes(ours: &Secret, data_key: &str) -> bool {
    ours.data.as_ref().is_some_and(|d| d.contains_key(data_key))
}

/// A Secret's owner references, for messages: `Kind/name`.
pub fn owners(meta: &ObjectMeta) -> Vec<String> {
    meta.owner_references.iter().flatten().map(|r| format!("{}/{}", r.kind, r.name)).collect()
}

/// The resource's owner reference (what `build_secret` sets), for tests.
#[cfg(test)]
fn our_ref(obj: &IamAccessKey) -> OwnerReference {
    kube::Resource::controller_owner_ref(obj, &()).expect("named")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;
    use crate::{controller::secret::render_secret, crd::IamAccessKeySpec, iam::SecretAccessKey};

    fn resource(policy: &str) -> IamAccessKey {
        let spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({
            "userName": "u", "secret": {"name": "app-aws", "creationPolicy": policy}
        }))
        .unwrap();
        let mut obj = IamAccessKey::new("app", spec);
        obj.metadata.namespace = Some("ns".into());
        obj.metadata.uid = Some("uid-1".into());
        obj
    }

    fn rendered(obj: &IamAccessKey, id: &str) -> Secret {
        let arn = "arn:aws:iam::123456789012:user/u";
        render_secret(obj, id, &SecretAccessKey::new("s3cr3t".into()), arn).unwrap()
    }

    /// A Secret someone else made: Crossplane-shaped, with its own label, annotation and type.
    fn theirs(controller: Option<&str>) -> Secret {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "app-aws", "namespace": "ns", "resourceVersion": "7",
                "labels": {"team": "billing"}, "annotations": {"note": "made by hand"},
                "ownerReferences": controller.map(|kind| vec![serde_json::json!({
                    "apiVersion": "example.com/v1", "kind": kind, "name": "x", "uid": "uid-x", "controller": true
                })]),
            },
            "type": "connection.crossplane.io/v1alpha1",
            "data": {"username": "QUtJQU9MRA==", "password": "b2xk", "endpoint": "aHR0cHM6Ly9pYW0="},
        }))
        .unwrap()
    }

    fn data(s: &Secret) -> BTreeMap<String, String> {
        s.data.iter().flatten().map(|(k, ByteString(v))| (k.clone(), String::from_utf8(v.clone()).unwrap())).collect()
    }

    #[test]
    fn each_policy_recognises_its_own_secret_and_only_adopt_and_merge_may_use_anothers() {
        let unowned = theirs(None);
        let controlled = theirs(Some("ExternalSecret"));
        for (policy, unowned_is, controlled_is) in [
            ("Owner", SecretObservation::NotOurs, SecretObservation::NotOurs),
            ("Orphan", SecretObservation::NotOurs, SecretObservation::NotOurs),
            ("Adopt", SecretObservation::Available, SecretObservation::NotOurs),
            ("Merge", SecretObservation::Available, SecretObservation::Available),
        ] {
            let obj = resource(policy);
            assert_eq!(classify(&obj, None).0, SecretObservation::Missing, "{policy}");
            assert_eq!(classify(&obj, Some(&unowned.metadata)).0, unowned_is, "{policy}");
            let (seen, why) = classify(&obj, Some(&controlled.metadata));
            assert_eq!(seen, controlled_is, "{policy}");
            if policy == "Adopt" {
                assert!(why.unwrap().contains("controlled by ExternalSecret x"), "the conflict names the controller");
            }
            // What the policy writes is recognised as its own afterwards.
            let written = prepare_write(&obj, rendered(&obj, "AKIANEW"), Some(&unowned));
            let ours = SecretObservation::Ours { access_key_id: Some("AKIANEW".into()) };
            assert_eq!(classify(&obj, Some(&written.metadata)).0, ours, "{policy}");
        }
    }

    #[test]
    fn secrets_holding_other_credentials_are_never_taken_over() {
        for t in ["kubernetes.io/service-account-token", "kubernetes.io/dockerconfigjson", "kubernetes.io/tls"] {
            assert!(refused_type(Some(t)).is_some_and(|why| why.contains(t)), "{t}");
        }
        for t in [None, Some("Opaque"), Some("kubernetes.io/basic-auth"), Some("connection.crossplane.io/v1alpha1")] {
            assert_eq!(refused_type(t), None, "{t:?}");
        }
    }

    #[test]
    fn a_secret_of_another_access_key_is_never_shared() {
        let other = resource("Owner");
        let mut other_secret = rendered(&other, "AKIAOTHER");
        other_secret.metadata.owner_references = Some(vec![OwnerReference { uid: "uid-2".into(), ..our_ref(&other) }]);
        let merged_by_other = {
            let mut s = theirs(None);
            s.metadata.annotations.as_mut().unwrap().insert(WRITTEN_FOR_ANNOTATION.into(), "uid-2".into());
            s
        };
        for policy in ["Adopt", "Merge"] {
            let obj = resource(policy);
            let (seen, why) = classify(&obj, Some(&other_secret.metadata));
            assert_eq!(seen, SecretObservation::NotOurs, "{policy}");
            assert!(why.unwrap().contains("belongs to IamAccessKey app"), "{policy}");
            assert_eq!(classify(&obj, Some(&merged_by_other.metadata)).0, SecretObservation::NotOurs, "{policy}");
        }
    }

    #[test]
    fn adopt_takes_the_secret_over_and_keeps_what_it_does_not_write() {
        let obj = resource("Adopt");
        let held = theirs(None);
        let out = prepare_write(&obj, rendered(&obj, "AKIANEW"), Some(&held));
        let d = data(&out);
        assert_eq!(d["AWS_ACCESS_KEY_ID"], "AKIANEW");
        assert_eq!((d["username"].as_str(), d["endpoint"].as_str()), ("AKIAOLD", "https://iam"), "other entries kept");
        let labels = out.metadata.labels.as_ref().unwrap();
        assert_eq!(
            (labels["team"].as_str(), labels["app.kubernetes.io/managed-by"].as_str()),
            ("billing", "iam-key-operator")
        );
        let annotations = out.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["note"], "made by hand");
        assert_eq!(annotations[WRITTEN_KEYS_ANNOTATION], "AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY");
        assert_eq!(out.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
        assert_eq!(out.type_.as_deref(), Some("connection.crossplane.io/v1alpha1"), "a Secret's type is immutable");
        assert_eq!(out.metadata.resource_version.as_deref(), Some("7"), "conditional on what was read");
        // A new layout later replaces exactly what the last write wrote.
        let mut file = obj.clone();
        file.spec.secret.format = crate::crd::SecretFormat::CredentialsFile;
        let again = prepare_write(&file, rendered(&file, "AKIANEW"), Some(&out));
        let d = data(&again);
        assert!(!d.contains_key("AWS_ACCESS_KEY_ID") && d.contains_key("credentials") && d.contains_key("username"));
        // Owner -> Adopt: a Secret the operator created before is all its own, old entries included.
        let owner = resource("Owner");
        let created = prepare_write(&owner, rendered(&owner, "AKIANEW"), None);
        let relayout = prepare_write(&file, rendered(&file, "AKIANEW"), Some(&created));
        assert_eq!(data(&relayout).keys().collect::<Vec<_>>(), ["credentials"]);
    }

    #[test]
    fn merge_writes_entries_only_and_unmerging_restores_the_rest() {
        let obj = resource("Merge");
        let held = theirs(Some("Release"));
        let out = prepare_write(&obj, rendered(&obj, "AKIANEW"), Some(&held));
        let mut marked = held.metadata.labels.clone().unwrap_or_default();
        marked.insert(WRITTEN_FOR_LABEL.into(), "uid-1".into());
        assert_eq!(out.metadata.labels, Some(marked), "the owner's labels, and the mark the watch selects");
        assert_eq!(out.metadata.owner_references, held.metadata.owner_references, "no owner reference of ours");
        assert_eq!(out.metadata.annotations.as_ref().unwrap()[WRITTEN_FOR_ANNOTATION], "uid-1");
        let back = without_our_entries(&out, true);
        assert_eq!(
            (back.data, back.metadata.annotations, back.metadata.labels),
            (held.data, held.metadata.annotations, held.metadata.labels)
        );
    }

    #[test]
    fn orphan_creates_without_an_owner_reference_and_is_left_unmarked() {
        let obj = resource("Orphan");
        let created = prepare_write(&obj, rendered(&obj, "AKIANEW"), None);
        assert!(created.metadata.owner_references.is_none());
        assert_eq!(created.metadata.labels.as_ref().unwrap()[WRITTEN_FOR_LABEL], "uid-1", "seen by the watch");
        assert_eq!(
            classify(&obj, Some(&created.metadata)).0,
            SecretObservation::Ours { access_key_id: Some("AKIANEW".into()) }
        );
        let left = left_behind(&created);
        assert_eq!(data(&left), data(&created), "the data stays");
        assert!(!left.metadata.labels.as_ref().unwrap().contains_key(WRITTEN_FOR_LABEL), "unmarked");
        assert_eq!(
            classify(&resource("Adopt"), Some(&left.metadata)).0,
            SecretObservation::Available,
            "adoptable later"
        );
        let owner = resource("Owner");
        assert!(prepare_write(&owner, rendered(&owner, "AKIANEW"), None).metadata.owner_references.is_some());
    }
}
