//! The planner: pure rules that turn what was observed into the one next step to take.
//!
//! `plan_next_step` takes plain values (spec, status, the user's keys and tags, the Secret's
//! metadata, the clock) and returns a `Step`. It performs no I/O, so every rule of ownership,
//! crash recovery and rotation is tested here directly (see `tests.rs`). The controller executes
//! the step, records it, observes again and asks for the next one until the plan says `Done`.

pub mod account;
pub mod adopt;
mod cleanup;
pub mod record;
mod revoke;
#[cfg(any(test, feature = "simulation"))]
pub mod simulation;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

pub use adopt::{AdoptionRefusal, adoption_pending};
pub use cleanup::{CleanupObservation, CleanupStep, plan_cleanup};
pub use revoke::{RevokeStep, plan_revoke};

use crate::{
    crd::{
        CreationPolicy, IamAccessKeySpec, IamAccessKeyStatus, KEY_TAG_PREFIX, KeyPhase, KeyStatus, OWNER_TAG, OwnedKey,
    },
    keys::IamKey,
    policy::{Limits, Takeover},
};

/// IAM allows two access keys per user, Inactive ones included.
pub const MAX_KEYS_PER_USER: usize = 2;
/// How far the operator's clock may be from AWS's. AWS refuses requests signed more than 5
/// minutes off its own clock, so an operator whose calls work is within this of it.
pub const CLOCK_SKEW: SignedDuration = SignedDuration::from_mins(5);
/// `CreateAccessKey` is sent at most this long after `status.pendingCreate.since` (by the
/// operator's clock): an older record is renewed first. So a key left untagged by an
/// interrupted create was created within this window (plus the clock skew) of `since`.
pub const CREATE_WINDOW: SignedDuration = SignedDuration::from_mins(1);

impl Ledger {
    pub fn from_status(status: &IamAccessKeyStatus) -> Self {
        let rotation = status.rotation.clone().unwrap_or_default();
        Ledger {
            keys: status.keys.clone(),
            pending_create: status.pending_create.as_ref().map(|p| p.existing_key_ids.clone()),
            pending_since: status.pending_create.as_ref().map(|p| p.since.0),
            key_status: status.key_status,
            rotated_serial: rotation.serial,
            rotate_requested_at: rotation.requested_at,
            restarted_for: status.restarted_for.clone(),
            installed: status.rotation.is_some(),
        }
    }
}

/// Identity of a resource across clusters: `<cluster>/<namespace>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner(pub String);

impl Owner {
    pub fn new(cluster: &str, namespace: &str, name: &str) -> Self {
        Owner(format!("{cluster}/{namespace}/{name}"))
    }

    /// The value of the user tag whose key is an access key ID this resource owns.
    pub fn key_tag_value(&self) -> String {
        format!("{KEY_TAG_PREFIX}{}", self.0)
    }

    /// What a retained key's tag says once its resource is gone: still marked as the
    /// operator's (so no other resource adopts or deletes it), no longer anyone's.
    pub fn retained_tag_value(&self) -> String {
        format!("{KEY_TAG_PREFIX}retained:{}", self.0)
    }
}

/// What the Secret named by the spec looks like (metadata only: its data is never read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretObservation {
    Missing,
    /// Exists but was not written for this resource: never overwritten.
    NotOurs,
    /// Exists, was not written for this resource, and `spec.secret.creationPolicy` lets it write
    /// there (`Adopt`: take it over; `Merge`: write its entries into it). Planned like a missing
    /// Secret: no key of this resource is in it yet.
    Available,
    /// Ours; the access key ID its annotation names.
    Ours {
        access_key_id: Option<String>,
    },
}

/// What IAM says about the user.
#[derive(Clone, Debug, PartialEq)]
pub enum UserObservation {
    Missing,
    Found {
        keys: Vec<IamKey>,
        /// The user's tags, when they were read this reconcile (`None`: not needed so far).
        tags: Option<BTreeMap<String, String>>,
    },
}

/// The persistent part of status the planner reasons about.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    pub keys: Vec<OwnedKey>,
    /// Key IDs the user had when a create started (`None`: no create in progress).
    pub pending_create: Option<Vec<String>>,
    /// When that create started (`pendingCreate.since`).
    pub pending_since: Option<Timestamp>,
    /// The current key's status as last recorded (what the operator set or saw).
    pub key_status: Option<KeyStatus>,
    pub rotated_serial: i64,
    pub rotate_requested_at: Option<String>,
    /// The key ID the restart targets were rolled out for.
    pub restarted_for: Option<String>,
    /// Whether a key was ever installed as current (`status.rotation` is set then): `spec.adopt`
    /// is read only before that.
    pub installed: bool,
}

