//! The operator in the simulated world: observe, plan, execute, as `controller/apply.rs` does,
//! with the same I/O order, the same crash points and the same conditional status writes. What a
//! step does to status and to the observation is `plan::record`'s, exactly as in the controller;
//! only the calls to IAM and the API server are the in-memory world's.

use jiff::{SignedDuration, Timestamp};
use rand::Rng;

use super::{
    LAST_USED_REFRESH,
    world::{Failpoint, Sim, Writer, current_of},
};
use crate::{
    crd::{IamAccessKeySpec, IamAccessKeyStatus, KEY_TAG_PREFIX, KeyStatus, OWNER_TAG},
    keys::{IamKey, KeyLastUsed},
    plan::{
        Blocked, Ledger, NewKeyReason, Observation, SecretLayout, SecretObservation, Step, UserObservation,
        plan_next_step,
        record::{self, LastUseSchedule, STEP_BUDGET},
    },
};

/// A reconcile in progress: what `Run` in controller/apply.rs holds in memory.
pub struct Run {
    pub now: Timestamp,
    /// The resource as read when the reconcile started.
    pub spec: IamAccessKeySpec,
    pub requested_at: Option<String>,
    pub resource_version: u64,
    /// Working copy, and what the API server holds (status is written only on change).
    pub status: IamAccessKeyStatus,
    pub saved: IamAccessKeyStatus,
    pub user: UserObservation,
    pub secret: SecretObservation,
    pub steps: usize,
}

/// How one operator step ended.
pub enum Outcome {
    Continue,
    Done(Option<Timestamp>),
    Blocked(Blocked),
    Failed(String),
    Crashed,
    StepLimit,
}

/// Why a step stopped early.
pub enum Stop {
    Crashed,
    Failed(String),
}

/// The name of a step's kind (`Step`'s variant).
pub fn step_name(step: &Step) -> String {
    let debug = format!("{step:?}");
    debug.split(|c: char| !c.is_alphanumeric()).next().unwrap_or_default().to_owned()
}

impl Sim {
    /// The operator process dies: the running reconcile and everything in memory are gone.
    pub fn crash(&mut self, at: &str) {
        self.log(format!("  CRASH {at}"));
        *self.coverage.crashes.entry(at.to_owned()).or_default() += 1;
        self.run = None;
        self.last_use = None;
    }

    fn observe(&self) -> Run {
        Run {
            now: self.now,
            spec: self.spec(),
            requested_at: self.requested_at.clone(),
            resource_version: self.resource_version,
            status: self.status.clone(),
            saved: self.status.clone(),
            // A policy that depends on the user's path or tags has the user read first.
            user: UserObservation::Found {
                keys: self.list_access_keys(),
                tags: self.policy_reads_user.then(|| self.tags.clone()),
            },
            secret: self.secret.clone(),
            steps: 0,
        }
    }

    /// `Context::last_use_reads`: in memory, lost with a crash; the spread after a restart and
    /// the lateness of the next read are drawn from the history's seeded rng.
    fn last_use_schedule(&mut self, now: Timestamp) -> LastUseSchedule {
        let refresh = SignedDuration::from_secs(LAST_USED_REFRESH);
        match self.last_use {
            Some(schedule) => schedule,
            None => {
                let schedule = LastUseSchedule::first_sight(now, refresh, self.rng.random_range(0.0..1.0));
                self.last_use = Some(schedule);
                schedule
            }
        }
    }

    /// `Context::schedule_last_use_read`, after a read (`Some(now)`) or a create (`None`).
    fn schedule_last_use_read(&mut self, now: Timestamp, read_at: Option<Timestamp>) {
        let refresh = SignedDuration::from_secs(LAST_USED_REFRESH);
        self.last_use = Some(LastUseSchedule::next(now, refresh, self.rng.random_range(0.0..1.0), read_at));
    }

    /// When this process last read the current key's last use.
    pub fn last_used_read_at(&self) -> Option<Timestamp> {
        self.last_use.and_then(|s| s.read_at)
    }

