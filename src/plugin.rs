//! `kubectl iak`: what the kubectl plugin (src/bin/kubectl-iak.rs) does, on the library's types
//! and code: the status report, pause and resume, rotation (the same request as
//! `iam-key-operator rotate`), and `why`, which evaluates the policies with the operator's own
//! matcher. Reports are built from plain values, so most of it is tested without a cluster.
//!
//! It never reads a Secret's data: only its metadata.

use std::{collections::BTreeMap, fmt::Write as _, sync::Arc};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    core::PartialObjectMeta,
};

use crate::{
    crd::{ACCESS_KEY_ID_ANNOTATION, IamAccessKey, IamAccessKeyPolicy, KeyPhase, PAUSED_ANNOTATION, SecretFormat},
    policy::{self, Decision, NamespaceFacts, RuleOutcome, Takeover, UserFacts},
};

const FIELD_MANAGER: &str = "kubectl-iak";

/// `3s`, `5m`, `2h`, `4d`: as kubectl prints ages.
pub fn age(since: Timestamp, now: Timestamp) -> String {
    let secs = now.as_second().saturating_sub(since.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Everything `kubectl iak status` shows, read from the API server.
pub struct StatusFacts {
    pub key: IamAccessKey,
    /// The Secret's metadata (never its data); `None`: it does not exist.
    pub secret: Option<PartialObjectMeta<Secret>>,
    /// The policy named by `status.grant`, if it still exists.
    pub grant_policy: Option<IamAccessKeyPolicy>,
}

pub async fn read_status(client: &Client, namespace: &str, name: &str) -> Result<StatusFacts, kube::Error> {
    let key = Api::<IamAccessKey>::namespaced(client.clone(), namespace).get(name).await?;
    let secret_name = secret_name(&key);
    let secret = Api::<Secret>::namespaced(client.clone(), namespace).get_metadata_opt(&secret_name).await?;
    let grant_policy = match key.status.as_ref().and_then(|s| s.grant.as_ref()) {
        Some(grant) => Api::<IamAccessKeyPolicy>::all(client.clone()).get_opt(&grant.policy).await?,
        None => None,
    };
    Ok(StatusFacts { key, secret, grant_policy })
}

/// The Secret the resource writes: as status names it, else as the operator names it.
fn secret_name(key: &IamAccessKey) -> String {
    key.status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .unwrap_or_else(|| crate::controller::secret::secret_name(key))
}

/// The report of `kubectl iak status`.
pub fn status_report(facts: &StatusFacts, now: Timestamp) -> String {
    let key = &facts.key;
    let status = key.status.clone().unwrap_or_default();
    let mut out = String::new();
    let ns = key.namespace().unwrap_or_default();
    let _ = writeln!(out, "IamAccessKey {ns}/{} (IAM user {})", key.name_any(), key.spec.user_name);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    match ready {
        Some(c) => {
            let _ = writeln!(out, "Ready:     {} (reason {}) {}", c.status, c.reason, c.message);
        }
        None => {
            let _ = writeln!(out, "Ready:     unknown (no status yet: is the operator running?)");
        }
    }
    let paused = key.is_paused();
    let _ =
        writeln!(out, "Paused:    {}", if paused { format!("yes ({PAUSED_ANNOTATION}=true)") } else { "no".into() });

    let secret_name = secret_name(key);
    let layout = crate::template::Layout::of(&key.spec.secret);
    let mut data_keys = layout.data.keys().cloned().collect::<Vec<_>>().join(", ");
    if key.spec.secret.template.is_none() && key.spec.secret.format == SecretFormat::CredentialsFile {
        data_keys.push_str(&format!(" (profile {})", key.spec.secret.profile));
    }
    if layout.type_ != "Opaque" {
        data_keys.push_str(&format!(", type {}", layout.type_));
    }
    match &facts.secret {
        Some(secret) => {
            let holds = secret.annotations().get(ACCESS_KEY_ID_ANNOTATION).map(String::as_str).unwrap_or("no key yet");
            let _ = writeln!(out, "Secret:    {secret_name} (keys {data_keys}; holds {holds})");
        }
        None => {
            let _ = writeln!(out, "Secret:    {secret_name} (does not exist)");
        }
    }

    match &status.grant {
        Some(grant) => {
            let rule = facts
                .grant_policy
                .as_ref()
                .and_then(|p| p.spec.rules.get(grant.rule as usize))
                .and_then(|r| serde_json::to_string(r).ok())
                .unwrap_or_else(|| "(the policy or rule no longer exists)".into());
            let revoked =
                grant.revoked_at.as_ref().map(|t| format!(", REVOKED {} ago", age(t.0, now))).unwrap_or_default();
            let _ = writeln!(
                out,
                "Grant:     IamAccessKeyPolicy {} rule {} (onRevoke {}{revoked}): {rule}",
                grant.policy,
                grant.rule,
                grant.on_revoke.as_str()
            );
        }
        None => {
            let _ = writeln!(out, "Grant:     none recorded (see `kubectl iak why`)");
        }
    }

    let serial = key.spec.rotation.as_ref().map_or(0, |r| r.serial);
    let mut rotation = format!("serial {serial}");
    if let Some(record) = &status.rotation {
        if let Some(at) = &record.last_rotated_at {
            let reason = record.last_reason.as_deref().unwrap_or("unknown reason");
            let _ = write!(rotation, ", last rotated {} ago ({reason})", age(at.0, now));
        }
        if let Some(requested) = &record.requested_at {
            let _ = write!(rotation, ", last request {requested}");
        }
    }
    if let Some(next) = &status.next_rotation_at {
        let _ = write!(rotation, ", next at {}", next.0);
    }
    let _ = writeln!(out, "Rotation:  {rotation}");

    let _ = writeln!(out, "Keys:");
    if status.keys.is_empty() {
        let _ = writeln!(out, "  (none)");
    } else {
        let _ = writeln!(out, "  {:<24} {:<9} {:<9} {:<6} LAST USED", "ACCESS KEY ID", "PHASE", "STATUS", "AGE");
        for k in &status.keys {
            let phase = match k.phase {
                KeyPhase::Current => "Current",
                KeyPhase::Draining => "Draining",
                KeyPhase::Inactive => "Inactive",
            };
            let key_status = match k.phase {
                KeyPhase::Current => status.key_status.map_or("-", |s| s.as_str()),
                KeyPhase::Draining => "Active",
                KeyPhase::Inactive => "Inactive",
            };
            let last_used = match (&status.last_used, &k.last_used_at) {
                (Some(lu), _) if lu.access_key_id == k.access_key_id => match &lu.date {
                    Some(d) => format!(
                        "{} ago{}",
                        age(d.0, now),
                        lu.service_name.as_ref().map(|s| format!(" ({s})")).unwrap_or_default()
                    ),
                    None => "never".into(),
                },
                (_, Some(at)) => format!("{} ago", age(at.0, now)),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<24} {:<9} {:<9} {:<6} {last_used}",
                k.access_key_id,
                phase,
                key_status,
                age(k.create_date.0, now)
            );
        }
    }
    let others: Vec<_> = status.conditions.iter().filter(|c| c.type_ != "Ready").collect();
    if !others.is_empty() {
        let _ = writeln!(out, "Conditions:");
        for c in others {
            let _ = writeln!(out, "  {} {} (reason {}) {}", c.type_, c.status, c.reason, c.message);
        }
    }
    out
}

/// Set (`true`) or remove the pause annotation.
pub async fn set_paused(client: &Client, namespace: &str, name: &str, paused: bool) -> Result<(), kube::Error> {
    let value = if paused { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"annotations": {PAUSED_ANNOTATION: value}}});
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    Api::<IamAccessKey>::namespaced(client.clone(), namespace).patch(name, &params, &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Increase `spec.rotation.serial` by one; returns the new serial. The write is conditional on
/// the version read, so two bumps at once make two rotations, not one; a conflict (the operator
/// writes status all the time) reads again.
pub async fn bump_serial(client: &Client, namespace: &str, name: &str) -> Result<i64, kube::Error> {
    let api = Api::<IamAccessKey>::namespaced(client.clone(), namespace);
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let mut tries = 0;
    loop {
        let key = api.get(name).await?;
        let serial = key.spec.rotation.as_ref().map_or(0, |r| r.serial) + 1;
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": key.resource_version()},
            "spec": {"rotation": {"serial": serial}},
        });
        match api.patch(name, &params, &Patch::Merge(&patch)).await {
            Err(kube::Error::Api(e)) if e.code == 409 && tries < 5 => tries += 1,
            done => return done.map(|_| serial),
        }
    }
}