pub struct Observation<'a> {
    pub now: Timestamp,
    pub owner: &'a Owner,
    /// The owner under the cluster's previous name (`--previous-cluster-name`): its tags are
    /// taken over, rewritten to `owner`.
    pub previous_owner: Option<&'a Owner>,
    pub spec: &'a IamAccessKeySpec,
    pub ledger: &'a Ledger,
    /// Value of the `iam.keyop.dev/rotate-requested-at` annotation.
    pub rotate_requested_at: Option<&'a str>,
    pub user: &'a UserObservation,
    pub secret: &'a SecretObservation,
    /// When the current key's last use is due to be read again (`None`: now).
    pub last_used_due: Option<Timestamp>,
    /// Last use of the current key, as last read (`None`: never used, or not read yet).
    pub current_last_used: Option<Timestamp>,
    /// When this process last read the current key's last use (`None`: not since it started).
    pub last_used_read_at: Option<Timestamp>,
    /// What the tenancy policies impose.
    pub limits: &'a Limits,
    /// How the Secret (ours) stands to the layout `spec.secret` asks for.
    pub secret_layout: SecretLayout,
}

/// How the Secret (ours) stands to the layout `spec.secret` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecretLayout {
    #[default]
    Current,
    /// Written for another template, format, profile, labels or annotations: rewrite it with the
    /// same key.
    Stale,
    /// Stale, and its key cannot be read back from it (the old layout holds only values derived
    /// from the secret): only a new key can be written in the new layout.
    Unrecoverable,
}

/// Why a new key is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewKeyReason {
    /// The resource has no key yet.
    Initial,
    /// The Secret was deleted, or holds a key that is not the current one.
    SecretLost,
    /// The current key vanished from IAM (deleted outside the operator).
    KeyLost,
    /// `spec.rotation.interval` elapsed.
    Schedule,
    /// `spec.rotation.serial` increased.
    Serial,
    /// The rotate-requested-at annotation changed.
    Requested,
    /// A policy's `maxKeyAge` was reached.
    MaxKeyAge,
    /// `spec.secret`'s layout changed and the Secret's key cannot be read back for it.
    LayoutChanged,
}

impl NewKeyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NewKeyReason::Initial => "Initial",
            NewKeyReason::SecretLost => "SecretLost",
            NewKeyReason::KeyLost => "KeyLost",
            NewKeyReason::Schedule => "Schedule",
            NewKeyReason::Serial => "Serial",
            NewKeyReason::Requested => "Requested",
            NewKeyReason::MaxKeyAge => "MaxKeyAge",
            NewKeyReason::LayoutChanged => "LayoutChanged",
        }
    }
}

/// A condition the resource waits in until something outside changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// Annotation `iam.keyop.dev/paused: "true"` (checked by the controller before observing).
    Paused,
    UserNotFound,
    UserClaimed {
        by: String,
    },
    SecretConflict,
    KeyLimitExceeded {
        blocking: Vec<String>,
    },
    /// A policy's `deactivateUnusedAfter` deactivated the current key.
    KeyUnused {
        access_key_id: String,
        since: Timestamp,
    },
    /// `spec.adopt`'s key cannot be taken over (why); nothing was changed.
    AdoptionRefused(AdoptionRefusal),
    /// `creationPolicy: Merge`, and a matching policy rule does not allow it (`allowSecretMerge`).
    MergeNotAllowed {
        policies: Vec<String>,
    },
    /// `creationPolicy: Merge`, and the Secret to merge into does not exist (it is never created).
    SecretNotFound,
}

