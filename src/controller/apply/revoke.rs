//! The grant a resource holds, recorded in status, and what happens when no rule allows it any
//! more: the recorded rule's `onRevoke` applies to the keys (keep, deactivate, delete), and the
//! resource's condition says that its grant was revoked.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{ResourceExt, runtime::events::EventType};
use tracing::debug;

use super::{Run, observe_secret_meta, observe_user};
use crate::controller::secret::delete_secret;
use crate::{
    crd::{DeletionPolicy, GrantRecord, KeyPhase, KeyStatus, OnRevoke},
    error::Error,
    plan::{CleanupObservation, CleanupStep, Ledger, RevokeStep, SecretObservation, UserObservation, plan_revoke},
    policy::Limits,
};

/// Upper bound of revocation steps in one reconcile.
const MAX_STEPS: usize = 16;

impl Run<'_> {
    /// Record the rule that allows the resource (written with the reconcile's status); a grant
    /// that comes back after a revocation is announced.
    pub(super) async fn record_grant(&mut self, limits: &Limits) {
        let Some(rule) = &limits.granting_rule else { return };
        let record = GrantRecord {
            policy: rule.policy.clone(),
            rule: rule.rule as u32,
            on_revoke: rule.on_revoke,
            revoked_at: None,
        };
        let previous = self.status.grant.replace(record);
        if let Some(GrantRecord { revoked_at: Some(_), on_revoke, .. }) = previous {
            let then = match on_revoke {
                OnRevoke::Keep => "",
                OnRevoke::Deactivate => "; keys deactivated on revocation follow spec.keyStatus again",
                OnRevoke::Delete => "; a new key is issued",
            };
            let note =
                format!("IamAccessKeyPolicy {:?} (rules[{}]) allows this resource again{then}", rule.policy, rule.rule);
            self.note(EventType::Normal, "GrantRestored", note).await;
        }
    }

    /// No rule allows the resource. If it was allowed before, its grant was revoked: record
    /// when, apply the recorded `onRevoke` to its keys, and say so. The returned error is the
    /// reconcile's outcome (`NotAuthorized`, or what stopped the revocation's IAM calls).
    pub(super) async fn revoke(&mut self, denial: String) -> Error {
        let had_keys = !self.status.keys.is_empty() || self.status.pending_create.is_some();
        let Some(grant) = self.status.grant.as_mut().map(|g| {
            g.revoked_at.get_or_insert(Time(self.now));
            g.clone()
        }) else {
            if !had_keys {
                // Never allowed (or allowed before grants were recorded, and no keys since).
                return Error::NotAuthorized(denial);
            }
            let message = format!(
                "the grant of this resource was revoked: {denial}; its access keys stay as they are (no onRevoke recorded: Keep) and keep working; delete the IamAccessKey to delete them"
            );
            return Error::NotAuthorized(message);
        };
        let revoked =
            format!("the grant of IamAccessKeyPolicy {:?} (rules[{}]) was revoked: {denial}", grant.policy, grant.rule);
        // Once done (or with no key ever made), nothing is left to act on: no IAM call.
        if had_keys && let Err(e) = self.apply_on_revoke(grant.on_revoke).await {
            return e;
        }
        // The same message on every reconcile while revoked: one event, not one per retry.
        let keys = match grant.on_revoke {
            OnRevoke::Keep => {
                "onRevoke Keep: its access keys stay as they are and keep working; delete the IamAccessKey to delete them".to_string()
            }
            OnRevoke::Deactivate => {
                "onRevoke Deactivate: its access keys are Inactive in IAM; they follow spec.keyStatus again if a rule allows this resource again".to_string()
            }
            OnRevoke::Delete => format!(
                "onRevoke Delete: its access keys and Secret {} are deleted; a new key is issued if a rule allows this resource again",
                self.secret_name
            ),
        };
        Error::NotAuthorized(format!("{revoked}; {keys}"))
    }

    async fn apply_on_revoke(&mut self, on_revoke: OnRevoke) -> Result<(), Error> {
        if on_revoke == OnRevoke::Keep {
            return Ok(());
        }
        let user = self.user_name().to_owned();
        let ledger = Ledger::from_status(&self.status);
        self.user = observe_user(self.iam.as_ref(), &user).await?;
        (self.secret, _, _) = observe_secret_meta(self.ctx, self.obj).await?;
        let (mut deleted, mut secret_deleted) = (vec![], false);
        for _ in 0..MAX_STEPS {
            let step = plan_revoke(
                on_revoke,
                &CleanupObservation {
                    owner: &self.owner,
                    previous_owner: self.previous_owner.as_ref(),
                    // What deletion would do; plan_revoke decides by onRevoke.
                    policy: DeletionPolicy::Delete,
                    creation_policy: self.obj.spec.secret.creation_policy,
                    ledger: &ledger,
                    user: &self.user,
                    secret: &self.secret,
                },
            );
            debug!(?step, "revocation step");
            match step {
                RevokeStep::Done => break,
                RevokeStep::ReadUser | RevokeStep::Cleanup(CleanupStep::ReadUser) => {
                    self.read_user().await?;
                }
                RevokeStep::Deactivate { access_key_id } => {
                    self.iam.update_access_key(&user, &access_key_id, KeyStatus::Inactive).await?;
                    self.user.key_status_set(&access_key_id, KeyStatus::Inactive);
                    let note = format!(
                        "access key {access_key_id} set Inactive: no IamAccessKeyPolicy allows this resource any more (onRevoke: Deactivate)"
                    );
                    self.note(EventType::Warning, "KeyDeactivated", note).await;
                }
                RevokeStep::Cleanup(CleanupStep::DeleteKey { access_key_id }) => {
                    // Its tag stays until the cleanup planner's Untag step, which removes all of ours.
                    match self.iam.delete_access_key(&user, &access_key_id).await {
                        Err(e) if !e.is_not_found() => return Err(e.into()),
                        _ => {}
                    }
                    self.user.key_deleted(&access_key_id);
                    deleted.push(access_key_id);
                }
                RevokeStep::Cleanup(CleanupStep::Untag { tag_keys }) => {
                    self.iam.untag_user(&user, &tag_keys).await?;
                    self.user.untagged(&tag_keys);
                }
                RevokeStep::Cleanup(CleanupStep::DeleteSecret) => {
                    delete_secret(self.ctx, &self.obj.namespace().unwrap_or_default(), &self.secret_name).await?;
                    self.secret = SecretObservation::Missing;
                    secret_deleted = true;
                }
                RevokeStep::Cleanup(CleanupStep::LeaveSecret | CleanupStep::UnmergeSecret) => {
                    crate::controller::secret_policy::release(self.ctx, self.obj).await?;
                    self.secret = SecretObservation::NotOurs;
                }
                // Only for deletionPolicy Retain, which a revocation never plans with.
                RevokeStep::Cleanup(CleanupStep::MarkRetained { .. } | CleanupStep::Done) => break,
            }
        }
        if on_revoke == OnRevoke::Delete {
            // Status keeps only what is left in IAM (nothing, unless a key could not be proven ours).
            let left: Vec<String> = match &self.user {
                UserObservation::Found { keys, .. } => keys.iter().map(|k| k.access_key_id.clone()).collect(),
                UserObservation::Missing => vec![],
            };
            self.status.keys.retain(|k| left.contains(&k.access_key_id));
            self.status.pending_create = None;
            self.status.restarted_for = None;
            self.status.last_used = None;
            if !self.status.keys.iter().any(|k| k.phase == KeyPhase::Current) {
                self.status.access_key_id = None;
                self.status.key_status = None;
                self.status.create_date = None;
                self.status.secret_name = None;
                self.status.next_rotation_at = None;
            }
        }
        if !deleted.is_empty() || secret_deleted {
            let mut note =
                "no IamAccessKeyPolicy allows this resource any more (onRevoke: Delete): deleted".to_string();
            if !deleted.is_empty() {
                note.push_str(&format!(" access key(s) {} of IAM user {user}", deleted.join(", ")));
            }
            if secret_deleted {
                let and = if deleted.is_empty() { "" } else { " and" };
                note.push_str(&format!("{and} Secret {}", self.secret_name));
            }
            self.note(EventType::Warning, "KeysDeleted", note).await;
        }
        Ok(())
    }
}