/// An IAM user as `why` takes it: `NAME`, or `/PATH/NAME` with its IAM path.
pub fn parse_user(arg: &str) -> (String, Option<String>) {
    match arg.rfind('/') {
        Some(i) if arg.starts_with('/') => (arg[i + 1..].to_string(), Some(arg[..=i].to_string())),
        _ => (arg.to_string(), None),
    }
}

/// The answer of `kubectl iak why`: the report, and whether the pair is allowed.
pub fn why_report(
    policies: &[Arc<IamAccessKeyPolicy>],
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    user: &str,
    details: Option<(&str, &BTreeMap<String, String>)>,
) -> (String, bool) {
    let empty = BTreeMap::new();
    let ns = NamespaceFacts { name: namespace, labels: namespace_labels.unwrap_or(&empty) };
    let facts = UserFacts { name: user, details };
    let mut out = String::new();
    // As the operator decides: each account's rules on their own (the user as given stands for
    // the user in each account).
    let decisions = policy::accounts(policies, &ns)
        .iter()
        .map(|a| policy::authorize_in(policies, &ns, &facts, a.as_ref()))
        .collect();
    let allowed = match policy::combine(decisions, &ns, user) {
        Decision::Allowed(limits) => {
            let _ = writeln!(out, "allowed: namespace {namespace:?} may manage access keys of IAM user {user:?}");
            if let Some(g) = &limits.granting_rule {
                let _ = writeln!(
                    out,
                    "  granted by IamAccessKeyPolicy {} rule {} (onRevoke {}): what the resource records in status.grant",
                    g.policy,
                    g.rule,
                    g.on_revoke.as_str()
                );
            }
            let mut notes = vec![];
            if let Some(max) = limits.max_key_age {
                notes.push(format!("maxKeyAge {max}"));
            }
            if let Some(d) = limits.deactivate_unused_after {
                notes.push(format!("deactivateUnusedAfter {d}"));
            }
            if let Some((min, p)) = &limits.min_rotation_interval {
                notes.push(format!("minRotationInterval {min} (from {p})"));
            }
            notes.push(format!("pause {}", if limits.pause_allowed() { "allowed" } else { "not allowed" }));
            notes.push(format!(
                "deletionPolicy Retain {}",
                if limits.retain_allowed() { "allowed" } else { "not allowed" }
            ));
            for (what, field) in [(Takeover::Adoption, "adopt"), (Takeover::Merge, "creationPolicy Merge")] {
                let allowed = if limits.takeover_allowed(what) { "allowed" } else { "not allowed" };
                notes.push(format!("{field} {allowed}"));
            }
            let _ = writeln!(out, "  limits: {}", notes.join(", "));
            if let Some(role) = &limits.account {
                let _ = writeln!(out, "  in AWS account {} through role {}", role.account_id(), role.role_arn);
            }
            true
        }
        Decision::Denied(message) | Decision::AccountConflict(message) => {
            let _ = writeln!(out, "refused: {message}");
            false
        }
        Decision::NeedUserDetails => {
            let _ = writeln!(
                out,
                "undecided: a rule for namespace {namespace:?} depends on the IAM user's path or tags: \
                 give the user as /PATH/NAME (and --tag KEY=VALUE for tags), as `aws iam get-user` shows them"
            );
            false
        }
    };
    if namespace_labels.is_none() {
        let _ = writeln!(out, "  note: namespace {namespace:?} does not exist; its labels were taken as none");
    }
    let verdicts = policy::explain(policies, &ns, &facts);
    if verdicts.is_empty() {
        let _ = writeln!(out, "  no IamAccessKeyPolicy exists: nothing is allowed");
    }
    for v in verdicts {
        let what = match &v.outcome {
            RuleOutcome::Allows => "allows".to_string(),
            RuleOutcome::OtherNamespace(why) => format!("does not apply: {why}"),
            RuleOutcome::OtherUser(why) => format!("does not allow: {why}"),
            RuleOutcome::NeedsUserDetails(needs) => format!("depends on the user's IAM path or tags: {needs}"),
        };
        let _ = writeln!(out, "  IamAccessKeyPolicy {} rule {}: {what}", v.policy, v.rule);
    }
    (out, allowed)
}