/// The one next thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The rules need the user's tags: read them (GetUser) and plan again.
    ReadUser,
    Blocked(Blocked),
    /// Tag the user as this resource's.
    ClaimUser,
    /// Our key that neither status nor the Secret knows (left by a crash): its secret is lost.
    /// Rewrite the claim and key tags written under the cluster's previous name to this name.
    TakeOverTags {
        tags: Vec<(String, String)>,
    },
    DeleteOrphan {
        access_key_id: String,
        tagged: bool,
    },
    /// The Secret holds our key that status does not know yet (crash before the status write).
    AdoptSecretKey {
        key: IamKey,
    },
    /// `spec.adopt`: read the key from its Secret, check it against IAM (`adopt::check_candidate`)
    /// and STS, publish it in the resource's Secret, tag it as ours, record it as current.
    AdoptKey,
    /// Our per-key tags whose key is gone (a crash or failure between delete and untag).
    UntagStale {
        tag_keys: Vec<String>,
    },
    /// A key status lists is gone from IAM.
    ForgetKey {
        access_key_id: String,
        expected: bool,
    },
    /// A key status lists that IAM does not tag as this resource's: status cannot prove
    /// ownership (it may have been written by someone else). Stop tracking it; never touch it.
    DisownKey {
        access_key_id: String,
    },
    /// The user is claimed by another resource (two claimed it at once; the last claim
    /// stands): delete our key on it, tracked or not, so that the owner keeps the user's slots.
    ReleaseKey {
        access_key_id: String,
    },
    /// Free a slot for a new key by deleting our retired (Inactive-phase) key.
    MakeRoom {
        access_key_id: String,
    },
    /// Record in status that a create starts, with the keys that exist now.
    StartCreate {
        existing_key_ids: Vec<String>,
    },
    /// A create was started but is no longer needed.
    ClearPending,
    /// Create, tag, verify, publish and record a new key; the current one (if any) drains.
    CreateKey {
        reason: NewKeyReason,
    },
    /// A policy's `deactivateUnusedAfter`: the current key was not used since `since`.
    DeactivateUnused {
        access_key_id: String,
        since: Timestamp,
    },
    /// Set a key's status in IAM. `drift`: IAM differed from what the operator had set.
    SetKeyStatus {
        access_key_id: String,
        status: KeyStatus,
        drift: bool,
    },
    /// Rewrite the Secret, same key, in the layout the spec now asks for.
    RewriteSecret {
        access_key_id: String,
    },
    /// Roll out the restart targets so they pick up the newly published key.
    RestartTargets {
        access_key_id: String,
    },
    /// `waitForUnused`: read whether the draining key is still used.
    CheckKeyUsage {
        access_key_id: String,
    },
    /// A draining key's grace period ended: deactivate it (or just record it, if already
    /// Inactive). `still_in_use`: `waitForUnused` gave up after `maxWait`.
    RetireKey {
        access_key_id: String,
        already_inactive: bool,
        still_in_use: bool,
    },
    /// A retired key's rollback window ended.
    DeleteRetired {
        access_key_id: String,
    },
    /// Read the current key's last use.
    RefreshLastUsed {
        access_key_id: String,
    },
    /// Nothing to do until `wake_at` (`None`: until something changes).
    Done {
        wake_at: Option<Timestamp>,
    },
}

/// How a key on the user relates to this resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ownership {
    Ours,
    /// Untagged, created while our create was in progress and not known before it: the remains
    /// of an interrupted create.
    OursUntagged,
    Foreign,
}

/// Only IAM can prove that a key is ours: our tag on it, or (untagged) a creation date inside
/// a create of ours. Status alone never does: whoever can write status could list any key.
fn ownership(key: &IamKey, obs: &Observation, tags: &BTreeMap<String, String>) -> Ownership {
    match tags.get(&key.access_key_id) {
        Some(v) if *v == obs.owner.key_tag_value() => Ownership::Ours,
        Some(_) => Ownership::Foreign,
        None if left_by_interrupted_create(key, obs.ledger) => Ownership::OursUntagged,
        None => Ownership::Foreign,
    }
}

/// Whether an untagged key is the remains of this resource's interrupted create: not among
/// the keys the user had when the create started, and created from `pendingCreate.since` to
/// `CREATE_WINDOW` after it, give or take `CLOCK_SKEW`. A key created outside that window is
/// not ours, whatever status says (a forged `since` far in the past proves nothing).
pub fn left_by_interrupted_create(key: &IamKey, ledger: &Ledger) -> bool {
    let (Some(before), Some(since)) = (&ledger.pending_create, ledger.pending_since) else {
        return false;
    };
    let earliest = since.checked_sub(CLOCK_SKEW).unwrap_or(Timestamp::MIN);
    let latest = after(since, CREATE_WINDOW + CLOCK_SKEW);
    !before.contains(&key.access_key_id) && earliest <= key.create_date && key.create_date <= latest
}

