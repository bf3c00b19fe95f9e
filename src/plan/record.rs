//! What each step does to status and to the observation it was planned from, once its calls to
//! IAM and the API server succeeded. Both executors (the controller and the simulation in the
//! property tests) call these functions: a step means one thing, and the tests cover the
//! controller's own bookkeeping.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{NewKeyReason, Owner, UserObservation, after, rotation_due_at};
use crate::{
    crd::{
        IamAccessKeySpec, IamAccessKeyStatus, KeyPhase, KeyStatus, LastUsed, OWNER_TAG, OwnedKey, PendingCreate,
        RotationRecord,
    },
    keys::{IamKey, KeyLastUsed},
    policy::Limits,
};

/// Upper bound of steps in one reconcile (a fresh resource needs about eight); then the
/// reconcile ends and a fresh one continues.
pub const STEP_BUDGET: usize = 24;

/// IAM reports sub-second dates; status holds whole seconds (as the API server serializes
/// them), and only a reading in status' precision compares equal to what status holds.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// Record `key`, just published, as the current key in `status`; the previous current key
/// starts draining. `requested_at`: the rotate-requested-at annotation this rotation answers.
pub fn install_current(
    status: &mut IamAccessKeyStatus,
    spec: &IamAccessKeySpec,
    requested_at: Option<String>,
    key: IamKey,
    now: Timestamp,
) {
    let rotation = spec.rotation.clone().unwrap_or_default();
    let deactivate_at = after(now, rotation.grace_period.as_signed());
    for k in status.keys.iter_mut().filter(|k| k.phase == KeyPhase::Current) {
        k.phase = KeyPhase::Draining;
        k.replaced_at = Some(Time(now));
        k.deactivate_at = Some(Time(deactivate_at));
    }
    status.keys.push(OwnedKey::new(key.access_key_id, KeyPhase::Current, Time(key.create_date)));
    status.key_status = Some(key.status);
    status.pending_create = None;
    status.rotation = Some(RotationRecord {
        serial: rotation.serial,
        requested_at,
        last_rotated_at: Some(Time(now)),
        last_reason: status.rotation.as_ref().and_then(|r| r.last_reason.clone()),
    });
}

/// `CreateKey`: the new key, published, is current, and status says why it was issued.
pub fn record_created(
    status: &mut IamAccessKeyStatus,
    spec: &IamAccessKeySpec,
    requested_at: Option<String>,
    key: IamKey,
    reason: NewKeyReason,
    now: Timestamp,
) {
    install_current(status, spec, requested_at, key, now);
    if let Some(r) = status.rotation.as_mut() {
        r.last_reason = Some(reason.as_str().into());
    }
}

/// `AdoptKey`: a key made outside the operator, now published and tagged, is current. Its
/// consumers hold it already: the restart targets are not rolled out for it.
pub fn record_adopted(
    status: &mut IamAccessKeyStatus,
    spec: &IamAccessKeySpec,
    requested_at: Option<String>,
    key: IamKey,
    now: Timestamp,
) {
    let id = key.access_key_id.clone();
    install_current(status, spec, requested_at, key, now);
    if let Some(r) = status.rotation.as_mut() {
        r.last_reason = Some(ADOPTED.into());
    }
    status.restarted_for = Some(id);
}

/// `status.rotation.lastReason` of an adopted key.
pub const ADOPTED: &str = "Adopted";

/// `ForgetKey`, `DisownKey`, `ReleaseKey`, `MakeRoom`, `DeleteRetired`: status stops tracking the key.
pub fn forget_key(status: &mut IamAccessKeyStatus, access_key_id: &str) {
    status.keys.retain(|k| k.access_key_id != access_key_id);
}

/// `StartCreate`: a create starts now, with these keys already on the user.
pub fn start_create(status: &mut IamAccessKeyStatus, existing_key_ids: Vec<String>, now: Timestamp) {
    status.pending_create = Some(PendingCreate { since: Time(now), existing_key_ids });
}

/// `ClearPending`.
pub fn clear_pending(status: &mut IamAccessKeyStatus) {
    status.pending_create = None;
}

