//! The finalizer's work: remove what the resource created, then let it go.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::DeleteParams,
    runtime::{controller::Action, events::EventType},
};
use tracing::debug;

use super::{
    Context,
    apply::{is_paused, observe_secret_meta, observe_user},
    secret::secret_name,
};
use crate::{
    crd::IamAccessKey,
    error::Error,
    failpoint,
    plan::{Blocked, CleanupObservation, CleanupStep, Ledger, Owner, SecretObservation, UserObservation, plan_cleanup},
};

const MAX_STEPS: usize = 16;

pub async fn cleanup(obj: &Arc<IamAccessKey>, ctx: &Context) -> Result<Action, Error> {
    if is_paused(obj) {
        let message = "paused: deletion waits until the iam.keyop.dev/paused annotation is removed".to_string();
        return Err(Error::Blocked { blocked: Blocked::Paused, message });
    }
    let ns = obj.namespace().unwrap_or_default();
    let owner = Owner::new(&ctx.settings.cluster_name, &ns, &obj.name_any());
    let previous_owner = ctx.settings.previous_cluster_name.as_deref().map(|c| Owner::new(c, &ns, &obj.name_any()));
    let user_name = obj.spec.user_name.as_str();
    let ledger = Ledger::from_status(&obj.status.clone().unwrap_or_default());
    let mut user = observe_user(ctx, user_name).await?;
    let (mut secret, _) = observe_secret_meta(ctx, obj).await?;
    let mut deleted = vec![];
    for _ in 0..MAX_STEPS {
        let step = plan_cleanup(&CleanupObservation {
            owner: &owner,
            previous_owner: previous_owner.as_ref(),
            policy: obj.spec.deletion_policy,
            ledger: &ledger,
            user: &user,
            secret: &secret,
        });
        debug!(?step, "cleanup step");
        match step {
            CleanupStep::ReadUser => {
                let info = ctx.iam.get_user(user_name).await?;
                if let UserObservation::Found { tags, .. } = &mut user {
                    *tags = Some(info.tags);
                }
            }
            CleanupStep::DeleteKey { access_key_id } => {
                match ctx.iam.delete_access_key(user_name, &access_key_id).await {
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
                ctx.iam.tag_user(user_name, &tags).await?;
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
                ctx.iam.untag_user(user_name, &tag_keys).await?;
                if let UserObservation::Found { tags: Some(t), .. } = &mut user {
                    t.retain(|k, _| !tag_keys.contains(k));
                }
            }
            CleanupStep::DeleteSecret => {
                let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
                match api.delete(&secret_name(obj), &DeleteParams::default()).await {
                    Ok(_) => ctx.metrics.kube_write("Secret", "delete"),
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                secret = SecretObservation::Missing;
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