/// Whether a create recorded at `since` may still be sent at `now` (both by the operator's
/// clock); otherwise the record is renewed first (see `CREATE_WINDOW`).
pub fn create_window_open(since: Timestamp, now: Timestamp) -> bool {
    since <= now && now <= after(since, CREATE_WINDOW)
}

/// Whether the operator may have written anything to IAM for a resource with this status: a
/// key tracked or ever installed, or a create started. Every IAM write for a resource comes
/// after one of these is recorded, so a resource without any is deleted without IAM calls.
pub fn may_have_written_to_iam(status: &IamAccessKeyStatus) -> bool {
    !status.keys.is_empty() || status.pending_create.is_some() || status.rotation.is_some()
}

impl Step {
    /// Steps that change or delete an existing key: planned only on proof from IAM (its tags)
    /// that the key is this resource's.
    fn changes_a_key(&self) -> bool {
        matches!(
            self,
            Step::DeleteOrphan { .. }
                | Step::ReleaseKey { .. }
                | Step::MakeRoom { .. }
                | Step::DeleteRetired { .. }
                | Step::DeactivateUnused { .. }
                | Step::SetKeyStatus { .. }
                | Step::RetireKey { .. }
        )
    }
}

/// Decide the next step for a resource that is not being deleted.
pub fn plan_next_step(obs: &Observation) -> Step {
    let UserObservation::Found { keys, tags } = obs.user else {
        return Step::Blocked(Blocked::UserNotFound);
    };
    // Tags are read only when something is not explained by status alone: the first key (the
    // claim), a key status does not list (an interrupted create leaves one), or one it lists
    // that is gone. A converged resource skips the read, also to start a create: a new key
    // touches no existing one.
    let all_tracked = keys.iter().all(|k| obs.ledger.keys.iter().any(|o| o.access_key_id == k.access_key_id));
    // What the platform team has not allowed is refused before anything is written.
    let merge = obs.spec.secret.creation_policy == CreationPolicy::Merge;
    if merge && !obs.limits.takeover_allowed(Takeover::Merge) {
        return Step::Blocked(Blocked::MergeNotAllowed { policies: obs.limits.takeover_refused_by(Takeover::Merge) });
    }
    let adopting = adoption_pending(obs.spec, obs.ledger);
    if adopting && !obs.limits.takeover_allowed(Takeover::Adoption) {
        let policies = obs.limits.takeover_refused_by(Takeover::Adoption);
        return Step::Blocked(Blocked::AdoptionRefused(AdoptionRefusal::NotAllowed { policies }));
    }
    // Taking over an existing Secret hands it to the resource (and deletes it with it).
    if obs.spec.secret.creation_policy == CreationPolicy::Adopt
        && *obs.secret == SecretObservation::Available
        && !obs.limits.takeover_allowed(Takeover::Adoption)
    {
        let policies = obs.limits.takeover_refused_by(Takeover::Adoption);
        let secret = obs.spec.secret.name.clone().unwrap_or_default();
        return Step::Blocked(Blocked::AdoptionRefused(AdoptionRefusal::SecretNotAllowed { secret, policies }));
    }
    let secret_blocked = match obs.secret {
        SecretObservation::NotOurs => Some(Blocked::SecretConflict),
        SecretObservation::Missing if merge => Some(Blocked::SecretNotFound),
        _ => None,
    };
    if let Some(blocked) = secret_blocked {
        // A key of ours that no Secret holds (its write was refused: the name was taken in
        // between) is deleted before the resource settles on the conflict.
        let maybe_orphans = !all_tracked || obs.ledger.pending_create.is_some();
        return match tags {
            None if maybe_orphans => Step::ReadUser,
            Some(tags) if maybe_orphans => keys
                .iter()
                .filter(|k| !obs.ledger.keys.iter().any(|o| o.access_key_id == k.access_key_id))
                .find_map(|k| match ownership(k, obs, tags) {
                    Ownership::Foreign => None,
                    own => Some(Step::DeleteOrphan {
                        access_key_id: k.access_key_id.clone(),
                        tagged: own == Ownership::Ours,
                    }),
                })
                .unwrap_or(Step::Blocked(blocked)),
            _ => Step::Blocked(blocked),
        };
    }
    // A tracked key gone from IAM may have left its tag behind.
    let all_present = obs.ledger.keys.iter().all(|o| keys.iter().any(|k| k.access_key_id == o.access_key_id));
    let tags = match tags {
        Some(t) => t,
        None if obs.ledger.keys.is_empty() || !all_tracked || !all_present || obs.previous_owner.is_some() => {
            return Step::ReadUser;
        }
        // Converged: status explains IAM. Reading the tags is needed only to prove ownership
        // before a key is changed.
        None => {
            let step = plan_owned_keys(obs, keys, None);
            return if step.changes_a_key() { Step::ReadUser } else { step };
        }
    };
    if let Some(previous) = obs.previous_owner {
        let renamed = taken_over(obs.owner, previous, tags);
        if !renamed.is_empty() {
            return Step::TakeOverTags { tags: renamed };
        }
    }

    match tags.get(OWNER_TAG) {
        // Nothing is written to IAM before status records that a key may come: a resource
        // whose status records none is deleted without IAM calls.
        None if obs.ledger.keys.is_empty() && obs.ledger.pending_create.is_none() => {
            // The key to adopt is on the user already: no slot needed, and its tag carries the claim.
            if adopting {
                return Step::AdoptKey;
            }
            let ours_left = keys.iter().any(|k| tags.get(&k.access_key_id) == Some(&obs.owner.key_tag_value()));
            return if keys.len() < MAX_KEYS_PER_USER {
                Step::StartCreate { existing_key_ids: keys.iter().map(|k| k.access_key_id.clone()).collect() }
            } else if ours_left {
                // Keys of an earlier resource of this name fill the slots: claim, then delete them.
                Step::ClaimUser
            } else {
                Step::Blocked(Blocked::KeyLimitExceeded {
                    blocking: keys.iter().map(|k| k.access_key_id.clone()).collect(),
                })
            };
        }
        // Unclaimed, a create recorded: the new key's own TagUser carries the claim. Anything
        // else (the remains of an interrupted create) happens under a claim written first.
        None => {
            let step = plan_owned_keys(obs, keys, Some(tags));
            return if matches!(step, Step::CreateKey { .. }) { step } else { Step::ClaimUser };
        }
        // Claimed by another. Claiming does not lock: two resources that read the user unclaimed
        // at once both claim and create, and the last claim stands. The others give their keys
        // up, so that one owner is left with the user's slots.
        Some(by) if *by != obs.owner.0 => {
            let ours = keys.iter().find(|k| tags.get(&k.access_key_id) == Some(&obs.owner.key_tag_value()));
            return match ours {
                Some(key) => Step::ReleaseKey { access_key_id: key.access_key_id.clone() },
                None => Step::Blocked(Blocked::UserClaimed { by: by.clone() }),
            };
        }
        Some(_) => {}
    }
    plan_owned_keys(obs, keys, Some(tags))
}

