//! The finalizer's work: remove what the resource created, then let it go.

use std::sync::Arc;

use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{controller::Action, events::EventType},
};
use tracing::{debug, warn};

use super::{
    Context,
    apply::{Verdict, decide, observe_secret_meta, observe_user, paused_message, recorded_role},
    secret::{delete_secret, secret_name},
    status::set_ready,
};
use crate::{
    crd::PAUSED_ANNOTATION,
    crd::{DeletionPolicy, FIELD_MANAGER, FINALIZER, IamAccessKey},
    error::Error,
    failpoint,
    iam::IamError,
    plan::{
        Blocked, CleanupObservation, CleanupStep, Ledger, Owner, SecretObservation, UserObservation,
        may_have_written_to_iam, plan_cleanup,
    },
};

const MAX_STEPS: usize = 16;

/// A deletion that cannot finish says why where `kubectl get` and Argo CD look (the Ready
/// condition, written only when it changes) and in a Warning event: keys that stay in IAM
/// because their account cannot be reached are never given up silently.
pub async fn report_waiting(obj: &IamAccessKey, ctx: &Context, err: &Error) {
    let mut message = format!("deletion waits: {err}");
    if let Error::Iam(IamError::AssumeRoleFailed { .. }) = err {
        let account = obj.status.as_ref().and_then(|s| s.account.as_ref()).and_then(|a| a.id.as_deref());
        message.push_str(&format!(
            "; the access keys of this resource stay in AWS account {} until the role can be assumed again (its trust policy, or the operator's sts:AssumeRole permission); removing the finalizer {FINALIZER} by hand leaves them there",
            account.unwrap_or("?")
        ));
    }
    let mut status = obj.status.clone().unwrap_or_default();
    set_ready(&mut status, obj, false, err.reason(), message.clone());
    // Said once per change, like every failure (docs/decisions.md: events are never repeated).
    if obj.status.as_ref() == Some(&status) {
        return;
    }
    ctx.event(obj, EventType::Warning, err.reason(), message).await;
    let api: Api<IamAccessKey> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": obj.metadata.resource_version},
        "status": {"conditions": status.conditions},
    });
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    match api.patch_status(&obj.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(_) => ctx.metrics.kube_write("IamAccessKey", "status"),
        Err(e) => warn!(error = %crate::error::kube_message(&e), "could not record why the deletion waits"),
    }
}