    pub fn reconcile(&mut self) -> Outcome {
        loop {
            match self.step() {
                Outcome::Continue => {}
                other => return other,
            }
        }
    }

    /// Plan one step and execute it, starting a reconcile when none is running.
    pub fn step(&mut self) -> Outcome {
        let mut run = match self.run.take() {
            Some(run) => run,
            None => self.observe(),
        };
        if run.steps == STEP_BUDGET {
            let _ = self.save_status(&mut run);
            return Outcome::StepLimit;
        }
        run.steps += 1;
        let ledger = Ledger::from_status(&run.status);
        let schedule = self.last_use_schedule(run.now);
        let current_last_used = current_of(&run.status).and_then(|c| {
            let used = run.status.last_used.as_ref().filter(|u| u.access_key_id == c.access_key_id)?;
            used.date.as_ref().map(|t| t.0)
        });
        let step = plan_next_step(&Observation {
            now: run.now,
            owner: &self.owner,
            previous_owner: None,
            spec: &run.spec,
            ledger: &ledger,
            rotate_requested_at: run.requested_at.as_deref(),
            user: &run.user,
            secret: &run.secret,
            last_used_due: Some(schedule.due_at(run.now)),
            current_last_used,
            last_used_read_at: schedule.read_at,
            limits: &self.limits,
            secret_layout: SecretLayout::Current,
        });
        self.log(format!("  plan: {step:?}"));
        *self.coverage.steps.entry(step_name(&step)).or_default() += 1;
        self.check_plan(&run, &ledger, &step);
        let outcome = match step {
            Step::Done { wake_at } => {
                // `succeed`: one last (conditional) status write.
                let _ = self.save_status(&mut run);
                Outcome::Done(wake_at)
            }
            Step::Blocked(blocked) => {
                let _ = self.save_status(&mut run);
                Outcome::Blocked(blocked)
            }
            step => {
                self.executed.push((run.now, step.clone()));
                match self.execute(&mut run, step) {
                    Ok(()) => {
                        self.run = Some(run);
                        Outcome::Continue
                    }
                    Err(Stop::Crashed) => Outcome::Crashed,
                    Err(Stop::Failed(e)) => {
                        self.log(format!("  failed: {e}"));
                        *self.coverage.failures.entry(e.clone()).or_default() += 1;
                        let _ = self.save_status(&mut run);
                        Outcome::Failed(e)
                    }
                }
            }
        };
        self.check_world();
        outcome
    }

    /// The process dies here if this failpoint is armed.
    fn failpoint(&mut self, at: Failpoint) -> Result<(), Stop> {
        if self.failpoint == Some(at) {
            self.failpoint = None;
            self.crash(&format!("{at:?}"));
            return Err(Stop::Crashed);
        }
        Ok(())
    }