/// The tags `previous` wrote (the claim, per-key tags), with the values `owner` writes.
pub fn taken_over(owner: &Owner, previous: &Owner, tags: &BTreeMap<String, String>) -> Vec<(String, String)> {
    tags.iter()
        .filter_map(|(k, v)| {
            if k == OWNER_TAG && *v == previous.0 {
                Some((k.clone(), owner.0.clone()))
            } else if *v == previous.key_tag_value() {
                Some((k.clone(), owner.key_tag_value()))
            } else {
                None
            }
        })
        .collect()
}

fn plan_owned_keys(obs: &Observation, keys: &[IamKey], tags: Option<&BTreeMap<String, String>>) -> Step {
    let ledger = obs.ledger;
    let secret_key_id = match obs.secret {
        SecretObservation::Ours { access_key_id } => access_key_id.as_deref(),
        _ => None,
    };
    let is_tracked = |id: &str| ledger.keys.iter().any(|k| k.access_key_id == id);
    let in_iam = |id: &str| keys.iter().find(|k| k.access_key_id == id);

    // 1. Crash leftovers. A key status lists that IAM does not show as ours is no longer tracked
    // (and never touched). Then what nobody can use is deleted, and only then is the key the
    // Secret holds adopted: adopting ends the pending create, whose record the untagged remains
    // of that create need to be recognised.
    if let Some(tags) = tags {
        let untracked = || {
            keys.iter()
                .filter(|k| !is_tracked(&k.access_key_id))
                .map(|k| (k, ownership(k, obs, tags)))
                .filter(|(_, own)| *own != Ownership::Foreign)
        };
        let in_secret = |key: &IamKey| secret_key_id == Some(key.access_key_id.as_str());
        if let Some(key) =
            keys.iter().find(|k| is_tracked(&k.access_key_id) && ownership(k, obs, tags) != Ownership::Ours)
        {
            return Step::DisownKey { access_key_id: key.access_key_id.clone() };
        }
        if let Some((key, own)) = untracked().find(|(k, own)| !(*own == Ownership::Ours && in_secret(k))) {
            return Step::DeleteOrphan { access_key_id: key.access_key_id.clone(), tagged: own == Ownership::Ours };
        }
        if let Some((key, _)) = untracked().next() {
            return Step::AdoptSecretKey { key: key.clone() };
        }
    }

    // 2. Tags of our keys that are gone, then keys status lists that IAM no longer has.
    if let Some(tags) = tags {
        let ours = obs.owner.key_tag_value();
        let tag_keys: Vec<String> =
            tags.iter().filter(|(k, v)| **v == ours && in_iam(k).is_none()).map(|(k, _)| k.clone()).collect();
        if !tag_keys.is_empty() {
            return Step::UntagStale { tag_keys };
        }
    }
    for owned in &ledger.keys {
        if in_iam(&owned.access_key_id).is_none() {
            // A retired key past its deleteAt may have been deleted by us just before a crash.
            let expected =
                owned.phase == KeyPhase::Inactive && owned.delete_at.as_ref().is_some_and(|t| t.0 <= obs.now);
            return Step::ForgetKey { access_key_id: owned.access_key_id.clone(), expected };
        }
    }

    // 3. A new key, when there is none or the current one must be replaced; before the first,
    // the key `spec.adopt` names is taken over instead.
    let current = ledger.keys.iter().find(|k| k.phase == KeyPhase::Current);
    if current.is_none() && adoption_pending(obs.spec, ledger) {
        return Step::AdoptKey;
    }
    if let Some(reason) = new_key_reason(obs, current, secret_key_id) {
        return plan_new_key(obs, keys, reason);
    }
    if ledger.pending_create.is_some() {
        return Step::ClearPending;
    }
    let Some(current) = current else {
        return Step::Done { wake_at: None };
    };

    // 3b. The Secret follows spec.secret's layout; workloads roll out once per published key.
    if obs.secret_layout == SecretLayout::Stale {
        return Step::RewriteSecret { access_key_id: current.access_key_id.clone() };
    }
    if !obs.spec.restart_targets.is_empty() && ledger.restarted_for.as_deref() != Some(current.access_key_id.as_str()) {
        return Step::RestartTargets { access_key_id: current.access_key_id.clone() };
    }

    // 4. The current key's status follows the spec, unless a policy deactivated it for lack of
    // use; a difference we did not make is drift.
    let unused_since = unused_since(obs, current);
    if let Some(iam_key) = in_iam(&current.access_key_id)
        && let Some(since) = unused_since
        && iam_key.status == KeyStatus::Active
    {
        // Decide only on a reading taken after the limit passed: an older one may miss a use.
        let limit_passed_at = obs.limits.deactivate_unused_after.map_or(since, |d| after(since, d.as_signed()));
        if obs.last_used_read_at.is_none_or(|read| read < limit_passed_at) {
            return Step::RefreshLastUsed { access_key_id: current.access_key_id.clone() };
        }
        return Step::DeactivateUnused { access_key_id: current.access_key_id.clone(), since };
    }
    if let Some(iam_key) = in_iam(&current.access_key_id)
        && unused_since.is_none()
        && iam_key.status != obs.spec.key_status
    {
        return Step::SetKeyStatus {
            access_key_id: current.access_key_id.clone(),
            status: obs.spec.key_status,
            // Status recorded the spec's value, yet IAM differs: someone changed it outside.
            drift: ledger.key_status == Some(obs.spec.key_status),
        };
    }

    // 5. Retire previous keys on schedule: Draining -> Inactive -> deleted.
    let mut wake_at: Option<Timestamp> = None;
    let mut wake = |t: Timestamp| wake_at = Some(wake_at.map_or(t, |w: Timestamp| w.min(t)));
    for owned in &ledger.keys {
        match owned.phase {
            KeyPhase::Current => {}
            KeyPhase::Draining => match plan_draining(obs, keys, owned) {
                Ok(step) => return step,
                Err(t) => wake(t),
            },
            // During the rollback window an admin may reactivate the key in IAM: not fought.
            KeyPhase::Inactive => match &owned.delete_at {
                Some(t) if t.0 > obs.now => wake(t.0),
                _ => {
                    return Step::DeleteRetired { access_key_id: owned.access_key_id.clone() };
                }
            },
        }
    }

    // 6. Last use, on its own (slow) schedule.
    match obs.last_used_due {
        Some(t) if t > obs.now => wake(t),
        _ => {
            return Step::RefreshLastUsed { access_key_id: current.access_key_id.clone() };
        }
    }
    if let Some(t) = rotation_due_at(obs.spec, obs.limits, current).filter(|t| *t > obs.now) {
        wake(t);
    }
    if let Some(d) = obs.limits.deactivate_unused_after
        && unused_since.is_none()
    {
        wake(after(obs.current_last_used.unwrap_or(current.create_date.0), d.as_signed()));
    }
    match unused_since {
        Some(since) if obs.spec.key_status == KeyStatus::Active => {
            Step::Blocked(Blocked::KeyUnused { access_key_id: current.access_key_id.clone(), since })
        }
        _ => Step::Done { wake_at },
    }
}

