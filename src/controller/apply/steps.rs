//! One method per planner `Step`: the calls to IAM and the API server it takes, then its effect
//! on status and on the observation, which `plan::record` defines (the simulation in the
//! property tests records the same way).

use std::time::Duration;

use jiff::Timestamp;
use kube::{Api, ResourceExt, runtime::events::EventType};

use super::Run;
use crate::{
    controller::secret::{build_secret, data_layout_current, held_content, recover_secret, render_secret},
    crd::{ACCESS_KEY_ID_ANNOTATION, KeyStatus, OWNER_TAG, ROTATE_REQUESTED_AT_ANNOTATION},
    error::{Error, KubeContext},
    failpoint,
    iam::NewKey,
    keys::IamKey,
    metrics::ReasonLabels,
    plan::{NewKeyReason, SecretLayout, SecretObservation, record},
};

/// Tries of a new key's tag before the reconcile gives up (and the key with it).
const TAG_ATTEMPTS: u32 = 4;

impl Run<'_> {
    pub(super) async fn read_user(&mut self) -> Result<(), Error> {
        let info = self.iam.get_user(self.user_name()).await?;
        self.ctx.remember_user(self.account.as_ref(), self.user_name(), &info);
        self.user.tags_read(info.tags.clone());
        self.user_info = Some(info);
        Ok(())
    }

    pub(super) async fn claim_user(&mut self) -> Result<(), Error> {
        let user = self.user_name().to_owned();
        if self.owner.key_tag_value().len() > 256 {
            return Err(Error::Invalid(format!(
                "ownership tag value {:?} is longer than IAM's 256 characters: shorten the namespace, name or --cluster-name",
                self.owner.key_tag_value()
            )));
        }
        let claim = [(OWNER_TAG.to_owned(), self.owner.0.clone())];
        self.iam.tag_user(&user, &claim).await?;
        self.user.tagged(claim);
        self.note(EventType::Normal, "UserClaimed", format!("claimed IAM user {user}")).await;
        Ok(())
    }

    pub(super) async fn take_over_tags(&mut self, tags: Vec<(String, String)>) -> Result<(), Error> {
        let user = self.user_name().to_owned();
        self.iam.tag_user(&user, &tags).await?;
        let count = tags.len();
        self.user.tagged(tags);
        let previous = self.ctx.settings.previous_cluster_name.as_deref().unwrap_or_default();
        let note =
            format!("took over {count} tag(s) of IAM user {user} written under the previous cluster name {previous:?}");
        self.note(EventType::Normal, "OwnershipRenamed", note).await;
        Ok(())
    }

    pub(super) async fn delete_orphan(&mut self, access_key_id: &str, tagged: bool) -> Result<(), Error> {
        self.delete_key(access_key_id, tagged).await?;
        let why = "left behind by an interrupted create; its secret was never published";
        self.note(EventType::Normal, "OrphanKeyDeleted", format!("deleted access key {access_key_id}: {why}")).await;
        Ok(())
    }

    pub(super) async fn adopt_secret_key(&mut self, key: IamKey) -> Result<(), Error> {
        let id = key.access_key_id.clone();
        let requested_at = self.requested_at();
        // An adoption interrupted after its tag: the key the Secret holds is the adopted one.
        if crate::plan::adoption_pending(&self.obj.spec, &crate::plan::Ledger::from_status(&self.status)) {
            record::record_adopted(&mut self.status, &self.obj.spec, requested_at, key, self.now);
        } else {
            record::install_current(&mut self.status, &self.obj.spec, requested_at, key, self.now);
        }
        self.save_status().await?;
        let note = format!("recorded access key {id} found in Secret {}", self.secret_name);
        self.note(EventType::Normal, "KeyAdopted", note).await;
        Ok(())
    }

    pub(super) async fn untag_stale(&mut self, tag_keys: &[String]) -> Result<(), Error> {
        self.iam.untag_user(self.user_name(), tag_keys).await?;
        self.user.untagged(tag_keys);
        Ok(())
    }

    pub(super) async fn forget_key(&mut self, access_key_id: &str, expected: bool) -> Result<(), Error> {
        record::forget_key(&mut self.status, access_key_id);
        self.save_status().await?;
        if !expected {
            let note = format!("access key {access_key_id} was deleted outside the operator; it is no longer tracked");
            self.note(EventType::Warning, "KeyDeletedOutside", note).await;
        }
        Ok(())
    }

    pub(super) async fn disown_key(&mut self, access_key_id: &str) -> Result<(), Error> {
        record::forget_key(&mut self.status, access_key_id);
        self.save_status().await?;
        let note = format!(
            "status listed access key {access_key_id}, which IAM does not tag as this resource's: it is no longer tracked and is left untouched"
        );
        self.note(EventType::Warning, "KeyNotOwned", note).await;
        Ok(())
    }

    pub(super) async fn release_key(&mut self, access_key_id: &str) -> Result<(), Error> {
        let note = format!(
            "IAM user {} is claimed by another IamAccessKey (both claimed it at once): deleted access key {access_key_id}, which this resource had created on it",
            self.user_name()
        );
        self.delete_tracked_key(access_key_id, (EventType::Warning, "KeyReleased", note)).await
    }

    pub(super) async fn make_room(&mut self, access_key_id: &str) -> Result<(), Error> {
        let note = format!("deleted retired access key {access_key_id} early to make room for a new key");
        self.delete_tracked_key(access_key_id, (EventType::Normal, "KeyDeleted", note)).await
    }

    /// `ReleaseKey`, `MakeRoom`, `DeleteRetired`: one of our keys is deleted (and untagged) and
    /// no longer tracked; then the event.
    async fn delete_tracked_key(
        &mut self,
        access_key_id: &str,
        (type_, reason, note): (EventType, &str, String),
    ) -> Result<(), Error> {
        self.delete_key(access_key_id, true).await?;
        record::forget_key(&mut self.status, access_key_id);
        self.save_status().await?;
        self.note(type_, reason, note).await;
        Ok(())
    }

    pub(super) async fn start_create(&mut self, existing_key_ids: Vec<String>) -> Result<(), Error> {
        record::start_create(&mut self.status, existing_key_ids, self.now);
        self.save_status().await
    }

    pub(super) async fn clear_pending(&mut self) -> Result<(), Error> {
        record::clear_pending(&mut self.status);
        self.save_status().await
    }

    /// Create -> tag -> verify -> publish -> record. The secret exists only in this function's
    /// memory; a crash anywhere leaves something the planner recognises and cleans up.
    /// The user's ARN: read this reconcile, or recently (a rotation of a converged resource
    /// reads nothing but the key list).
    pub(super) async fn user_arn(&mut self) -> Result<String, Error> {
        let user = self.user_name().to_owned();
        let arn = match (&self.user_info, self.ctx.recent_user(self.account.as_ref(), &user)) {
            (Some(info), _) => info.arn.clone(),
            (None, Some(seen)) => seen.arn,
            (None, None) => {
                let info = self.iam.get_user(&user).await?;
                self.ctx.remember_user(self.account.as_ref(), &user, &info);
                info.arn
            }
        };
        self.note_user_arn(&arn);
        Ok(arn)
    }

    pub(super) async fn create_key(&mut self, reason: NewKeyReason) -> Result<(), Error> {
        let user = self.user_name().to_owned();
        // What the new key must authenticate as, and the template's user_arn and account_id.
        let user_arn = self.user_arn().await?;
        // By the real clock, not the reconcile's: a long reconcile or a late restart renews the
        // record first, so that a key this create leaves untagged falls inside its window.
        if record::renew_pending_create(&mut self.status, record::whole_seconds(Timestamp::now())) {
            self.save_status().await?;
        }
        let NewKey { key, secret } = self.iam.create_access_key(&user).await?;
        let created = std::time::Instant::now();
        let id = key.access_key_id.clone();
        failpoint!("after-create-key");
        let tags = self.user.new_key_tags(&self.owner, &id);
        self.tag_new_key(&user, &tags).await?;
        failpoint!("after-tag");
        self.user.key_created(key.clone(), tags);
        // Rendered once per key. The dry run passed, so this fails only on the key's own
        // values; the key is then of no use.
        let object = match render_secret(self.obj, &id, &secret, &user_arn) {
            Ok(object) => object,
            Err(e) => {
                self.delete_key(&id, true).await?;
                return Err(e);
            }
        };
        if let Err(e) = self.verify(&id, &secret, &user_arn, created).await {
            // The user may have been recreated: read it again next time.
            self.ctx.forget_user(self.account.as_ref(), &user);
            // Never publish a key that does not work; nobody else has its secret.
            self.delete_key(&id, true).await?;
            return Err(e);
        }
        if let Err(e) = self.publish(&id, object).await {
            // A key whose Secret could not be written is a key nobody can use: delete it now.
            // Should that fail too, it is an orphan the next reconcile deletes before anything else.
            if let Err(cleanup) = self.delete_key(&id, true).await {
                tracing::warn!(access_key_id = %id, error = %cleanup, "could not delete the unpublished key yet");
            }
            return Err(e);
        }
        failpoint!("after-secret");
        self.secret = SecretObservation::Ours { access_key_id: Some(id.clone()) };
        let requested_at = self.requested_at();
        record::record_created(&mut self.status, &self.obj.spec, requested_at, key, reason, self.now);
        self.ctx.metrics.resources.rotations.get_or_create(&ReasonLabels { reason: reason.as_str().into() }).inc();
        failpoint!("before-status");
        // Recorded with the Ready condition by the reconcile's last status write, one write
        // instead of two; a crash before it leaves the key in the Secret, which is adopted.
        self.ctx.defer_last_use_read(self.obj, self.now);
        let note =
            format!("created access key {id} ({}) and published it in Secret {}", reason.as_str(), self.secret_name);
        self.note(EventType::Normal, "KeyCreated", note).await;
        Ok(())
    }

    /// The new key's secret is in hand only now: a transient refusal of its tag (throttling,
    /// IAM busy) is retried here, not by the next reconcile, which could only delete the key
    /// and make another. Tagging is idempotent, so a lost answer does no harm either.
    pub(super) async fn tag_new_key(&mut self, user: &str, tags: &[(String, String)]) -> Result<(), Error> {
        let mut wait = Duration::from_millis(250);
        for _ in 0..TAG_ATTEMPTS - 1 {
            match self.iam.tag_user(user, tags).await {
                Err(e) if e.is_retryable() => tracing::debug!(error = %e, "tagging the new key: retrying"),
                done => return Ok(done?),
            }
            self.slot.idle(self.ctx, wait).await;
            wait *= 2;
        }
        Ok(self.iam.tag_user(user, tags).await?)
    }

    pub(super) async fn deactivate_unused(&mut self, access_key_id: &str, since: Timestamp) -> Result<(), Error> {
        self.update_key_status(access_key_id, KeyStatus::Inactive).await?;
        let note = format!(
            "access key {access_key_id} deactivated: unused since {since}, longer than deactivateUnusedAfter of policy {}",
            self.limits.policies.join(", ")
        );
        self.note(EventType::Warning, "DeactivatedUnused", note).await;
        Ok(())
    }

    pub(super) async fn set_key_status(
        &mut self,
        access_key_id: &str,
        status: KeyStatus,
        drift: bool,
    ) -> Result<(), Error> {
        self.update_key_status(access_key_id, status).await?;
        let (kind, reason, note) = if drift {
            let note =
                format!("access key {access_key_id} was changed outside the operator; set back to {}", status.as_str());
            (EventType::Warning, "DriftCorrected", note)
        } else {
            let reason = if status == KeyStatus::Active { "KeyActivated" } else { "KeyDeactivated" };
            (EventType::Normal, reason, format!("access key {access_key_id} set to {}", status.as_str()))
        };
        self.note(kind, reason, note).await;
        Ok(())
    }

    /// The current key's status in IAM, then in status.
    async fn update_key_status(&mut self, access_key_id: &str, status: KeyStatus) -> Result<(), Error> {
        self.iam.update_access_key(self.user_name(), access_key_id, status).await?;
        self.user.key_status_set(access_key_id, status);
        record::record_key_status(&mut self.status, status);
        self.save_status().await
    }

    /// The same key in the layout the spec now asks for: the data kept as it is when only
    /// labels or annotations changed, else rendered again with the secret read back from the
    /// Secret. Where it cannot be (the data holds only values derived from it), only a new key
    /// can take the new layout (`SecretLayout::Unrecoverable`).
    pub(super) async fn rewrite_secret(&mut self, access_key_id: &str) -> Result<(), Error> {
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.ctx.client.clone(), &self.obj.namespace().unwrap_or_default());
        let held = api.get(&self.secret_name).await.context("reading the Secret")?; // the one read of secret data
        let id_held = held.metadata.annotations.as_ref().and_then(|a| a.get(ACCESS_KEY_ID_ANNOTATION));
        if id_held.is_none_or(|id| id != access_key_id) {
            // Not the key status names: treat it as lost, which issues a new one through the grace steps.
            self.secret = SecretObservation::Ours { access_key_id: None };
            return Ok(());
        }
        let object = if data_layout_current(self.obj, &held) {
            build_secret(self.obj, access_key_id, held_content(&held))
        } else if let Some(secret) = recover_secret(&held) {
            let user_arn = self.user_arn().await?;
            render_secret(self.obj, access_key_id, &secret, &user_arn)?
        } else {
            self.secret_layout = SecretLayout::Unrecoverable;
            return Ok(());
        };
        self.publish(access_key_id, object).await?;
        self.secret_layout = SecretLayout::Current;
        // A new key is announced by KeyCreated; this is the same key, new layout.
        let note = format!(
            "rewrote Secret {} with access key {access_key_id} in the layout the spec asks for",
            self.secret_name
        );
        self.note(EventType::Normal, "SecretWritten", note).await;
        Ok(())
    }

    pub(super) async fn restart_targets(&mut self, access_key_id: String) -> Result<(), Error> {
        crate::controller::restart::restart_targets(self.ctx, self.obj, &access_key_id).await?;
        record::record_restart(&mut self.status, access_key_id);
        self.save_status().await
    }

    pub(super) async fn check_key_usage(&mut self, access_key_id: &str) -> Result<(), Error> {
        let used = self.iam.access_key_last_used(access_key_id).await?;
        record::record_usage_check(&mut self.status, access_key_id, used.date, self.now);
        self.save_status().await
    }

    pub(super) async fn retire_key(
        &mut self,
        access_key_id: &str,
        already_inactive: bool,
        still_in_use: bool,
    ) -> Result<(), Error> {
        if !already_inactive {
            self.iam.update_access_key(self.user_name(), access_key_id, KeyStatus::Inactive).await?;
            self.user.key_status_set(access_key_id, KeyStatus::Inactive);
        }
        record::retire_key(&mut self.status, &self.obj.spec, access_key_id, self.now);
        self.save_status().await?;
        if still_in_use {
            let note = format!(
                "previous access key {access_key_id} deactivated although IAM shows it still in use: rotation.maxWait is over"
            );
            self.note(EventType::Warning, "RetiredWhileInUse", note).await;
        } else {
            let note = format!("previous access key {access_key_id} deactivated after its grace period");
            self.note(EventType::Normal, "KeyDeactivated", note).await;
        }
        Ok(())
    }

    pub(super) async fn delete_retired(&mut self, access_key_id: &str) -> Result<(), Error> {
        let note = format!("previous access key {access_key_id} deleted after its rollback window");
        self.delete_tracked_key(access_key_id, (EventType::Normal, "KeyDeleted", note)).await
    }

    pub(super) async fn refresh_last_used(&mut self, access_key_id: String) -> Result<(), Error> {
        let used = self.iam.access_key_last_used(&access_key_id).await?;
        // Recorded before the read counts as fresh: a decision on "unused since" must never
        // rest on a reading that status does not hold.
        if record::record_last_use(&mut self.status, access_key_id, used, self.now) {
            self.save_status().await?;
        }
        self.ctx.record_last_use_read(self.obj, self.now);
        Ok(())
    }

    pub(super) fn requested_at(&self) -> Option<String> {
        self.obj.annotations().get(ROTATE_REQUESTED_AT_ANNOTATION).cloned()
    }
}
