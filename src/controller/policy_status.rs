//! The status of IamAccessKeyPolicies: whether their rules can work as written (`Ready`), and
//! whether grants collide (`GrantsOverlap`: two namespaces that could manage the same IAM user,
//! across all policies, since rules combine).
//!
//! Computed from the tenancy caches whenever a policy, or a namespace or its labels, changes
//! (coalesced), off the async threads; written with server-side apply on the status
//! subresource, and only when it differs from what the policy holds.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    core::DeserializeGuard,
};
use tracing::{debug, warn};

use super::Context;
use crate::{
    crd::{FIELD_MANAGER, IamAccessKeyPolicy, IamAccessKeyPolicyStatus},
    policy::{
        NamespaceFacts,
        overlap::{GrantRef, PolicyReport, find_overlaps},
        rule_problems,
    },
};

pub const READY: &str = "Ready";
pub const GRANTS_OVERLAP: &str = "GrantsOverlap";
/// Overlaps named in one condition message; the rest are counted.
const MAX_EXAMPLES: usize = 10;
/// Changes arriving within this time are handled together.
const COALESCE: Duration = Duration::from_millis(500);
/// After a failed write, the next attempt.
const RETRY: Duration = Duration::from_secs(30);

type WatchedPolicy = DeserializeGuard<IamAccessKeyPolicy>;

/// Keep every policy's status current; never returns.
pub async fn run(ctx: Arc<Context>) {
    let mut changes = ctx.tenancy.grant_changes();
    // Unreadable policies have no status to compare with: what was written, by generation.
    let mut written_unreadable: HashMap<String, (Option<i64>, IamAccessKeyPolicyStatus)> = HashMap::new();
    loop {
        changes.borrow_and_update();
        let started = Instant::now();
        let stored = ctx.tenancy.stored_policies();
        let namespaces = ctx.tenancy.namespaces();
        let now = Timestamp::now();
        let computed = tokio::task::spawn_blocking(move || (desired_statuses(&stored, &namespaces, now), stored)).await;
        let Ok((desired, stored)) = computed else {
            warn!("computing the policies' status failed");
            tokio::time::sleep(RETRY).await;
            continue;
        };
        let computing = started.elapsed();
        debug!(policies = stored.len(), took = ?computing, "policy status computed");
        let mut failed = false;
        for (policy, status) in stored.iter().zip(desired) {
            let name = policy.name_any();
            let generation = policy.meta().generation;
            let unchanged = match &policy.0 {
                Ok(p) => p.status.as_ref() == Some(&status),
                Err(_) => written_unreadable.get(&name) == Some(&(generation, status.clone())),
            };
            if unchanged {
                continue;
            }
            match write(&ctx, &name, &status).await {
                Ok(()) => {
                    ctx.metrics.kube_write("IamAccessKeyPolicy", "status");
                    if policy.0.is_err() {
                        written_unreadable.insert(name, (generation, status));
                    }
                }
                // Deleted meanwhile: its deletion is a change, handled next.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    warn!(policy = %name, error = %crate::error::kube_message(&e), "could not write the policy's status");
                    failed = true;
                }
            }
        }
        written_unreadable.retain(|name, _| stored.iter().any(|p| p.name_any() == *name));
        // Large clusters: never spend more than a fifth of the time computing.
        let pause = COALESCE.max(computing * 4);
        if failed {
            let _ = tokio::time::timeout(RETRY, changes.changed()).await;
        } else if changes.changed().await.is_err() {
            // The caches are gone (the process is ending): nothing more to write.
            return std::future::pending().await;
        }
        tokio::time::sleep(pause).await;
    }
}