/// Since when the current key has not been used, if that is longer than a policy allows.
fn unused_since(obs: &Observation, current: &OwnedKey) -> Option<Timestamp> {
    let limit = obs.limits.deactivate_unused_after?;
    let since = obs.current_last_used.unwrap_or(current.create_date.0);
    (after(since, limit.as_signed()) <= obs.now).then_some(since)
}

/// The next step for a draining key, or when to look at it again.
fn plan_draining(obs: &Observation, keys: &[IamKey], owned: &OwnedKey) -> Result<Step, Timestamp> {
    if let Some(t) = owned.deactivate_at.as_ref().filter(|t| t.0 > obs.now) {
        return Err(t.0);
    }
    let already_inactive =
        keys.iter().any(|k| k.access_key_id == owned.access_key_id && k.status == KeyStatus::Inactive);
    let retire =
        |still_in_use| Step::RetireKey { access_key_id: owned.access_key_id.clone(), already_inactive, still_in_use };
    match usage_gate(obs, owned) {
        UsageGate::Open => Ok(retire(false)),
        UsageGate::GaveUp => Ok(retire(true)),
        UsageGate::Check => Ok(Step::CheckKeyUsage { access_key_id: owned.access_key_id.clone() }),
        UsageGate::WaitUntil(t) => Err(t),
    }
}