pub async fn cleanup(obj: &Arc<IamAccessKey>, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let status = obj.status.clone().unwrap_or_default();
    // A resource that never got as far as recording a create (never allowed, a user outside
    // the operator's path, a missing user) has nothing in IAM: let it go without an IAM call.
    if !may_have_written_to_iam(&status) {
        debug!("nothing of this resource can be in IAM: released without IAM calls");
        ctx.forget(obj);
        ctx.metrics.resources.forget(&ns, &obj.name_any());
        return Ok(Action::await_change());
    }
    // Pause and Retain hold only where every policy rule that allows the resource allows them;
    // the untagged remains of an interrupted create are deleted only for a resource the
    // policies allow (status alone must never aim the operator at another user's keys).
    let paused = obj.is_paused();
    let mut deletion_policy = obj.spec.deletion_policy;
    let mut ledger = Ledger::from_status(&status);
    if paused || deletion_policy == DeletionPolicy::Retain || ledger.pending_create.is_some() {
        let limits = match decide(ctx, obj).await?.0 {
            Verdict::Allowed(limits) | Verdict::UserMissing(limits) => Some(limits),
            Verdict::Denied(_) | Verdict::OutsidePrefix(_) | Verdict::AccountConflict(_) => None,
        };
        if paused {
            if let Some(limits) = limits.as_ref().filter(|l| l.pause_allowed()) {
                let message = paused_message(&limits.policies);
                return Err(Error::Blocked { blocked: Blocked::Paused, message });
            }
            let note = format!(
                "the {PAUSED_ANNOTATION} annotation does not hold this deletion: no IamAccessKeyPolicy allows pausing this resource (allowPause)"
            );
            ctx.event(obj, EventType::Warning, "PauseIgnored", note).await;
        }
        let applies = limits.as_ref().map_or(DeletionPolicy::Delete, |l| l.deletion_policy(&obj.spec));
        if deletion_policy != applies {
            deletion_policy = applies;
            let note = "deletionPolicy Retain is not allowed for this resource by the IamAccessKeyPolicy rules (allowRetain): its access keys are deleted".to_string();
            ctx.event(obj, EventType::Warning, "RetainNotAllowed", note).await;
        }
        if limits.is_none() {
            ledger.pending_create = None;
            ledger.pending_since = None;
        }
    }
    let owner = Owner::new(&ctx.settings.cluster_name, &ns, &obj.name_any());
    let previous_owner = ctx.settings.previous_cluster_name.as_deref().map(|c| Owner::new(c, &ns, &obj.name_any()));
    let user_name = obj.spec.user_name.as_str();
    // Where the keys are, whatever the rules say now.
    let iam = ctx.iam(recorded_role(obj).as_ref(), &ns);
    let mut user = observe_user(iam.as_ref(), user_name).await?;
    let (mut secret, _, _) = observe_secret_meta(ctx, obj).await?;
    let mut deleted = vec![];
    for _ in 0..MAX_STEPS {
        let step = plan_cleanup(&CleanupObservation {
            owner: &owner,
            previous_owner: previous_owner.as_ref(),
            policy: deletion_policy,
            creation_policy: obj.spec.secret.creation_policy,
            ledger: &ledger,
            user: &user,
            secret: &secret,
        });
        debug!(?step, "cleanup step");
        match step {
            CleanupStep::ReadUser => {
                let info = iam.get_user(user_name).await?;
                if let UserObservation::Found { tags, .. } = &mut user {
                    *tags = Some(info.tags);
                }
            }
            CleanupStep::DeleteKey { access_key_id } => {
                match iam.delete_access_key(user_name, &access_key_id).await {
                    Err(e) if !e.is_not_found() => return Err(e.into()),
                    _ => {}
                }
                failpoint!("during-delete");
                if let UserObservation::Found { keys, .. } = &mut user {
                    keys.retain(|k| k.access_key_id != access_key_id);
                }
                deleted.push(access_key_id);
            }
            CleanupStep::MarkRetained { access_key_ids } => {
                let tags: Vec<(String, String)> =
                    access_key_ids.iter().map(|id| (id.clone(), owner.retained_tag_value())).collect();
                iam.tag_user(user_name, &tags).await?;
                if let UserObservation::Found { tags: Some(t), .. } = &mut user {
                    t.extend(tags);
                }
                let note = format!(
                    "deletionPolicy Retain: access key(s) {} kept in IAM, tagged as retained; delete them in IAM when no longer needed",
                    access_key_ids.join(", ")
                );
                ctx.event(obj, EventType::Normal, "KeysRetained", note).await;
            }
            CleanupStep::Untag { tag_keys } => {
                iam.untag_user(user_name, &tag_keys).await?;
                if let UserObservation::Found { tags: Some(t), .. } = &mut user {
                    t.retain(|k, _| !tag_keys.contains(k));
                }
            }
            CleanupStep::DeleteSecret => {
                delete_secret(ctx, &ns, &secret_name(obj)).await?;
                secret = SecretObservation::Missing;
            }
            // Orphan: the Secret stays (unmarked); Merge: only this resource's entries go.
            CleanupStep::LeaveSecret | CleanupStep::UnmergeSecret => {
                super::secret_policy::release(ctx, obj).await?;
                secret = SecretObservation::NotOurs;
            }
            CleanupStep::Done => {
                if !deleted.is_empty() {
                    let note = format!("deleted access key(s) {} of IAM user {user_name}", deleted.join(", "));
                    ctx.event(obj, EventType::Normal, "KeysDeleted", note).await;
                }
                ctx.forget(obj);
                ctx.metrics.resources.forget(&ns, &obj.name_any());
                return Ok(Action::await_change());
            }
        }
    }
    Ok(Action::requeue(std::time::Duration::from_secs(1)))
}