async fn write(ctx: &Context, name: &str, status: &IamAccessKeyPolicyStatus) -> Result<(), kube::Error> {
    // Read back through the guard: the write succeeds on a policy whose spec cannot be read.
    let api: Api<WatchedPolicy> = Api::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "iam.keyop.dev/v1alpha1",
        "kind": "IamAccessKeyPolicy",
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// The status each stored policy should have, in the same order.
pub fn desired_statuses(
    stored: &[Arc<WatchedPolicy>],
    namespaces: &[(String, BTreeMap<String, String>)],
    now: Timestamp,
) -> Vec<IamAccessKeyPolicyStatus> {
    let readable: Vec<Arc<IamAccessKeyPolicy>> =
        stored.iter().filter_map(|p| p.0.as_ref().ok()).map(|p| Arc::new(p.clone())).collect();
    let facts: Vec<NamespaceFacts> = namespaces.iter().map(|(name, labels)| NamespaceFacts { name, labels }).collect();
    let reports = find_overlaps(&readable, &facts, MAX_EXAMPLES);
    stored
        .iter()
        .map(|policy| match &policy.0 {
            Ok(p) => {
                let report = reports.get(&p.name_any()).cloned().unwrap_or_default();
                status_of(p, &report, now)
            }
            Err(invalid) => unreadable_status(policy.meta().generation, &invalid.error, now),
        })
        .collect()
}

fn status_of(policy: &IamAccessKeyPolicy, report: &PolicyReport, now: Timestamp) -> IamAccessKeyPolicyStatus {
    let generation = policy.metadata.generation;
    let held = policy.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let problems = rule_problems(policy);
    let rules = policy.spec.rules.len();
    let ready = if problems.is_empty() {
        let message =
            format!("{rules} rule(s) allow {} existing namespace(s) to manage access keys", report.namespaces);
        condition(held, READY, true, "Valid", message, generation, now)
    } else {
        let message = format!("{}; the other rules apply as written", problems.join("; "));
        condition(held, READY, false, "InvalidRule", message, generation, now)
    };
    let overlap = if report.overlapping_pairs == 0 {
        let message = "no two namespaces can manage the same IAM user through this policy's rules".to_string();
        condition(held, GRANTS_OVERLAP, false, "NoOverlap", message, generation, now)
    } else {
        condition(held, GRANTS_OVERLAP, true, "OverlappingGrants", overlap_message(policy, report), generation, now)
    };
    IamAccessKeyPolicyStatus {
        observed_generation: generation,
        conditions: vec![ready, overlap],
        rules: Some(rules as i64),
    }
}

fn unreadable_status(generation: Option<i64>, error: &str, now: Timestamp) -> IamAccessKeyPolicyStatus {
    let message = format!("the stored policy cannot be read ({error}): it allows nothing until it is fixed or deleted");
    // What the policy held is unknown (it could not be read): the transition is now.
    let ready = condition(&[], READY, false, "Unreadable", message, generation, now);
    IamAccessKeyPolicyStatus { observed_generation: generation, conditions: vec![ready], rules: None }
}

/// The message of a True `GrantsOverlap`: how many pairs, the first few with an example user,
/// and how to fix it.
pub fn overlap_message(policy: &IamAccessKeyPolicy, report: &PolicyReport) -> String {
    let own = policy.name_any();
    let grant = |g: &GrantRef| {
        if g.policy == own {
            format!("{:?} (rules[{}])", g.namespace, g.rule)
        } else {
            format!("{:?} (IamAccessKeyPolicy {:?} rules[{}])", g.namespace, g.policy, g.rule)
        }
    };
    let mut listed: Vec<String> = report
        .examples
        .iter()
        .map(|o| format!("namespaces {} and {} can both manage {}", grant(&o.a), grant(&o.b), o.example))
        .collect();
    let more = report.overlapping_pairs.saturating_sub(listed.len());
    if more > 0 {
        listed.push(format!("and {more} more pair(s)"));
    }
    format!(
        "{} pair(s) of namespaces can manage the same IAM users, so either namespace of a pair can take keys of the other's users: {}. Make the user patterns of different namespaces disjoint: a path prefix /k8s/{{namespace}}/, or a separator no namespace name contains ({{namespace}}.*)",
        report.overlapping_pairs,
        listed.join("; ")
    )
}

/// A condition; its transition time moves only when its status flips.
fn condition(
    held: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = match held.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn stored(
        name: &str,
        generation: i64,
        rules: serde_json::Value,
        status: Option<&IamAccessKeyPolicyStatus>,
    ) -> Arc<WatchedPolicy> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "iam.keyop.dev/v1alpha1", "kind": "IamAccessKeyPolicy",
                "metadata": {"name": name, "generation": generation}, "spec": {"rules": rules},
                "status": status,
            }))
            .unwrap(),
        )
    }

    fn namespaces(names: &[&str]) -> Vec<(String, BTreeMap<String, String>)> {
        names.iter().map(|n| (n.to_string(), BTreeMap::new())).collect()
    }

    fn find<'a>(status: &'a IamAccessKeyPolicyStatus, type_: &str) -> &'a Condition {
        status.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn overlapping_grants_are_named_with_an_example_user_and_the_fix() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let policies = [
            stored(
                "tenants",
                3,
                json!([{"namespaces": ["data", "data-ingest"], "userNames": ["{namespace}-*"]}]),
                None,
            ),
            stored("other", 1, json!([{"namespaces": ["web"], "userNames": ["data-*"]}]), None),
        ];
        let statuses = desired_statuses(&policies, &namespaces(&["data", "data-ingest", "web"]), t0);
        let status = &statuses[0];
        assert_eq!(status.observed_generation, Some(3));
        let ready = find(status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Valid"));
        assert_eq!(ready.message, "1 rule(s) allow 2 existing namespace(s) to manage access keys");
        let overlap = find(status, GRANTS_OVERLAP);
        assert_eq!((overlap.status.as_str(), overlap.reason.as_str()), ("True", "OverlappingGrants"));
        assert_eq!(overlap.observed_generation, Some(3));
        assert!(overlap.message.starts_with("3 pair(s) of namespaces"), "{}", overlap.message);
        assert!(
            overlap.message.contains(
                r#"namespaces "data" (rules[0]) and "data-ingest" (rules[0]) can both manage IAM user "data-ingest-""#
            ),
            "{}",
            overlap.message
        );
        assert!(
            overlap.message.contains(r#"namespaces "data" (rules[0]) and "web" (IamAccessKeyPolicy "other" rules[0])"#),
            "{}",
            overlap.message
        );
        assert!(overlap.message.contains("/k8s/{namespace}/"), "says how to fix it");
        assert_eq!(find(&statuses[1], GRANTS_OVERLAP).status, "True", "the other side is told too");
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time_so_a_recomputation_writes_nothing() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let rules = json!([{"namespaces": ["*"], "userPathPrefix": "/k8s/{namespace}/"}]);
        let first = desired_statuses(&[stored("p", 1, rules.clone(), None)], &namespaces(&["a", "b"]), t0).remove(0);
        assert_eq!(find(&first, GRANTS_OVERLAP).status, "False");
        let again = desired_statuses(&[stored("p", 1, rules, Some(&first))], &namespaces(&["a", "b"]), t1).remove(0);
        assert_eq!(again, first, "same input, same status: nothing to write");

        // The grant widens to every user under /k8s/: the warning flips, with a new time.
        let wide = json!([{"namespaces": ["*"], "userPathPrefix": "/k8s/"}]);
        let flipped = desired_statuses(&[stored("p", 2, wide, Some(&first))], &namespaces(&["a", "b"]), t1).remove(0);
        let overlap = find(&flipped, GRANTS_OVERLAP);
        assert_eq!((overlap.status.as_str(), &overlap.last_transition_time), ("True", &Time(t1)));
        assert_eq!(find(&flipped, READY).last_transition_time, Time(t0), "Ready stayed True");
    }

    #[test]
    fn a_rule_that_cannot_work_makes_the_policy_not_ready_naming_it() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let rules =
            json!([{"namespaces": ["*"], "userNames": ["{ns}-*"]}, {"namespaces": ["a"], "userNames": ["a-*"]}]);
        let status = desired_statuses(&[stored("p", 1, rules, None)], &namespaces(&["a"]), t0).remove(0);
        let ready = find(&status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "InvalidRule"));
        assert!(ready.message.starts_with(r#"spec.rules[0].userNames[0] "{ns}-*""#), "{}", ready.message);
    }

    #[test]
    fn an_unreadable_policy_is_not_ready() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let rules = json!([{"namespaces": ["a"], "userNames": ["u"], "maxKeyAge": "99999999999999999999d"}]);
        let policy = stored("bad", 4, rules, None);
        assert!(policy.0.is_err());
        let status = desired_statuses(&[policy], &namespaces(&["a"]), t0).remove(0);
        assert_eq!(status.observed_generation, Some(4));
        let ready = find(&status, READY);
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Unreadable"));
        assert!(ready.message.contains("allows nothing"), "{}", ready.message);
    }
}