enum UsageGate {
    /// Nothing holds the key back.
    Open,
    /// Still in use, but `maxWait` is over.
    GaveUp,
    /// Its last use must be read (again).
    Check,
    /// In use at the last check; check again then.
    WaitUntil(Timestamp),
}

/// `waitForUnused`: a draining key past its grace period retires only once IAM shows no use of
/// it for a whole `usageCheckInterval` (or none since it was replaced), or when `maxWait` is over.
fn usage_gate(obs: &Observation, key: &OwnedKey) -> UsageGate {
    let rotation = match &obs.spec.rotation {
        Some(r) if r.wait_for_unused => r,
        _ => return UsageGate::Open,
    };
    let Some(replaced_at) = key.replaced_at.as_ref().map(|t| t.0) else { return UsageGate::Open };
    let give_up_at = after(replaced_at, rotation.max_wait.as_signed());
    if obs.now >= give_up_at {
        return UsageGate::GaveUp;
    }
    let Some(checked_at) = key.usage_checked_at.as_ref().map(|t| t.0) else { return UsageGate::Check };
    // A check made during the grace period says nothing about clients after it.
    let grace_end = key.deactivate_at.as_ref().map_or(replaced_at, |t| t.0);
    if checked_at < grace_end {
        return UsageGate::Check;
    }
    // Quiet means no use after it was replaced, or none during the interval before the check.
    let interval = rotation.usage_check_interval.as_signed();
    let quiet_since = checked_at.checked_sub(interval).unwrap_or(checked_at).max(replaced_at);
    // IAM tells the last use to the second at best: a use in the second the quiet time starts
    // may be after it, so it counts (keeping a key a little longer is the safe mistake).
    let used_recently =
        key.last_used_at.as_ref().is_some_and(|t| after(t.0, SignedDuration::from_secs(1)) > quiet_since);
    if !used_recently {
        return UsageGate::Open;
    }
    let next_check = after(checked_at, interval);
    if next_check <= obs.now { UsageGate::Check } else { UsageGate::WaitUntil(next_check.min(give_up_at)) }
}