/// Before `CreateAccessKey`: a create recorded too long ago (by the real clock `now`) is renewed,
/// so that the key it may leave untagged falls inside its window. Whether status changed.
pub fn renew_pending_create(status: &mut IamAccessKeyStatus, now: Timestamp) -> bool {
    match status.pending_create.as_mut() {
        Some(pending) if !super::create_window_open(pending.since.0, now) => {
            pending.since = Time(now);
            true
        }
        _ => false,
    }
}

/// `SetKeyStatus`, `DeactivateUnused`: the current key's status as the operator set it.
pub fn record_key_status(status: &mut IamAccessKeyStatus, key_status: KeyStatus) {
    status.key_status = Some(key_status);
}

/// `RetireKey`: the draining key is Inactive; its rollback window starts now, when it really
/// went Inactive.
pub fn retire_key(status: &mut IamAccessKeyStatus, spec: &IamAccessKeySpec, access_key_id: &str, now: Timestamp) {
    let retain = spec.rotation.clone().unwrap_or_default().retain_inactive.as_signed();
    let delete_at = after(now, retain);
    for k in status.keys.iter_mut().filter(|k| k.access_key_id == access_key_id) {
        k.phase = KeyPhase::Inactive;
        k.delete_at = Some(Time(delete_at));
    }
}

/// `CheckKeyUsage`: a draining key's last use (`waitForUnused`), read at `now`.
pub fn record_usage_check(
    status: &mut IamAccessKeyStatus,
    access_key_id: &str,
    used: Option<Timestamp>,
    now: Timestamp,
) {
    for k in status.keys.iter_mut().filter(|k| k.access_key_id == access_key_id) {
        k.last_used_at = used.map(whole_seconds).map(Time);
        k.usage_checked_at = Some(Time(now));
    }
}

/// `RestartTargets`: the workloads were rolled out for this key.
pub fn record_restart(status: &mut IamAccessKeyStatus, access_key_id: String) {
    status.restarted_for = Some(access_key_id);
}

/// `RefreshLastUsed`: the current key's last use, read at `now`. Only a change is recorded
/// (reading last use must not make status churn); whether status changed.
pub fn record_last_use(
    status: &mut IamAccessKeyStatus,
    access_key_id: String,
    reading: KeyLastUsed,
    now: Timestamp,
) -> bool {
    let record = LastUsed {
        date: reading.date.map(whole_seconds).map(Time),
        service_name: reading.service_name,
        region: reading.region,
        checked_at: Time(now),
        access_key_id,
    };
    let changed = status
        .last_used
        .as_ref()
        .is_none_or(|old| LastUsed { checked_at: old.checked_at.clone(), ..record.clone() } != *old);
    if changed {
        status.last_used = Some(record);
    }
    changed
}

/// Refresh the summary fields (current key, next rotation, foreign keys) from the ledger and
/// IAM. Without a look at IAM (the user missing or not listed) the summary keeps what it said.
pub fn derive_summary(
    status: &mut IamAccessKeyStatus,
    spec: &IamAccessKeySpec,
    generation: Option<i64>,
    user: &UserObservation,
    secret_name: &str,
    limits: &Limits,
) {
    let UserObservation::Found { keys: iam_keys, .. } = user else { return };
    let current = status.keys.iter().find(|k| k.phase == KeyPhase::Current).cloned();
    status.access_key_id = current.as_ref().map(|k| k.access_key_id.clone());
    status.create_date = current.as_ref().map(|k| k.create_date.clone());
    status.key_status =
        current.as_ref().and_then(|c| iam_keys.iter().find(|k| k.access_key_id == c.access_key_id)).map(|k| k.status);
    status.next_rotation_at = current.as_ref().and_then(|c| rotation_due_at(spec, limits, c)).map(Time);
    status.secret_name = current.as_ref().map(|_| secret_name.to_owned());
    let tracked = |id: &str| status.keys.iter().any(|k| k.access_key_id == id);
    status.foreign_keys = iam_keys.iter().filter(|k| !tracked(&k.access_key_id)).count() as u32;
    status.observed_generation = generation;
}

/// When the current key's last use is read next. Kept in memory, not in status, so that reading
/// last use writes status only when the reading changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastUseSchedule {
    /// From then on, any reconcile takes the read along.
    pub eligible: Timestamp,
    /// When a reconcile comes for the read if none came since `eligible` (a little later, so
    /// that the resync, due as late or later, usually does it).
    pub due: Timestamp,
    /// `None`: not read since this process started.
    pub read_at: Option<Timestamp>,
}

