//! `Step::AdoptKey`: take over an access key made outside the operator (`spec.adopt`).
//!
//! Every check comes before any write: the Secret is read once, the key must be one of the
//! user's, Active, tagged by nobody else (`plan::adopt::check_candidate`) and authenticate as
//! the user (STS). Then, in this order, so that a crash anywhere leaves something the planner
//! resumes from and never a tagged key that no Secret holds (which it would delete as an
//! orphan): publish the key in the resource's Secret (taking it over per `creationPolicy`; in
//! place, the Secret holds the same working key before and after) -> tag it as this resource's
//! (with the claim) -> record it as current.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt, runtime::events::EventType};

use super::Run;
use crate::{
    controller::{secret::render_secret, secret_policy::writes},
    error::{Error, KubeContext},
    failpoint,
    iam::IamError,
    plan::{
        AdoptionRefusal, Blocked, SecretObservation, UserObservation,
        adopt::{check_candidate, judge_identity, read_candidate},
        record,
    },
};

impl Run<'_> {
    pub(super) async fn adopt_key(&mut self) -> Result<(), Error> {
        let Some(spec) = self.obj.spec.adopt.clone() else {
            return Err(Error::Internal("AdoptKey planned without spec.adopt".into()));
        };
        let user = self.user_name().to_owned();
        let source = spec.secret_name.clone().unwrap_or_else(|| self.secret_name.clone());
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &self.obj.namespace().unwrap_or_default());
        // The one read of the key's secret; it stays in this function's memory.
        let Some(held) = api.get_opt(&source).await.context("reading the Secret to adopt the key from")? else {
            return Err(self.refuse(AdoptionRefusal::SecretMissing { secret: source }));
        };
        let data: BTreeMap<String, Vec<u8>> =
            held.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        let (id, secret, (id_key, secret_key)) = read_candidate(&spec, &source, &data).map_err(|r| self.refuse(r))?;
        let key = match &self.user {
            UserObservation::Found { keys, tags: Some(tags) } => check_candidate(&self.owner, &user, keys, tags, &id),
            _ => return Err(Error::Internal("AdoptKey planned before the user's tags were read".into())),
        }
        .map_err(|r| self.refuse(r))?;
        let user_arn = self.user_arn().await?;
        let answer = match self.iam.caller_identity(&id, &secret).await {
            Ok(arn) => Ok(arn),
            // A wrong secret, an unknown key: a refusal. Throttling or an outage: retried.
            Err(e @ IamError::AccessDenied { .. }) => Err(e.to_string()),
            Err(e) => return Err(e.into()),
        };
        if let Err(refusal) = judge_identity(&id, &user_arn, answer.as_deref().map_err(Clone::clone)) {
            // The user may have been recreated: read it again next time.
            self.ctx.forget_user(self.account.as_ref(), &user);
            return Err(self.refuse(refusal));
        }

        let object = render_secret(self.obj, &id, &secret, &user_arn)?;
        let keeps_source_entries = writes(&object, &id_key) && writes(&object, &secret_key);
        self.publish(&id, object).await?;
        self.secret = SecretObservation::Ours { access_key_id: Some(id.clone()) };
        failpoint!("after-adopt-publish");
        let tags = self.user.new_key_tags(&self.owner, &id);
        self.tag_new_key(&user, &tags).await?;
        self.user.tagged(tags);
        failpoint!("after-adopt-tag");
        let requested_at = self.requested_at();
        record::record_adopted(&mut self.status, &self.obj.spec, requested_at, key, self.now);
        self.save_status().await?;
        self.ctx.defer_last_use_read(self.obj, self.now);

        let note = format!(
            "adopted access key {id} of IAM user {user} from Secret {source} (entries {id_key}/{secret_key}): it authenticates as {user_arn}, is tagged as this resource's and is published in Secret {}; from now on it is rotated and deleted like a key the operator created",
            self.secret_name
        );
        self.note(EventType::Normal, "KeyAdopted", note).await;
        if source != self.secret_name {
            let note = format!(
                "Secret {source} was only read and still holds access key {id}, which rotation will retire: point its consumers at Secret {}",
                self.secret_name
            );
            self.note(EventType::Warning, "AdoptedFromAnotherSecret", note).await;
        } else if !keeps_source_entries {
            let note = format!(
                "entries {id_key} and {secret_key} of Secret {source} still hold access key {id} and are not written by this resource's layout, so a rotation will not update them: make spec.secret's layout write them (e.g. a template with {id_key} and {secret_key}), or move their consumers to the entries it writes"
            );
            self.note(EventType::Warning, "AdoptedEntriesKept", note).await;
        }
        Ok(())
    }

    fn refuse(&self, refusal: AdoptionRefusal) -> Error {
        self.blocked(Blocked::AdoptionRefused(refusal))
    }
}