/// Why the current key must be replaced now, if it must.
fn new_key_reason(obs: &Observation, current: Option<&OwnedKey>, secret_key_id: Option<&str>) -> Option<NewKeyReason> {
    let Some(current) = current else {
        return Some(if obs.ledger.keys.is_empty() { NewKeyReason::Initial } else { NewKeyReason::KeyLost });
    };
    if secret_key_id != Some(current.access_key_id.as_str()) {
        return Some(NewKeyReason::SecretLost);
    }
    // Requested rotations wait for a previous one to finish draining: one rotation at a time.
    if obs.ledger.keys.iter().any(|k| k.phase == KeyPhase::Draining) {
        return None;
    }
    if obs.secret_layout == SecretLayout::Unrecoverable {
        return Some(NewKeyReason::LayoutChanged);
    }
    let rotation = obs.spec.rotation.as_ref();
    if rotation.is_some_and(|r| r.serial > obs.ledger.rotated_serial) {
        return Some(NewKeyReason::Serial);
    }
    if obs.rotate_requested_at.is_some() && obs.rotate_requested_at != obs.ledger.rotate_requested_at.as_deref() {
        return Some(NewKeyReason::Requested);
    }
    let by_schedule = next_rotation_at(obs.spec, current);
    let by_policy = max_age_at(obs.limits, current);
    if by_policy.is_some_and(|t| t <= obs.now && by_schedule.is_none_or(|s| t < s)) {
        return Some(NewKeyReason::MaxKeyAge);
    }
    if by_schedule.is_some_and(|t| t <= obs.now) {
        return Some(NewKeyReason::Schedule);
    }
    None
}

/// When `current` must be replaced: by schedule or by a policy's `maxKeyAge`, whichever is first.
pub fn rotation_due_at(spec: &IamAccessKeySpec, limits: &Limits, current: &OwnedKey) -> Option<Timestamp> {
    match (next_rotation_at(spec, current), max_age_at(limits, current)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_age_at(limits: &Limits, current: &OwnedKey) -> Option<Timestamp> {
    Some(after(current.create_date.0, limits.max_key_age?.as_signed()))
}

/// When the scheduled rotation of `current` is due.
fn next_rotation_at(spec: &IamAccessKeySpec, current: &OwnedKey) -> Option<Timestamp> {
    let interval = spec.rotation.as_ref()?.interval?;
    current.create_date.0.checked_add(interval.as_signed()).ok()
}

fn plan_new_key(obs: &Observation, keys: &[IamKey], reason: NewKeyReason) -> Step {
    if keys.len() >= MAX_KEYS_PER_USER {
        // Only our own retired keys may make room; never the current key, never a foreign one.
        let retired = obs.ledger.keys.iter().filter(|k| k.phase == KeyPhase::Inactive).min_by_key(|k| k.create_date.0);
        if let Some(k) = retired {
            return Step::MakeRoom { access_key_id: k.access_key_id.clone() };
        }
        // A draining key frees its slot once it retires: retire it on its own schedule.
        if let Some(k) = obs.ledger.keys.iter().find(|k| k.phase == KeyPhase::Draining) {
            return plan_draining(obs, keys, k).unwrap_or_else(|t| Step::Done { wake_at: Some(t) });
        }
        let blocking = keys.iter().map(|k| k.access_key_id.clone()).collect();
        return Step::Blocked(Blocked::KeyLimitExceeded { blocking });
    }
    let existing: Vec<String> = keys.iter().map(|k| k.access_key_id.clone()).collect();
    match &obs.ledger.pending_create {
        Some(before) if *before == existing => Step::CreateKey { reason },
        _ => Step::StartCreate { existing_key_ids: existing },
    }
}

/// `now + d`, saturating.
pub fn after(now: Timestamp, d: SignedDuration) -> Timestamp {
    now.checked_add(d).unwrap_or(Timestamp::MAX)
}