impl LastUseSchedule {
    /// First sight of a resource since the process started: the read is spread over one
    /// `refresh` (`spread`, drawn by the caller from `[0, 1)`) instead of reading every key at
    /// once after a restart (a decision on disuse reads first regardless).
    pub fn first_sight(now: Timestamp, refresh: SignedDuration, spread: f64) -> Self {
        let due = after(now, scaled(refresh, spread));
        LastUseSchedule { eligible: due, due, read_at: None }
    }

    /// The next read after one at `now` (`read_at: Some(now)`), or after a create (`None`: a
    /// key created just now has no use to read yet, its verification is the only one). Any
    /// reconcile from one `refresh` on takes it along; it is due up to 10% later (`lateness`,
    /// drawn by the caller from `[0, 1)`), so periodic reads spread out but never run more often
    /// than once a period.
    pub fn next(now: Timestamp, refresh: SignedDuration, lateness: f64, read_at: Option<Timestamp>) -> Self {
        LastUseSchedule {
            eligible: after(now, refresh),
            due: after(now, scaled(refresh, 1.0 + lateness / 10.0)),
            read_at,
        }
    }

    /// What the planner is shown as `Observation::last_used_due` at `now`.
    pub fn due_at(&self, now: Timestamp) -> Timestamp {
        if now >= self.eligible { now } else { self.due }
    }
}

fn scaled(d: SignedDuration, factor: f64) -> SignedDuration {
    SignedDuration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(SignedDuration::MAX)
}

/// The executor's view of the user follows its own writes, so the next step is planned on what
/// IAM now holds without listing the keys again.
impl UserObservation {
    fn keys_mut(&mut self) -> Option<&mut Vec<IamKey>> {
        match self {
            UserObservation::Found { keys, .. } => Some(keys),
            UserObservation::Missing => None,
        }
    }

    fn tags_mut(&mut self) -> Option<&mut BTreeMap<String, String>> {
        match self {
            UserObservation::Found { tags, .. } => tags.as_mut(),
            UserObservation::Missing => None,
        }
    }

    /// `ReadUser`: the user's tags as just read.
    pub fn tags_read(&mut self, read: BTreeMap<String, String>) {
        if let UserObservation::Found { tags, .. } = self {
            *tags = Some(read);
        }
    }

    /// What a new key's `TagUser` writes: the key's tag, and the claim when the tags were read
    /// and lack it (a first key: the claim costs no call of its own).
    pub fn new_key_tags(&self, owner: &Owner, access_key_id: &str) -> Vec<(String, String)> {
        let mut tags = vec![(access_key_id.to_owned(), owner.key_tag_value())];
        if let UserObservation::Found { tags: Some(read), .. } = self
            && read.get(OWNER_TAG) != Some(&owner.0)
        {
            tags.push((OWNER_TAG.to_owned(), owner.0.clone()));
        }
        tags
    }

    /// Tags written to the user (`ClaimUser`, `TakeOverTags`, a new key's tags).
    pub fn tagged(&mut self, written: impl IntoIterator<Item = (String, String)>) {
        if let Some(tags) = self.tags_mut() {
            tags.extend(written);
        }
    }

    /// Tags removed from the user (`UntagStale`, the tag of a deleted key).
    pub fn untagged(&mut self, tag_keys: &[String]) {
        if let Some(tags) = self.tags_mut() {
            tags.retain(|k, _| !tag_keys.contains(k));
        }
    }

    /// A key created, and its `new_key_tags` written.
    pub fn key_created(&mut self, key: IamKey, tags: Vec<(String, String)>) {
        if let Some(keys) = self.keys_mut() {
            keys.push(key);
        }
        self.tagged(tags);
    }

    /// A key deleted (its tag, if any, stays until it is untagged).
    pub fn key_deleted(&mut self, access_key_id: &str) {
        if let Some(keys) = self.keys_mut() {
            keys.retain(|k| k.access_key_id != access_key_id);
        }
    }

    /// A key's status set in IAM.
    pub fn key_status_set(&mut self, access_key_id: &str, status: KeyStatus) {
        if let Some(keys) = self.keys_mut() {
            keys.iter_mut().filter(|k| k.access_key_id == access_key_id).for_each(|k| k.status = status);
        }
    }
}