/// The policies and the namespace's labels, as the operator reads them; then [`why_report`].
/// Policies the types cannot read are skipped (the operator lets them allow nothing).
pub async fn why(
    client: &Client,
    namespace: &str,
    user: &str,
    path: Option<&str>,
    tags: &BTreeMap<String, String>,
) -> Result<(String, bool), kube::Error> {
    let raw =
        Api::<kube::core::DeserializeGuard<IamAccessKeyPolicy>>::all(client.clone()).list(&Default::default()).await?;
    let policies: Vec<Arc<IamAccessKeyPolicy>> = raw.items.into_iter().filter_map(|p| p.0.ok()).map(Arc::new).collect();
    let ns = Api::<Namespace>::all(client.clone()).get_metadata_opt(namespace).await?;
    let labels = ns.map(|n| n.metadata.labels.unwrap_or_default());
    let details = path.map(|p| (p, tags));
    Ok(why_report(&policies, namespace, labels.as_ref(), user, details))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_kubectl_prints_them() {
        let now = Timestamp::from_second(1_000_000).expect("ts");
        let ago = |s: i64| age(Timestamp::from_second(1_000_000 - s).expect("ts"), now);
        assert_eq!([ago(5), ago(300), ago(3 * 3600), ago(3 * 86400)], ["5s", "5m", "3h", "3d"]);
    }

    #[test]
    fn a_user_is_a_name_or_a_path_and_a_name() {
        assert_eq!(parse_user("alice"), ("alice".into(), None));
        assert_eq!(parse_user("/k8s/team-a/alice"), ("alice".into(), Some("/k8s/team-a/".into())));
        assert_eq!(parse_user("/alice"), ("alice".into(), Some("/".into())));
    }
}
