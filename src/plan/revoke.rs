//! What happens to a resource's keys when no policy rule allows it any more: the `onRevoke` of
//! the rule that last allowed it, step by step.

use super::{CleanupObservation, CleanupStep, UserObservation, plan_cleanup};
use crate::crd::{DeletionPolicy, KeyStatus, OnRevoke};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RevokeStep {
    /// The tags are needed to know which keys are ours.
    ReadUser,
    /// `Deactivate`: set one of the resource's own Active keys Inactive.
    Deactivate { access_key_id: String },
    /// `Delete`: the step deleting the resource would take (`deletionPolicy: Delete`).
    Cleanup(CleanupStep),
    /// Nothing (more) to do.
    Done,
}

/// The next step of `on_revoke`, given what deletion would observe. Only keys whose tag names
/// this resource are ever deactivated; `Delete` touches what the cleanup planner would.
pub fn plan_revoke(on_revoke: OnRevoke, obs: &CleanupObservation) -> RevokeStep {
    match on_revoke {
        OnRevoke::Keep => RevokeStep::Done,
        OnRevoke::Delete => {
            let as_deletion = CleanupObservation {
                owner: obs.owner,
                previous_owner: obs.previous_owner,
                policy: DeletionPolicy::Delete,
                creation_policy: obs.creation_policy,
                ledger: obs.ledger,
                user: obs.user,
                secret: obs.secret,
            };
            match plan_cleanup(&as_deletion) {
                CleanupStep::Done => RevokeStep::Done,
                step => RevokeStep::Cleanup(step),
            }
        }
        OnRevoke::Deactivate => {
            let UserObservation::Found { keys, tags } = obs.user else {
                return RevokeStep::Done;
            };
            let Some(tags) = tags else {
                return RevokeStep::ReadUser;
            };
            let owners = std::iter::once(obs.owner).chain(obs.previous_owner);
            let tag_values: Vec<String> = owners.map(|o| o.key_tag_value()).collect();
            let ours = |id: &str| tags.get(id).is_some_and(|v| tag_values.contains(v));
            keys.iter()
                .find(|k| k.status == KeyStatus::Active && ours(&k.access_key_id))
                .map_or(RevokeStep::Done, |k| RevokeStep::Deactivate { access_key_id: k.access_key_id.clone() })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use jiff::Timestamp;

    use super::*;
    use crate::{
        crd::{KeyPhase, OWNER_TAG, OwnedKey},
        keys::IamKey,
        plan::{Ledger, Owner, SecretObservation},
    };

    fn key(id: &str, status: KeyStatus) -> IamKey {
        IamKey { access_key_id: id.into(), status, create_date: Timestamp::UNIX_EPOCH }
    }

    fn tracked(id: &str) -> OwnedKey {
        OwnedKey::new(
            id,
            KeyPhase::Current,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        )
    }

    /// Run the plan to its end, applying each step to the observation; the steps taken.
    fn run(on_revoke: OnRevoke, user: UserObservation, secret: SecretObservation, ledger: &Ledger) -> Vec<RevokeStep> {
        let owner = Owner::new("c", "ns", "app");
        let (mut user, mut secret) = (user, secret);
        let mut steps = vec![];
        for _ in 0..20 {
            let obs = CleanupObservation {
                owner: &owner,
                previous_owner: None,
                policy: DeletionPolicy::Retain,
                creation_policy: crate::crd::CreationPolicy::Owner,
                ledger,
                user: &user,
                secret: &secret,
            };
            let step = plan_revoke(on_revoke, &obs);
            steps.push(step.clone());
            match (&step, &mut user) {
                (RevokeStep::Done, _) => return steps,
                (RevokeStep::ReadUser | RevokeStep::Cleanup(CleanupStep::ReadUser), _) => panic!("tags are given"),
                (RevokeStep::Deactivate { access_key_id }, UserObservation::Found { keys, .. }) => keys
                    .iter_mut()
                    .filter(|k| k.access_key_id == *access_key_id)
                    .for_each(|k| k.status = KeyStatus::Inactive),
                (
                    RevokeStep::Cleanup(CleanupStep::DeleteKey { access_key_id }),
                    UserObservation::Found { keys, .. },
                ) => keys.retain(|k| k.access_key_id != *access_key_id),
                (
                    RevokeStep::Cleanup(CleanupStep::Untag { tag_keys }),
                    UserObservation::Found { tags: Some(t), .. },
                ) => t.retain(|k, _| !tag_keys.contains(k)),
                (RevokeStep::Cleanup(CleanupStep::DeleteSecret), _) => secret = SecretObservation::Missing,
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("no end: {steps:?}")
    }

    fn user_with(keys: Vec<IamKey>, tags: &[(&str, &str)]) -> UserObservation {
        let tags: BTreeMap<String, String> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        UserObservation::Found { keys, tags: Some(tags) }
    }

    const OURS: &str = "iam-key-operator:c/ns/app";

    #[test]
    fn keep_touches_nothing() {
        let user = user_with(vec![key("AKIA1", KeyStatus::Active)], &[("AKIA1", OURS)]);
        let ledger = Ledger { keys: vec![tracked("AKIA1")], ..Default::default() };
        let secret = SecretObservation::Ours { access_key_id: Some("AKIA1".into()) };
        assert_eq!(run(OnRevoke::Keep, user, secret, &ledger), [RevokeStep::Done]);
    }

    #[test]
    fn deactivate_sets_only_our_active_keys_inactive() {
        let keys = vec![
            key("AKIA1", KeyStatus::Active),
            key("AKIA2", KeyStatus::Inactive),
            key("FOREIGN", KeyStatus::Active),
            key("OTHER", KeyStatus::Active),
        ];
        let user = user_with(keys, &[("AKIA1", OURS), ("AKIA2", OURS), ("OTHER", "iam-key-operator:c/ns/other")]);
        // Status may list a key it cannot prove is its own: not touched.
        let ledger = Ledger { keys: vec![tracked("AKIA1"), tracked("FOREIGN")], ..Default::default() };
        let steps = run(OnRevoke::Deactivate, user, SecretObservation::Missing, &ledger);
        assert_eq!(steps, [RevokeStep::Deactivate { access_key_id: "AKIA1".into() }, RevokeStep::Done]);
    }

    #[test]
    fn deactivate_reads_the_tags_first_and_a_missing_user_needs_nothing() {
        let owner = Owner::new("c", "ns", "app");
        let ledger = Ledger::default();
        let untagged = UserObservation::Found { keys: vec![key("AKIA1", KeyStatus::Active)], tags: None };
        let obs = |user| CleanupObservation {
            owner: &owner,
            previous_owner: None,
            policy: DeletionPolicy::Delete,
            creation_policy: crate::crd::CreationPolicy::Owner,
            ledger: &ledger,
            user,
            secret: &SecretObservation::Missing,
        };
        assert_eq!(plan_revoke(OnRevoke::Deactivate, &obs(&untagged)), RevokeStep::ReadUser);
        assert_eq!(plan_revoke(OnRevoke::Deactivate, &obs(&UserObservation::Missing)), RevokeStep::Done);
    }

    #[test]
    fn delete_removes_our_keys_tags_and_secret_like_deletion_even_for_a_retained_resource() {
        let keys =
            vec![key("AKIA1", KeyStatus::Active), key("AKIA2", KeyStatus::Inactive), key("FOREIGN", KeyStatus::Active)];
        let user = user_with(keys, &[("AKIA1", OURS), ("AKIA2", OURS), (OWNER_TAG, "c/ns/app"), ("team", "x")]);
        let ledger = Ledger { keys: vec![tracked("AKIA1"), tracked("AKIA2")], ..Default::default() };
        let secret = SecretObservation::Ours { access_key_id: Some("AKIA1".into()) };
        let steps = run(OnRevoke::Delete, user, secret, &ledger);
        let deleted: Vec<&RevokeStep> =
            steps.iter().filter(|s| matches!(s, RevokeStep::Cleanup(CleanupStep::DeleteKey { .. }))).collect();
        assert_eq!(deleted.len(), 2, "{steps:?}");
        assert!(steps.contains(&RevokeStep::Cleanup(CleanupStep::DeleteSecret)), "{steps:?}");
        assert!(steps.iter().any(|s| matches!(s, RevokeStep::Cleanup(CleanupStep::Untag { tag_keys }) if tag_keys.contains(&OWNER_TAG.to_string()))), "the claim is released: {steps:?}");
        assert!(!steps.iter().any(
            |s| matches!(s, RevokeStep::Cleanup(CleanupStep::DeleteKey { access_key_id }) if access_key_id == "FOREIGN")
        ));
        assert_eq!(steps.last(), Some(&RevokeStep::Done));
    }
}