    /// One step, as `Run::execute` in controller/apply.rs.
    fn execute(&mut self, run: &mut Run, step: Step) -> Result<(), Stop> {
        match step {
            Step::Done { .. } | Step::Blocked(_) => Ok(()),
            Step::ReadUser => {
                run.user.tags_read(self.tags.clone());
                Ok(())
            }
            Step::ClaimUser => {
                let claim = [(OWNER_TAG.to_owned(), self.owner.0.clone())];
                self.tags.extend(claim.clone());
                run.user.tagged(claim);
                Ok(())
            }
            Step::TakeOverTags { tags } => {
                self.tags.extend(tags.iter().cloned());
                run.user.tagged(tags);
                Ok(())
            }
            Step::DeleteOrphan { access_key_id, tagged } => self.delete_key(run, &access_key_id, tagged),
            Step::AdoptSecretKey { key } => {
                record::install_current(&mut run.status, &run.spec, run.requested_at.clone(), key, run.now);
                self.save_status(run)
            }
            Step::UntagStale { tag_keys } => {
                self.tags.retain(|k, _| !tag_keys.contains(k));
                run.user.untagged(&tag_keys);
                Ok(())
            }
            Step::ForgetKey { access_key_id, .. } | Step::DisownKey { access_key_id } => {
                record::forget_key(&mut run.status, &access_key_id);
                self.save_status(run)
            }
            Step::ReleaseKey { access_key_id }
            | Step::MakeRoom { access_key_id }
            | Step::DeleteRetired { access_key_id } => {
                self.delete_key(run, &access_key_id, true)?;
                record::forget_key(&mut run.status, &access_key_id);
                self.save_status(run)
            }
            Step::StartCreate { existing_key_ids } => {
                record::start_create(&mut run.status, existing_key_ids, run.now);
                self.save_status(run)
            }
            Step::ClearPending => {
                record::clear_pending(&mut run.status);
                self.save_status(run)
            }
            Step::CreateKey { reason } => self.create_key(run, reason),
            Step::DeactivateUnused { access_key_id, .. } => {
                self.update_key_status(run, &access_key_id, KeyStatus::Inactive, Writer::OperatorForPolicy)
            }
            Step::SetKeyStatus { access_key_id, status, .. } => {
                self.update_key_status(run, &access_key_id, status, Writer::OperatorForSpec)
            }
            Step::RetireKey { access_key_id, already_inactive, .. } => {
                if !already_inactive {
                    self.update_access_key(run, &access_key_id, KeyStatus::Inactive, Writer::OperatorRetire)?;
                    self.failpoint(Failpoint::MidStep)?;
                }
                record::retire_key(&mut run.status, &run.spec, &access_key_id, run.now);
                self.save_status(run)
            }
            Step::CheckKeyUsage { access_key_id } => {
                let used = self.access_key_last_used(&access_key_id)?;
                record::record_usage_check(&mut run.status, &access_key_id, used.date, run.now);
                self.save_status(run)
            }
            // The Secret's layout (format, labels) is not modelled: the world never asks for it.
            Step::RewriteSecret { .. } => Err(Stop::Failed("RewriteSecret: the layout is not modelled".into())),
            Step::AdoptKey => Err(Stop::Failed("AdoptKey: spec.adopt is not modelled".into())),
            Step::RestartTargets { access_key_id } => {
                // The rollout makes the client read the Secret again.
                if !run.spec.restart_targets.is_empty() {
                    self.client_key = self.secret_key().map(str::to_owned);
                }
                record::record_restart(&mut run.status, access_key_id);
                self.save_status(run)
            }
            Step::RefreshLastUsed { access_key_id } => {
                let used = self.access_key_last_used(&access_key_id)?;
                if record::record_last_use(&mut run.status, access_key_id, used, run.now) {
                    self.save_status(run)?;
                }
                self.schedule_last_use_read(run.now, Some(run.now));
                Ok(())
            }
        }
    }

    /// Create -> tag -> verify -> publish -> record, with apply.rs's failpoints.
    fn create_key(&mut self, run: &mut Run, reason: NewKeyReason) -> Result<(), Stop> {
        // By the world's clock, which may be far ahead of the reconcile's (the world waited
        // while it ran).
        if record::renew_pending_create(&mut run.status, self.now) {
            self.save_status(run)?;
        }
        let key = self.create_access_key().map_err(Stop::Failed)?;
        let id = key.id.clone();
        self.created_by_operator.insert(id.clone());
        self.failpoint(Failpoint::AfterCreateKey)?;
        let tags = run.user.new_key_tags(&self.owner, &id);
        self.tags.extend(tags.clone());
        self.failpoint(Failpoint::AfterTag)?;
        let iam_key = IamKey { access_key_id: id.clone(), status: key.status, create_date: key.create_date };
        run.user.key_created(iam_key.clone(), tags);
        if std::mem::take(&mut self.verify_fails) {
            // Never publish a key that does not work; nobody else has its secret.
            self.delete_key(run, &id, true)?;
            return Err(Stop::Failed("KeyVerificationFailed".into()));
        }
        // Publish: POST when the Secret was missing (fails if it appeared), else a replace.
        match (&run.secret, &self.secret) {
            (SecretObservation::Missing, SecretObservation::Missing) | (SecretObservation::Ours { .. }, _) => {}
            (SecretObservation::Missing, _) => return Err(Stop::Failed("Secret AlreadyExists".into())),
            (SecretObservation::NotOurs, _) => return Err(Stop::Failed("SecretConflict".into())),
            (SecretObservation::Available, _) => return Err(Stop::Failed("creationPolicy is not modelled".into())),
        }
        self.secret = SecretObservation::Ours { access_key_id: Some(id.clone()) };
        self.failpoint(Failpoint::AfterSecret)?;
        run.secret = self.secret.clone();
        record::record_created(&mut run.status, &run.spec, run.requested_at.clone(), iam_key, reason, run.now);
        self.failpoint(Failpoint::BeforeStatus)?;
        // Recorded by the reconcile's last status write; the first last-use read waits a refresh.
        self.schedule_last_use_read(run.now, None);
        Ok(())
    }

