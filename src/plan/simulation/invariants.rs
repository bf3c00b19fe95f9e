//! The invariants of random histories: safety after every step and event, liveness once the
//! world is quiet (the list is in `mod.rs`).

use std::collections::BTreeSet;

use jiff::Timestamp;

use super::{
    SETTLE_FOR, STEPS_TO_DONE,
    executor::{Outcome, Run},
    world::{History, Sim, Writer, current_of, secs},
};
use crate::{
    crd::{KeyPhase, KeyStatus, OwnedKey},
    plan::{Blocked, Ledger, MAX_KEYS_PER_USER, SecretObservation, Step, UserObservation, after, rotation_due_at},
};

impl Sim {
    /// What the planner asks for, judged against what it was shown and against the world's
    /// truth (which keys a person made, which tags a person wrote). Every kind of step has its
    /// rule.
    pub fn check_plan(&mut self, run: &Run, ledger: &Ledger, step: &Step) {
        let (view, view_tags) = match &run.user {
            UserObservation::Found { keys, tags } => (keys.as_slice(), tags.as_ref()),
            UserObservation::Missing => (&[][..], None),
        };
        let view_ids: Vec<String> = view.iter().map(|k| k.access_key_id.clone()).collect();
        let current = ledger.keys.iter().find(|k| k.phase == KeyPhase::Current).map(|k| k.access_key_id.clone());
        let is_current = |id: &str| current.as_deref() == Some(id);
        let owned = |id: &str| ledger.keys.iter().find(|k| k.access_key_id == id).cloned();
        let rotation = run.spec.rotation.clone().unwrap_or_default();
        let secret_key = match &run.secret {
            SecretObservation::Ours { access_key_id } => access_key_id.clone(),
            _ => None,
        };
        let ours = self.owner.key_tag_value();
        let mut broken: Vec<&str> = vec![];
        let mut require = |holds: bool, invariant: &'static str| {
            if !holds {
                broken.push(invariant);
            }
        };
        // A key the step deletes or retires: never a person's, never the current or published one.
        let foreign = |id: &str| self.foreign.contains_key(id);
        let current_or_published = |id: &str| is_current(id) || secret_key.as_deref() == Some(id);
        match step {
            Step::ReadUser => require(view_tags.is_none(), "reads_the_user_only_when_its_tags_are_unknown"),
            Step::Blocked(Blocked::KeyLimitExceeded { blocking }) => {
                require(view.len() >= MAX_KEYS_PER_USER && *blocking == view_ids, "key_limit_names_the_keys_it_saw")
            }
            Step::Blocked(Blocked::KeyUnused { access_key_id, .. }) => {
                require(is_current(access_key_id), "key_unused_only_for_the_current_key")
            }
            Step::Blocked(
                Blocked::Paused
                | Blocked::UserNotFound
                | Blocked::UserClaimed { .. }
                | Blocked::SecretConflict
                | Blocked::AdoptionRefused(_)
                | Blocked::MergeNotAllowed { .. }
                | Blocked::SecretNotFound,
            ) => require(false, "blocked_only_for_a_reason_the_world_has"),
            Step::ReleaseKey { access_key_id: id } => {
                let claim = view_tags.and_then(|t| t.get(crate::crd::OWNER_TAG));
                require(claim.is_some_and(|c| *c != self.owner.0), "releases_keys_only_on_a_lost_claim");
                require(view_tags.and_then(|t| t.get(id)) == Some(&ours), "releases_only_keys_tagged_as_ours");
            }
            Step::ClaimUser => require(
                view_tags.is_some_and(|t| !t.contains_key(crate::crd::OWNER_TAG)),
                "claims_only_an_unclaimed_user",
            ),
            Step::TakeOverTags { .. } => require(false, "takes_over_tags_only_under_a_previous_name"),
            Step::AdoptKey => require(false, "adopts_only_what_spec_adopt_names"),
            Step::DeleteOrphan { access_key_id: id, tagged } => {
                require(!foreign(id), "never_touches_foreign_keys");
                require(!current_or_published(id), "never_deletes_the_current_key");
                require(self.created_by_operator.contains(id) && owned(id).is_none(), "deletes_only_untracked_remains");
                require(*tagged == (self.tags.get(id) == Some(&ours)), "untags_an_orphan_only_when_tagged");
            }
            Step::AdoptSecretKey { key } => {
                let id = key.access_key_id.as_str();
                require(
                    !self.foreign.contains_key(id) && self.created_by_operator.contains(id),
                    "never_touches_foreign_keys",
                );
                require(secret_key.as_deref() == Some(id), "adopts_only_the_key_in_the_secret");
            }
            Step::UntagStale { tag_keys } => require(
                tag_keys.iter().all(|k| self.tags.get(k) == Some(&ours) && self.iam_key(k).is_none()),
                "untags_only_our_tags_of_gone_keys",
            ),
            Step::ForgetKey { access_key_id: id, .. } => {
                require(owned(id).is_some() && self.iam_key(id).is_none(), "forgets_only_keys_gone_from_iam")
            }
            Step::DisownKey { access_key_id: id } => {
                let not_ours = foreign(id) || !self.created_by_operator.contains(id);
                require(owned(id).is_some() && not_ours, "disowns_only_keys_that_are_not_ours")
            }
            Step::MakeRoom { access_key_id: id } => {
                require(!foreign(id), "never_touches_foreign_keys");
                require(!current_or_published(id), "never_deletes_the_current_key");
                require(owned(id).is_some_and(|k| k.phase == KeyPhase::Inactive), "makes_room_only_with_a_retired_key");
            }
            Step::StartCreate { existing_key_ids } => {
                require(view.len() < MAX_KEYS_PER_USER, "creates_only_with_a_free_slot");
                require(*existing_key_ids == view_ids, "a_create_records_the_keys_it_saw");
            }
            Step::ClearPending => require(ledger.pending_create.is_some(), "clears_only_a_pending_create"),
            Step::CreateKey { .. } => {
                require(view.len() < MAX_KEYS_PER_USER, "creates_only_with_a_free_slot");
                require(ledger.pending_create.as_ref() == Some(&view_ids), "creates_only_after_recording_it");
            }
            Step::DeactivateUnused { access_key_id: id, .. } => {
                require(
                    is_current(id) && !self.foreign.contains_key(id),
                    "status_follows_spec_only_for_the_current_key",
                );
                // IAM's truth, not the operator's last reading of it.
                let limit = self.limits.deactivate_unused_after.map(|d| d.as_signed());
                let last = self.iam_key(id).map(|k| k.last_used.unwrap_or(k.create_date));
                // A use in the very second of the operator's reading cannot be seen by it (nor is
                // it by IAM, whose last-use data lags); any earlier use must have been seen.
                let read_at = self.last_used_read_at();
                let seen_by_the_reading = |t: Timestamp| read_at.is_none_or(|read| t < read);
                let used = match (limit, last) {
                    (Some(limit), Some(last)) => after(last, limit) > run.now && seen_by_the_reading(last),
                    _ => false,
                };
                require(limit.is_some() && !used, "deactivates_only_unused_keys");
            }
            Step::SetKeyStatus { access_key_id: id, status, .. } => {
                require(
                    is_current(id) && !self.foreign.contains_key(id),
                    "status_follows_spec_only_for_the_current_key",
                );
                require(*status == run.spec.key_status, "status_follows_spec");
            }
            Step::RewriteSecret { .. } => require(false, "rewrites_the_secret_only_when_its_layout_changed"),
            Step::RestartTargets { access_key_id: id } => require(
                is_current(id) && !run.spec.restart_targets.is_empty(),
                "restarts_only_for_the_current_key_and_only_with_targets",
            ),
            Step::CheckKeyUsage { access_key_id: id } => require(
                rotation.wait_for_unused && owned(id).is_some_and(|k| k.phase == KeyPhase::Draining),
                "checks_usage_only_of_a_draining_key_when_asked",
            ),
            Step::RetireKey { access_key_id: id, still_in_use, .. } => {
                require(!foreign(id), "never_touches_foreign_keys");
                require(!current_or_published(id), "never_deletes_the_current_key");
                let k = owned(id);
                require(k.as_ref().is_some_and(|k| k.phase == KeyPhase::Draining), "retires_only_draining_keys");
                let grace_end = k.as_ref().and_then(|k| k.deactivate_at.as_ref()).map(|t| t.0);
                require(grace_end.is_none_or(|t| t <= run.now), "grace_period_respected");
                let gave_up_at =
                    k.as_ref().and_then(|k| k.replaced_at.as_ref()).map(|t| after(t.0, rotation.max_wait.as_signed()));
                require(
                    !still_in_use || gave_up_at.is_some_and(|t| t <= run.now),
                    "retired_in_use_only_after_max_wait",
                );
            }
            Step::DeleteRetired { access_key_id: id } => {
                require(!foreign(id), "never_touches_foreign_keys");
                require(!current_or_published(id), "never_deletes_the_current_key");
                let k = owned(id);
                let window_over = k.as_ref().is_some_and(|k| {
                    k.phase == KeyPhase::Inactive && k.delete_at.as_ref().is_none_or(|t| t.0 <= run.now)
                });
                require(window_over, "rollback_window_respected");
            }
            Step::RefreshLastUsed { access_key_id: id } => require(is_current(id), "reads_last_use_of_the_current_key"),
            Step::Done { wake_at } => require(wake_at.is_none_or(|t| t > run.now), "wakes_in_the_future"),
        }
        for invariant in broken {
            let detail = format!("{step:?}; shown keys {view_ids:?}, status keys {:?}", ledger.keys);
            self.violation(invariant, detail);
        }
    }

    /// The state of the world, after every step and every event.
    pub fn check_world(&mut self) {
        if self.keys.len() > MAX_KEYS_PER_USER {
            self.violation("at_most_two_keys", format!("{:?}", self.keys));
        }
        let foreign: Vec<(String, KeyStatus)> = self.foreign.iter().map(|(k, s)| (k.clone(), *s)).collect();
        for (id, status) in foreign {
            let now = self.iam_key(&id).map(|k| k.status);
            if now != Some(status) {
                self.violation("foreign_keys_keep_their_status", format!("{id}: {status:?} -> {now:?}"));
            }
        }
        // The key in the Secret works from the moment it is published until it is replaced,
        // unless a person deactivated or deleted it, or spec.keyStatus made it Inactive.
        if let Some(id) = self.secret_key().map(str::to_owned) {
            match self.iam_key(&id).map(|k| k.status) {
                None if self.deleted_by_person.contains(&id) => {}
                None => self.violation("published_key_works", format!("{id} is in the Secret but not in IAM")),
                Some(KeyStatus::Inactive) => match self.last_writer.get(&id) {
                    Some(Writer::Person | Writer::OperatorForSpec | Writer::OperatorForPolicy) => {}
                    w => self.violation("published_key_works", format!("{id} is in the Secret, Inactive by {w:?}")),
                },
                Some(KeyStatus::Active) => {}
            }
        }
        // Tags the operator did not write stay as they are.
        let person_tags: Vec<(String, String)> = self.person_tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in person_tags {
            if self.tags.get(&key) != Some(&value) {
                let now = self.tags.get(&key).cloned();
                self.violation("leaves_unknown_tags_alone", format!("{key}: {value:?} -> {now:?}"));
            }
        }
    }

    // Liveness

    /// Leave the world alone and let time pass: the resource must converge and stay converged.
    pub fn settle(&mut self) -> Result<(), String> {
        self.log(format!("t+{}s settle: no more disturbances", self.elapsed()));
        self.failpoint = None;
        self.verify_fails = false;
        // The reconcile running at the end of the history ends as it may (e.g. a conflict).
        if self.run.is_some() {
            self.reconcile();
        }
        let start = self.now;
        let end = start + secs(SETTLE_FOR);
        let mut steps = 0;
        let mut done_once = false;
        for _ in 0..500 {
            // A well-behaved client follows the Secret.
            self.client_key = self.secret_key().map(str::to_owned);
            self.client_uses_its_key();
            let outcome = self.step();
            if !self.violations.is_empty() {
                return Ok(());
            }
            steps += 1;
            match outcome {
                Outcome::Continue | Outcome::StepLimit => {
                    if !done_once && steps > STEPS_TO_DONE {
                        return Err(format!("no Done within {STEPS_TO_DONE} steps of a quiet world"));
                    }
                }
                Outcome::Done(wake_at) => {
                    if !done_once {
                        self.coverage.max_steps_to_done = self.coverage.max_steps_to_done.max(steps);
                        done_once = true;
                    }
                    self.check_converged(wake_at)?;
                    if self.now >= end {
                        return self.check_settled(start);
                    }
                    let wake = wake_at.ok_or("Done without a wake-up time, yet a key is current")?;
                    self.now = wake.min(end);
                    self.log(format!("t+{}s wake", self.elapsed()));
                }
                Outcome::Blocked(Blocked::KeyLimitExceeded { blocking }) => return self.check_key_limit(&blocking),
                Outcome::Blocked(Blocked::KeyUnused { access_key_id, .. }) => {
                    // The current key is Inactive (by the policy, or by a person — then the
                    // policy does not revert it) and IAM shows no use for deactivateUnusedAfter:
                    // a person must rotate.
                    // A use in the very second of the operator's last reading is not seen by it
                    // (as in `deactivates_only_unused_keys`); after a restart, the reading is the
                    // one status records.
                    let limit = self.limits.deactivate_unused_after.map(|d| d.as_signed());
                    let recorded = self.status.last_used.as_ref().filter(|u| u.access_key_id == access_key_id);
                    let read_at = self.last_used_read_at().max(recorded.map(|u| u.checked_at.0));
                    let seen_by_the_reading = |t: Timestamp| read_at.is_none_or(|read| t < read);
                    let unused = self.iam_key(&access_key_id).is_some_and(|k| {
                        let last = k.last_used.unwrap_or(k.create_date);
                        k.status == KeyStatus::Inactive
                            && limit.is_some_and(|l| after(last, l) <= self.now || !seen_by_the_reading(last))
                    });
                    if !unused || current_of(&self.status).is_none_or(|c| c.access_key_id != access_key_id) {
                        return Err(format!("key_unused_only_for_an_unused_inactive_current_key: {access_key_id}"));
                    }
                    self.coverage.legit_key_unused += 1;
                    return Ok(());
                }
                Outcome::Blocked(b) => return Err(format!("blocked in a quiet world: {b:?}")),
                Outcome::Failed(e) => return Err(format!("failed in a quiet world: {e}")),
                Outcome::Crashed => unreachable!("failpoints are disarmed"),
            }
        }
        Err("did not settle within 500 steps".into())
    }

    /// At every `Done` of a quiet world.
    pub fn check_converged(&mut self, wake_at: Option<Timestamp>) -> Result<(), String> {
        let status = &self.status;
        let spec = self.spec();
        let rotation = spec.rotation.clone().unwrap_or_default();
        // When a replaced key must retire (Draining) or be deleted (Inactive).
        let due = |k: &OwnedKey| match k.phase {
            KeyPhase::Draining => {
                let grace_end = k.deactivate_at.as_ref().map(|t| t.0);
                let give_up = k.replaced_at.as_ref().map(|t| after(t.0, rotation.max_wait.as_signed()));
                if rotation.wait_for_unused { grace_end.max(give_up) } else { grace_end }
            }
            _ => k.delete_at.as_ref().map(|t| t.0),
        };
        let currents: Vec<&OwnedKey> = status.keys.iter().filter(|k| k.phase == KeyPhase::Current).collect();
        let current = match currents[..] {
            [] => None,
            [current] => Some(current),
            _ => return Err(format!("at_most_one_current_key: {:?}", status.keys)),
        };
        let published = current.is_some_and(|c| self.secret_key() == Some(c.access_key_id.as_str()));
        if !published {
            // The Secret or the current key was lost and the new key waits for the slot a
            // draining key frees when it retires — and the operator wakes up by then. While it
            // waits, a lost current key is not looked after (drift on it is not reverted).
            let slot_frees_at = status
                .keys
                .iter()
                .filter(|k| k.phase == KeyPhase::Draining && self.keys.len() >= MAX_KEYS_PER_USER)
                .find_map(|k| due(k).filter(|t| *t > self.now));
            if slot_frees_at.is_none() || wake_at > slot_frees_at {
                return Err(format!(
                    "current_key_is_published: keys {:?}, Secret {:?}, wake {wake_at:?}",
                    status.keys, self.secret
                ));
            }
        }
        if let Some(current) = current.filter(|_| published) {
            let id = current.access_key_id.as_str();
            match self.iam_key(id) {
                Some(k) if k.status == spec.key_status => {}
                k => return Err(format!("current_key_works: {id} is {k:?} in IAM, spec says {:?}", spec.key_status)),
            }
            if status.pending_create.is_some() {
                return Err(format!("no_pending_create: {:?}", status.pending_create));
            }
        }
        // Exactly the keys status names (plus the foreign ones): no leaked key, no ghost.
        let in_iam: BTreeSet<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        let named: BTreeSet<&str> = status
            .keys
            .iter()
            .map(|k| k.access_key_id.as_str())
            .chain(self.foreign.keys().map(String::as_str))
            .collect();
        if in_iam != named {
            return Err(format!("exactly_the_keys_status_names: IAM {in_iam:?}, status + foreign {named:?}"));
        }
        let Some(wake) = wake_at else { return Err("Done without a wake-up time".into()) };
        if wake <= self.now {
            return Err(format!("wakes_in_the_future: Done with wake_at {wake} at {}", self.now));
        }
        // Nothing overdue: each replaced key is still inside its grace or rollback window.
        for k in status.keys.iter().filter(|k| k.phase != KeyPhase::Current) {
            if due(k).is_none_or(|due| due <= self.now) {
                return Err(format!("retirements_on_time: {k:?} is overdue at {}", self.now));
            }
        }
        if let Some(due) = current.and_then(|c| rotation_due_at(&spec, &self.limits, c))
            && due <= self.now
            && !status.keys.iter().any(|k| k.phase == KeyPhase::Draining)
        {
            return Err(format!("scheduled_rotation_happens: due at {due}, now {}", self.now));
        }
        Ok(())
    }

    /// After two quiet days: every rotation asked for happened and finished.
    pub fn check_settled(&mut self, start: Timestamp) -> Result<(), String> {
        let status = &self.status;
        let record = status.rotation.clone().unwrap_or_default();
        if self.serial > record.serial {
            return Err(format!("serial_bump_rotates: spec serial {}, rotated {}", self.serial, record.serial));
        }
        if self.requested_at.is_some() && self.requested_at != record.requested_at {
            return Err(format!("requested_rotation_happens: {:?} vs {:?}", self.requested_at, record.requested_at));
        }
        for k in &status.keys {
            if k.phase == KeyPhase::Current
                && let Some(why) = self.must_be_replaced.get(&k.access_key_id)
            {
                return Err(format!(
                    "requested_rotation_replaces_the_key: {} is still current ({why:?})",
                    k.access_key_id
                ));
            }
            if k.phase != KeyPhase::Current && k.replaced_at.as_ref().is_none_or(|t| t.0 < start) {
                return Err(format!("every_rotation_finishes: {k:?} replaced before the quiet period is still here"));
            }
        }
        self.coverage.rotations_settled += 1;
        Ok(())
    }

    /// `KeyLimitExceeded` is fine only when keys we may not remove fill both slots.
    pub fn check_key_limit(&mut self, blocking: &[String]) -> Result<(), String> {
        let current = current_of(&self.status).map(|k| k.access_key_id.clone());
        let removable_or_ours: Vec<&String> =
            blocking.iter().filter(|id| !self.foreign.contains_key(*id) && Some(*id) != current.as_ref()).collect();
        if !removable_or_ours.is_empty() || !blocking.iter().any(|id| self.foreign.contains_key(id)) {
            return Err(format!(
                "key_limit_only_when_foreign_keys_fill_the_slots: blocked by {blocking:?} (ours, not current: \
                 {removable_or_ours:?}); status keys {:?}",
                self.status.keys
            ));
        }
        self.coverage.legit_key_limit += 1;
        Ok(())
    }

    pub fn report(&self, h: &History) -> String {
        let skip = self.trace.len().saturating_sub(150);
        format!(
            "{}\nspec at start: keyStatus {:?}, rotation {:?}, restartTargets {}\ntrace (last {} lines):\n{}",
            self.violations.join("\n"),
            h.key_status,
            h.rotation,
            h.restart_targets,
            self.trace.len() - skip,
            self.trace[skip..].join("\n")
        )
    }
}
