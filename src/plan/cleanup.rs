//! What to do, step by step, when an IamAccessKey is deleted (the finalizer's work).

use std::collections::BTreeMap;

use super::{Ledger, Owner, SecretObservation, UserObservation, left_by_interrupted_create};
use crate::crd::{CreationPolicy, DeletionPolicy, OWNER_TAG};

pub struct CleanupObservation<'a> {
    pub owner: &'a Owner,
    /// The owner under the cluster's previous name, whose tags count as this owner's.
    pub previous_owner: Option<&'a Owner>,
    pub policy: DeletionPolicy,
    /// Whose the Secret is: what happens to it (deleted, left, or our entries removed).
    pub creation_policy: CreationPolicy,
    pub ledger: &'a Ledger,
    pub user: &'a UserObservation,
    pub secret: &'a SecretObservation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CleanupStep {
    /// The tags are needed to know which keys are ours.
    ReadUser,
    DeleteKey {
        access_key_id: String,
    },
    /// `Retain`: re-tag kept keys as retained, so no resource ever adopts or deletes them.
    MarkRetained {
        access_key_ids: Vec<String>,
    },
    /// Remove our per-key tags and the claim.
    Untag {
        tag_keys: Vec<String>,
    },
    DeleteSecret,
    /// `creationPolicy: Orphan`: leave the Secret, without the mark that makes it this
    /// resource's (so that a later resource may adopt it).
    LeaveSecret,
    /// `creationPolicy: Merge`: remove this resource's entries (and marks) from the Secret,
    /// which stays with its owner.
    UnmergeSecret,
    /// Everything is gone: release the finalizer.
    Done,
}

pub fn plan_cleanup(obs: &CleanupObservation) -> CleanupStep {
    let secret_key_id = match obs.secret {
        SecretObservation::Ours { access_key_id } => access_key_id.clone(),
        _ => None,
    };
    if let UserObservation::Found { keys, tags } = obs.user {
        let Some(tags) = tags else {
            return CleanupStep::ReadUser;
        };
        // Only IAM proves a key ours: our tag, or (untagged) a creation date inside a create of
        // ours. Being listed in status proves nothing (status may have been forged).
        let owners: Vec<&Owner> = std::iter::once(obs.owner).chain(obs.previous_owner).collect();
        let ours = |id: &str| tags.get(id).is_some_and(|v| owners.iter().any(|o| *v == o.key_tag_value()));
        let tracked = |id: &str| obs.ledger.keys.iter().any(|k| k.access_key_id == id);
        for key in keys {
            let id = key.access_key_id.as_str();
            let leftover = !tags.contains_key(id) && left_by_interrupted_create(key, obs.ledger);
            let in_use = tracked(id) || secret_key_id.as_deref() == Some(id);
            let delete = match obs.policy {
                DeletionPolicy::Delete => ours(id) || leftover,
                // Kept keys are the ones someone may hold; the rest have no usable secret.
                DeletionPolicy::Retain => (ours(id) && !in_use) || leftover,
            };
            if delete {
                return CleanupStep::DeleteKey { access_key_id: id.to_owned() };
            }
        }
        let retained: Vec<String> = keys.iter().map(|k| k.access_key_id.clone()).filter(|id| ours(id)).collect();
        if !retained.is_empty() {
            return CleanupStep::MarkRetained { access_key_ids: retained };
        }
        let tag_keys: Vec<String> = owners.iter().flat_map(|o| our_tag_keys(o, tags)).collect();
        if !tag_keys.is_empty() {
            return CleanupStep::Untag { tag_keys };
        }
    }
    if matches!(obs.secret, SecretObservation::Ours { .. }) {
        return match obs.creation_policy {
            CreationPolicy::Owner | CreationPolicy::Adopt => CleanupStep::DeleteSecret,
            CreationPolicy::Orphan => CleanupStep::LeaveSecret,
            CreationPolicy::Merge => CleanupStep::UnmergeSecret,
        };
    }
    CleanupStep::Done
}

/// Tags on the user that this resource wrote: the claim and per-key tags (also of keys that
/// are gone already).
fn our_tag_keys(owner: &Owner, tags: &BTreeMap<String, String>) -> Vec<String> {
    tags.iter()
        .filter(|(k, v)| (k.as_str() == OWNER_TAG && **v == owner.0) || **v == owner.key_tag_value())
        .map(|(k, _)| k.clone())
        .collect()
}