    /// `Run::delete_key`: delete (a key already gone is fine), then untag.
    fn delete_key(&mut self, run: &mut Run, id: &str, untag: bool) -> Result<(), Stop> {
        if self.foreign.contains_key(id) {
            self.violation("never_touches_foreign_keys", format!("deleted foreign key {id}"));
        }
        if self.secret_key() == Some(id) {
            self.violation("never_deletes_the_published_key", format!("deleted {id}, the key in the Secret"));
        }
        if current_of(&run.status).is_some_and(|c| c.access_key_id == id) {
            self.violation("never_deletes_the_current_key", format!("deleted {id}, the current key"));
        }
        self.keys.retain(|k| k.id != id);
        self.failpoint(Failpoint::MidStep)?;
        if untag {
            if self.tags.get(id).is_some_and(|v| !v.starts_with(KEY_TAG_PREFIX)) {
                self.violation("never_touches_foreign_keys", format!("removed a person's tag on {id}"));
            }
            self.tags.remove(id);
        }
        run.user.key_deleted(id);
        run.user.untagged(&[id.to_owned()]);
        Ok(())
    }

    /// `SetKeyStatus` and `DeactivateUnused`: IAM, then status.
    fn update_key_status(&mut self, run: &mut Run, id: &str, status: KeyStatus, writer: Writer) -> Result<(), Stop> {
        self.update_access_key(run, id, status, writer)?;
        self.failpoint(Failpoint::MidStep)?;
        record::record_key_status(&mut run.status, status);
        self.save_status(run)
    }

    fn update_access_key(&mut self, run: &mut Run, id: &str, status: KeyStatus, writer: Writer) -> Result<(), Stop> {
        if self.foreign.contains_key(id) {
            self.violation("never_touches_foreign_keys", format!("set foreign key {id} {status:?}"));
        }
        let Some(key) = self.keys.iter_mut().find(|k| k.id == id) else {
            return Err(Stop::Failed("NoSuchEntity".into()));
        };
        key.status = status;
        self.last_writer.insert(id.to_owned(), writer);
        run.user.key_status_set(id, status);
        Ok(())
    }

    fn access_key_last_used(&self, id: &str) -> Result<KeyLastUsed, Stop> {
        let key = self.iam_key(id).ok_or_else(|| Stop::Failed("NoSuchEntity".into()))?;
        Ok(KeyLastUsed { date: key.last_used, service_name: None, region: None })
    }

    /// The summary, then the conditional status write (the resourceVersion must be unchanged).
    pub fn save_status(&mut self, run: &mut Run) -> Result<(), Stop> {
        record::derive_summary(&mut run.status, &run.spec, None, &run.user, "app", &self.limits);
        if run.status == run.saved {
            return Ok(());
        }
        if run.resource_version != self.resource_version {
            return Err(Stop::Failed("Conflict: the resource changed since it was read".into()));
        }
        self.status = run.status.clone();
        self.resource_version += 1;
        run.resource_version = self.resource_version;
        run.saved = run.status.clone();
        Ok(())
    }
}
