//! Converging one IamAccessKey: observe, ask the planner, execute its step, record, repeat.

use std::{sync::Arc, time::Duration};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{controller::Action, events::EventType},
};
use tracing::debug;

use super::{
    Context, Slot,
    secret::{check_template, layout_stale, secret_name},
    status::{POLICY_OVERRIDE, set_policy_override, set_ready},
};
use crate::{
    crd::{
        AccountRole, FIELD_MANAGER, IamAccessKey, IamAccessKeyStatus, KeyPhase, OWNER_TAG, PAUSED_ANNOTATION,
        ROTATE_REQUESTED_AT_ANNOTATION,
    },
    error::{Error, KubeContext},
    iam::{IamApi, IamError, IamUser},
    metrics::ResourceSnapshot,
    plan::{
        Blocked, Ledger, Observation, Owner, SecretLayout, SecretObservation, Step, UserObservation, account,
        plan_next_step,
        record::{self, STEP_BUDGET},
    },
    policy::{Decision, Limits, NamespaceFacts, Overrides, UserFacts, accounts, authorize_in, combine},
};

mod adopt;
mod revoke;
mod steps;

pub async fn apply(obj: &Arc<IamAccessKey>, ctx: &Context, slot: Slot) -> Result<Action, Error> {
    let mut run = Run::new(obj, ctx, slot);
    let result = async {
        // The policies first: they decide whether the resource may act at all, and whether its
        // pause holds (a pause they do not allow is ignored, and the resource says so).
        run.authorize().await?;
        if obj.is_paused() && run.limits.pause_allowed() {
            return Err(run.blocked(Blocked::Paused));
        }
        // A template that does not render is refused before anything is written.
        check_template(obj)?;
        run.observe().await?;
        run.converge().await
    }
    .await;
    match result {
        Ok(wake_at) => {
            run.succeed().await?;
            run.publish_metrics("Ready");
            let resync = super::later(ctx.settings.resync);
            let until_wake = wake_at.map(|t| Duration::try_from(t.duration_since(run.now)).unwrap_or(Duration::ZERO));
            Ok(Action::requeue(until_wake.map_or(resync, |w| w.min(resync)) + Duration::from_millis(500)))
        }
        Err(err) => {
            run.fail(&err).await;
            run.publish_metrics(err.reason());
            Err(err)
        }
    }
}

/// The role status records the keys under (`None`: the operator's own identity, also for
/// resources from before accounts were recorded).
pub fn recorded_role(obj: &IamAccessKey) -> Option<AccountRole> {
    obj.status.as_ref()?.account.as_ref()?.role()
}

/// What a held pause says, on a live resource and on one being deleted alike.
pub fn paused_message(policies: &[String]) -> String {
    format!(
        "paused by annotation {PAUSED_ANNOTATION}=true (allowed by IamAccessKeyPolicy {}): no IAM or Secret writes, deletion included, until it is removed",
        policies.join(", ")
    )
}

/// A JSON merge patch (RFC 7396) that turns `old` into exactly `new`: members `new` lacks are
/// removed (null), objects are patched member by member, anything else is replaced whole.
pub fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = serde_json::Map::new();
            for (key, value) in new {
                let member = match old.get(key) {
                    Some(before) => merge_patch(before, value),
                    None => value.clone(),
                };
                patch.insert(key.clone(), member);
            }
            for key in old.keys().filter(|k| !new.contains_key(*k)) {
                patch.insert(key.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

/// Converges when the IAM user cannot be listed: a missing user is an observation, not an error.
pub async fn observe_user(iam: &dyn IamApi, user: &str) -> Result<UserObservation, Error> {
    match iam.list_access_keys(user).await {
        Ok(keys) => Ok(UserObservation::Found { keys, tags: None }),
        Err(e) if e.is_not_found() => Ok(UserObservation::Missing),
        Err(e) => Err(e.into()),
    }
}

/// The Secret as the planner sees it, how it stands to the spec's layout, and, when it is not
/// the resource's to write, why.
pub async fn observe_secret_meta(
    ctx: &Context,
    obj: &IamAccessKey,
) -> Result<(SecretObservation, SecretLayout, Option<String>), Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let meta = secrets.get_metadata_opt(&secret_name(obj)).await.context("reading the Secret's metadata")?;
    let (mut observation, mut conflict) = super::secret_policy::classify(obj, meta.as_ref().map(|m| &m.metadata));
    // Before the first write into someone else's Secret, its type (not in the metadata) decides
    // too: one read, only then.
    if observation == SecretObservation::Available {
        let held = secrets.get_opt(&secret_name(obj)).await.context("reading the Secret")?;
        if let Some(why) = held.and_then(|h| super::secret_policy::refused_type(h.type_.as_deref())) {
            (observation, conflict) = (SecretObservation::NotOurs, Some(why));
        }
    }
    let stale = matches!(observation, SecretObservation::Ours { .. }) && layout_stale(obj, meta.as_ref());
    Ok((observation, if stale { SecretLayout::Stale } else { SecretLayout::Current }, conflict))
}

/// What the policies say about a resource.
pub enum Verdict {
    Allowed(Limits),
    /// Allowed, but the user does not exist (only ever said of a user the policies allow).
    UserMissing(Limits),
    /// No policy rule allows the resource.
    Denied(String),
    /// The policies allow it, but its user is outside the operator's `--iam-user-path-prefix`.
    OutsidePrefix(String),
    /// Rules naming different AWS accounts allow it.
    AccountConflict(String),
}

/// The policies' verdict on the resource, and the IAM user if it had to be read for it. Each
/// account's rules are judged on their own, with the user as that account shows it. A user no
/// rule allows is `Denied` with the same message whether it exists or not, and wherever it is:
/// its existence and path are told only to namespaces the policies allow to manage it.
pub async fn decide(ctx: &Context, obj: &IamAccessKey) -> Result<(Verdict, Option<IamUser>), Error> {
    let policies = ctx.tenancy.policies();
    let ns = obj.namespace().unwrap_or_default();
    let labels = ctx.tenancy.namespace_labels(&ns);
    let namespace = NamespaceFacts { name: &ns, labels: &labels };
    let user = obj.spec.user_name.as_str();
    let (mut decisions, mut read) = (vec![], vec![]);
    for account in accounts(&policies, &namespace) {
        let (decision, info) = decide_in(ctx, &policies, &namespace, user, account.as_ref()).await?;
        decisions.push(decision);
        read.extend(info.map(|info| (account, info)));
    }
    let limits = match combine(decisions, &namespace, user) {
        Decision::Allowed(limits) => limits,
        Decision::Denied(message) => return Ok((Verdict::Denied(message), None)),
        Decision::AccountConflict(message) => return Ok((Verdict::AccountConflict(message), None)),
        Decision::NeedUserDetails => {
            return Err(Error::Internal("the policy decision asked for the user's details twice".into()));
        }
    };
    let account = limits.account.clone();
    let same_role = |a: &Option<AccountRole>| a.as_ref().map(|r| &r.role_arn) == account.as_ref().map(|r| &r.role_arn);
    let mut info = read.into_iter().find(|(a, _)| same_role(a)).map(|(_, info)| info);
    // The operator's own fence (--iam-user-path-prefix), for users the policies allow. A user's
    // path rarely changes: a recent sighting spares a GetUser per resync.
    let prefix = ctx.settings.iam_user_path_prefix.as_str();
    let known_inside = |path: &str| path.starts_with(prefix);
    if prefix != "/"
        && info.is_none()
        && !ctx.recent_user(account.as_ref(), user).is_some_and(|u| known_inside(&u.path))
    {
        match ctx.iam(account.as_ref(), &ns).get_user(user).await {
            Ok(read) => {
                ctx.remember_user(account.as_ref(), user, &read);
                info = Some(read);
            }
            Err(e) if e.is_not_found() => return Ok((Verdict::UserMissing(limits), None)),
            Err(e) => return Err(e.into()),
        }
    }
    if prefix != "/"
        && let Some(read) = &info
        && !known_inside(&read.path)
    {
        let message = format!(
            "IAM user {user:?} is under path {:?}, outside {prefix:?}, the only path this operator manages (--iam-user-path-prefix)",
            read.path
        );
        return Ok((Verdict::OutsidePrefix(message), info));
    }
    Ok((Verdict::Allowed(limits), info))
}

/// The decision of the rules naming one account, reading the user there when they need its
/// path or tags.
async fn decide_in(
    ctx: &Context,
    policies: &[Arc<crate::crd::IamAccessKeyPolicy>],
    namespace: &NamespaceFacts<'_>,
    user: &str,
    account: Option<&AccountRole>,
) -> Result<(Decision, Option<IamUser>), Error> {
    let decision = authorize_in(policies, namespace, &UserFacts { name: user, details: None }, account);
    if decision != Decision::NeedUserDetails {
        return Ok((decision, None));
    }
    match ctx.iam(account, namespace.name).get_user(user).await {
        Ok(read) => {
            ctx.remember_user(account, user, &read);
            let facts = UserFacts { name: user, details: Some((&read.path, &read.tags)) };
            Ok((authorize_in(policies, namespace, &facts, account), Some(read)))
        }
        // A user that cannot be read matches no rule on path or tags: the decision (and its
        // message) is the one for an existing user those rules do not match.
        Err(e) if e.is_not_found() || matches!(e, IamError::AccessDenied { .. }) => {
            debug!(user, error = %e, "IAM user unreadable: no rule on path or tags can match it");
            let none = std::collections::BTreeMap::new();
            let facts = UserFacts { name: user, details: Some(("", &none)) };
            Ok((authorize_in(policies, namespace, &facts, account), None))
        }
        Err(e) => Err(e.into()),
    }
}

struct Run<'a> {
    obj: &'a IamAccessKey,
    ctx: &'a Context,
    now: Timestamp,
    owner: Owner,
    previous_owner: Option<Owner>,
    secret_name: String,
    /// Working copy, and what the API server holds (to write only on change).
    status: IamAccessKeyStatus,
    saved: Option<IamAccessKeyStatus>,
    resource_version: Option<String>,
    user: UserObservation,
    user_info: Option<IamUser>,
    limits: Limits,
    /// What the policies overrule of the resource's settings (`None`: not decided yet).
    overrides: Option<Overrides>,
    secret: SecretObservation,
    secret_layout: SecretLayout,
    /// Why the Secret is not this resource's to write (`NotOurs`), for the message.
    secret_conflict: Option<String>,
    slot: Slot,
    /// The account the resource's keys are in (`None`: the operator's own), and its IAM: as
    /// status records it, until the policies place a resource with nothing in IAM.
    account: Option<AccountRole>,
    iam: Arc<dyn IamApi>,
}

impl<'a> Run<'a> {
    fn new(obj: &'a IamAccessKey, ctx: &'a Context, slot: Slot) -> Self {
        let ns = obj.namespace().unwrap_or_default();
        let account = recorded_role(obj);
        Run {
            obj,
            ctx,
            // Whole seconds: the API server stores timestamps that way, so comparisons hold.
            now: record::whole_seconds(Timestamp::now()),
            owner: Owner::new(&ctx.settings.cluster_name, &ns, &obj.name_any()),
            previous_owner: ctx.settings.previous_cluster_name.as_deref().map(|c| Owner::new(c, &ns, &obj.name_any())),
            secret_name: secret_name(obj),
            status: obj.status.clone().unwrap_or_default(),
            saved: obj.status.clone(),
            resource_version: obj.metadata.resource_version.clone(),
            user: UserObservation::Missing,
            user_info: None,
            limits: Limits::default(),
            overrides: None,
            secret: SecretObservation::Missing,
            secret_layout: SecretLayout::Current,
            secret_conflict: None,
            slot,
            iam: ctx.iam(account.as_ref(), &ns),
            account,
        }
    }

    /// Act in the account the policies chose, or stay where the keys are (`AccountChanged`).
    fn place(&mut self, account: Option<&AccountRole>) -> Result<(), Error> {
        account::place_account(&mut self.status, account, &self.obj.spec.user_name).map_err(Error::AccountChanged)?;
        // With the rule's rate ceiling.
        self.account = account.cloned();
        self.iam = self.ctx.iam(account, &self.obj.namespace().unwrap_or_default());
        if let Some(arn) = self.user_info.as_ref().map(|u| u.arn.clone()) {
            self.note_user_arn(&arn);
        }
        Ok(())
    }

    pub(super) fn note_user_arn(&mut self, arn: &str) {
        account::note_user_arn(&mut self.status, arn);
    }

    fn user_name(&self) -> &str {
        &self.obj.spec.user_name
    }

    /// Tenancy first: nothing is written to IAM for a resource no policy allows.
    async fn authorize(&mut self) -> Result<(), Error> {
        let (verdict, info) = decide(self.ctx, self.obj).await?;
        self.user_info = info;
        match verdict {
            Verdict::Allowed(limits) => {
                self.record_grant(&limits).await;
                self.overrides = Some(limits.overrides(&self.obj.spec, self.obj.is_paused()));
                self.place(limits.account.as_ref())?;
                limits.check(&self.obj.spec).map_err(Error::PolicyViolation)?;
                self.limits = limits;
                Ok(())
            }
            Verdict::UserMissing(limits) => {
                self.overrides = Some(limits.overrides(&self.obj.spec, self.obj.is_paused()));
                self.place(limits.account.as_ref())?;
                self.limits = limits;
                Err(self.blocked(Blocked::UserNotFound))
            }
            // No rule allows it (any more): if one did, its grant was revoked.
            Verdict::Denied(message) => {
                self.overrides = Some(Overrides::default());
                Err(self.revoke(message).await)
            }
            // Denied by the operator's own path prefix rather than by the policies: not a revocation.
            Verdict::OutsidePrefix(message) => {
                self.overrides = Some(Overrides::default());
                Err(Error::NotAuthorized(message))
            }
            // The platform's rules disagree: nothing is done, nothing revoked.
            Verdict::AccountConflict(message) => {
                self.overrides = Some(Overrides::default());
                Err(Error::AccountConflict(message))
            }
        }
    }

    async fn observe(&mut self) -> Result<(), Error> {
        (self.secret, self.secret_layout, self.secret_conflict) = observe_secret_meta(self.ctx, self.obj).await?;
        self.user = observe_user(self.iam.as_ref(), self.user_name()).await?;
        // The user was read for the policy already: its tags are known.
        if let (UserObservation::Found { tags, .. }, Some(info)) = (&mut self.user, &self.user_info) {
            *tags = Some(info.tags.clone());
        }
        Ok(())
    }

    /// Last use of the current key, if status holds it.
    fn current_last_used(&self) -> Option<Timestamp> {
        let current = self.status.keys.iter().find(|k| k.phase == KeyPhase::Current)?;
        let used = self.status.last_used.as_ref().filter(|u| u.access_key_id == current.access_key_id)?;
        used.date.as_ref().map(|t| t.0)
    }

    /// Execute planner steps until it says `Done`; returns when to wake up next.
    async fn converge(&mut self) -> Result<Option<Timestamp>, Error> {
        for _ in 0..STEP_BUDGET {
            let ledger = Ledger::from_status(&self.status);
            let rotate_requested_at = self.obj.annotations().get(ROTATE_REQUESTED_AT_ANNOTATION).cloned();
            let (last_used_due, last_used_read_at) = self.ctx.last_use_reads(self.obj, self.now);
            let step = plan_next_step(&Observation {
                now: self.now,
                owner: &self.owner,
                previous_owner: self.previous_owner.as_ref(),
                spec: &self.obj.spec,
                ledger: &ledger,
                rotate_requested_at: rotate_requested_at.as_deref(),
                user: &self.user,
                secret: &self.secret,
                last_used_due,
                last_used_read_at,
                current_last_used: self.current_last_used(),
                limits: &self.limits,
                secret_layout: self.secret_layout,
            });
            debug!(?step, "planned");
            if let Step::Done { wake_at } = step {
                return Ok(wake_at);
            }
            self.execute(step).await?;
        }
        // Progress was made every step; continue in a fresh reconcile.
        Ok(Some(self.now))
    }

    async fn execute(&mut self, step: Step) -> Result<(), Error> {
        match step {
            Step::Done { .. } => Ok(()),
            Step::Blocked(blocked) => Err(self.blocked(blocked)),
            Step::ReadUser => self.read_user().await,
            Step::ClaimUser => self.claim_user().await,
            Step::TakeOverTags { tags } => self.take_over_tags(tags).await,
            Step::DeleteOrphan { access_key_id, tagged } => self.delete_orphan(&access_key_id, tagged).await,
            Step::AdoptSecretKey { key } => self.adopt_secret_key(key).await,
            Step::AdoptKey => self.adopt_key().await,
            Step::UntagStale { tag_keys } => self.untag_stale(&tag_keys).await,
            Step::ForgetKey { access_key_id, expected } => self.forget_key(&access_key_id, expected).await,
            Step::DisownKey { access_key_id } => self.disown_key(&access_key_id).await,
            Step::ReleaseKey { access_key_id } => self.release_key(&access_key_id).await,
            Step::MakeRoom { access_key_id } => self.make_room(&access_key_id).await,
            Step::StartCreate { existing_key_ids } => self.start_create(existing_key_ids).await,
            Step::ClearPending => self.clear_pending().await,
            Step::CreateKey { reason } => self.create_key(reason).await,
            Step::DeactivateUnused { access_key_id, since } => self.deactivate_unused(&access_key_id, since).await,
            Step::SetKeyStatus { access_key_id, status, drift } => {
                self.set_key_status(&access_key_id, status, drift).await
            }
            Step::RewriteSecret { access_key_id } => self.rewrite_secret(&access_key_id).await,
            Step::RestartTargets { access_key_id } => self.restart_targets(access_key_id).await,
            Step::CheckKeyUsage { access_key_id } => self.check_key_usage(&access_key_id).await,
            Step::RetireKey { access_key_id, already_inactive, still_in_use } => {
                self.retire_key(&access_key_id, already_inactive, still_in_use).await
            }
            Step::DeleteRetired { access_key_id } => self.delete_retired(&access_key_id).await,
            Step::RefreshLastUsed { access_key_id } => self.refresh_last_used(access_key_id).await,
        }
    }

    pub(super) fn blocked(&self, blocked: Blocked) -> Error {
        let user = self.user_name();
        let message = match &blocked {
            Blocked::Paused => paused_message(&self.limits.policies),
            Blocked::UserNotFound => {
                format!(
                    "IAM user {user} does not exist: create it (the operator never creates users); retrying with backoff"
                )
            }
            Blocked::UserClaimed { by } => format!(
                "IAM user {user} is managed by {by} (user tag {}): only one IamAccessKey may manage a user",
                OWNER_TAG
            ),
            Blocked::SecretConflict => format!(
                "Secret {}/{} exists and {}",
                self.obj.namespace().unwrap_or_default(),
                self.secret_name,
                self.secret_conflict.as_deref().unwrap_or(
                    "was not created by this IamAccessKey: delete it, set spec.secret.name to a free name, or set spec.secret.creationPolicy to Adopt to take it over"
                )
            ),
            Blocked::SecretNotFound => format!(
                "Secret {}/{} does not exist: creationPolicy Merge writes into a Secret someone else owns and never creates one; create it (or let its owner do so), or use creationPolicy Owner",
                self.obj.namespace().unwrap_or_default(),
                self.secret_name
            ),
            Blocked::MergeNotAllowed { policies } => format!(
                "spec.secret.creationPolicy Merge is not allowed: IamAccessKeyPolicy {} does not allow writing into a Secret this resource does not own (spec.rules[].allowSecretMerge); nothing was written. Ask a platform admin for allowSecretMerge in every rule that allows this resource, or use creationPolicy Owner with a Secret of its own",
                policies.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
            ),
            // The planner does not know the default Secret name: this does.
            Blocked::AdoptionRefused(crate::plan::AdoptionRefusal::SecretNotAllowed { policies, .. }) => {
                crate::plan::AdoptionRefusal::SecretNotAllowed { secret: self.secret_name.clone(), policies: policies.clone() }
                    .to_string()
            }
            Blocked::AdoptionRefused(refusal) => refusal.to_string(),
            Blocked::KeyUnused { access_key_id, since } => format!(
                "access key {access_key_id} is Inactive: unused since {since}, longer than deactivateUnusedAfter of policy {}; rotate (iam-key-operator rotate, or the {ROTATE_REQUESTED_AT_ANNOTATION} annotation) to issue a new key",
                self.limits.policies.join(", ")
            ),
            Blocked::KeyLimitExceeded { blocking } => format!(
                "IAM user {user} already has 2 access keys ({}) and none is this resource's to remove: delete one in IAM to continue",
                blocking.join(", ")
            ),
        };
        Error::Blocked { blocked, message }
    }

    async fn delete_key(&mut self, access_key_id: &str, untag: bool) -> Result<(), Error> {
        let user = self.user_name().to_owned();
        match self.iam.delete_access_key(&user, access_key_id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        if untag {
            self.iam.untag_user(&user, &[access_key_id.to_owned()]).await?;
        }
        self.user.key_deleted(access_key_id);
        self.user.untagged(&[access_key_id.to_owned()]);
        Ok(())
    }

    /// Wait until the new key (created at `created`) authenticates as the user: IAM is
    /// eventually consistent. The first check comes when recent keys had authenticated (before
    /// any has, one key finds out while the others hold); the waits hold no reconcile slot.
    async fn verify(
        &mut self,
        id: &str,
        secret: &crate::iam::SecretAccessKey,
        user_arn: &str,
        created: std::time::Instant,
    ) -> Result<(), Error> {
        let deadline = created + self.ctx.settings.verify_timeout;
        let verifying = &self.ctx.metrics.keys_verifying;
        verifying.inc();
        if !self.ctx.start_first_check() {
            let until = (created + crate::iam::propagation::HOLD).min(deadline);
            self.slot.idle_until(self.ctx, self.ctx.learn_first_check(until)).await;
        }
        let (mut checks, mut refused_at) = (0, None);
        let mut wait = self
            .ctx
            .next_check(created.elapsed(), 0)
            .min(deadline.saturating_duration_since(std::time::Instant::now()));
        let result = loop {
            self.slot.idle(self.ctx, wait).await;
            let answer = match self.iam.caller_identity(id, secret).await {
                Ok(arn) if arn == user_arn => {
                    self.ctx.key_accepted(refused_at, created.elapsed());
                    break Ok(());
                }
                Ok(arn) => arn,
                // A brand-new key is refused for a while.
                Err(e @ IamError::AccessDenied { .. }) => {
                    let age = created.elapsed();
                    refused_at = Some(age);
                    self.ctx.key_refused(age);
                    e.to_string()
                }
                Err(e) if e.is_retryable() => e.to_string(),
                Err(e) => break Err(e.into()),
            };
            checks += 1;
            wait = self.ctx.next_check(created.elapsed(), checks);
            if std::time::Instant::now() + wait > deadline {
                let (access_key_id, user_arn) = (id.into(), user_arn.into());
                break Err(Error::VerifyFailed { access_key_id, user_arn, answer });
            }
        };
        verifying.dec();
        result
    }

    /// Write the Secret: created when missing (so a Secret someone else just created is never
    /// taken over), replaced when it is ours; under `creationPolicy` Adopt and Merge, what the
    /// operator did not write is kept (`secret_policy::prepare_write`).
    async fn publish(&mut self, id: &str, object: Secret) -> Result<(), Error> {
        use super::secret_policy::{classify, prepare_write, refused_type};
        let ns = self.obj.namespace().unwrap_or_default();
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
        let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let keeps_others = self.obj.spec.secret.creation_policy.keeps_others();
        // Before the write: its watch event can arrive before the call returns.
        self.ctx.remember_published(&ns, &self.secret_name, id);
        match self.secret {
            SecretObservation::Missing if self.obj.spec.secret.creation_policy == crate::crd::CreationPolicy::Merge => {
                return Err(self.blocked(Blocked::SecretNotFound));
            }
            SecretObservation::Missing => {
                api.create(&params, &prepare_write(self.obj, object, None)).await.context("creating the Secret")?;
                self.ctx.metrics.kube_write("Secret", "create");
            }
            // Replaced, conditional on the version just read: exactly the data and labels the
            // spec asks for (nothing left from an older layout), and never over someone else's
            // concurrent change. Where other entries are kept, the whole Secret is read first,
            // and checked again: it may have changed hands since it was observed.
            SecretObservation::Ours { .. } | SecretObservation::Available => {
                let held = if keeps_others {
                    api.get(&self.secret_name).await.context("reading the Secret")?
                } else {
                    let meta = api.get_metadata(&self.secret_name).await.context("reading the Secret's metadata")?;
                    Secret { metadata: meta.metadata, ..Default::default() }
                };
                let (seen, why) = classify(self.obj, Some(&held.metadata));
                let refused = refused_type(held.type_.as_deref()).filter(|_| seen == SecretObservation::Available);
                if seen == SecretObservation::NotOurs || refused.is_some() {
                    self.secret_conflict = why.or(refused);
                    return Err(self.blocked(Blocked::SecretConflict));
                }
                let object = prepare_write(self.obj, object, Some(&held));
                api.replace(&self.secret_name, &params, &object).await.context("replacing the Secret")?;
                self.ctx.metrics.kube_write("Secret", "replace");
            }
            SecretObservation::NotOurs => return Err(self.blocked(Blocked::SecretConflict)),
        }
        Ok(())
    }

    /// Without a look at IAM (paused, IAM down) the summary keeps what it said before.
    fn derive_summary(&mut self) {
        let generation = self.obj.metadata.generation;
        record::derive_summary(
            &mut self.status,
            &self.obj.spec,
            generation,
            &self.user,
            &self.secret_name,
            &self.limits,
        );
    }

    async fn save_status(&mut self) -> Result<(), Error> {
        self.derive_summary();
        if self.saved.as_ref() == Some(&self.status) {
            return Ok(());
        }
        let api: Api<IamAccessKey> =
            Api::namespaced(self.ctx.client.clone(), &self.obj.namespace().unwrap_or_default());
        // The resourceVersion makes the write conditional: if anyone else (a second operator
        // instance, say) changed the resource since we read it, the write fails and the
        // reconcile starts over from a fresh read instead of overwriting their status.
        // A merge patch from what is stored to exactly our status: a field someone else wrote
        // (a forged pendingCreate, say) is removed, where server-side apply would keep it.
        let to_value = |s: &IamAccessKeyStatus| serde_json::to_value(s).unwrap_or_default();
        let stored = self.saved.as_ref().map(to_value).unwrap_or_else(|| serde_json::json!({}));
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": self.resource_version},
            "status": merge_patch(&stored, &to_value(&self.status)),
        });
        let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let written = api
            .patch_status(&self.obj.name_any(), &params, &Patch::Merge(&patch))
            .await
            .context("writing the status")?;
        self.resource_version = written.metadata.resource_version;
        self.ctx.metrics.kube_write("IamAccessKey", "status");
        self.saved = Some(self.status.clone());
        Ok(())
    }

    async fn succeed(&mut self) -> Result<(), Error> {
        let current = self.status.keys.iter().find(|k| k.phase == KeyPhase::Current);
        let mut message = match (current, self.status.key_status) {
            (Some(k), Some(s)) => {
                format!("access key {} is {} and published in Secret {}", k.access_key_id, s.as_str(), self.secret_name)
            }
            _ => "no access key".into(),
        };
        self.derive_summary();
        if self.status.foreign_keys > 0 {
            message.push_str(&format!(
                "; {} other access key(s) on IAM user {} are not managed by this resource and are left untouched",
                self.status.foreign_keys,
                self.user_name()
            ));
        }
        set_ready(&mut self.status, self.obj, true, "Ready", message);
        self.record_overrides().await;
        self.save_status().await
    }

    /// The PolicyOverride condition (and a Warning event when it changes), once decided.
    async fn record_overrides(&mut self) {
        let Some(overrides) = self.overrides.clone() else { return };
        if set_policy_override(&mut self.status, self.obj, &overrides) && !overrides.is_empty() {
            self.note(EventType::Warning, POLICY_OVERRIDE, overrides.message()).await;
        }
    }

    async fn fail(&mut self, err: &Error) {
        let previous = self.status.conditions.iter().find(|c| c.type_ == "Ready").cloned();
        set_ready(&mut self.status, self.obj, false, err.reason(), err.to_string());
        self.record_overrides().await;
        let repeated =
            previous.is_some_and(|p| p.status == "False" && p.reason == err.reason() && p.message == err.to_string());
        if let Err(e) = self.save_status().await {
            tracing::warn!(error = %e, "could not record the failure in status");
        }
        if !repeated {
            self.note(EventType::Warning, err.reason(), err.to_string()).await;
        }
    }

    fn publish_metrics(&self, ready_reason: &str) {
        let current = self.status.keys.iter().find(|k| k.phase == KeyPhase::Current);
        let now = Timestamp::now();
        let seconds = |t: Timestamp| t.as_millisecond() as f64 / 1000.0;
        let last_used =
            self.status.last_used.as_ref().filter(|u| current.is_some_and(|c| c.access_key_id == u.access_key_id));
        // Ten minutes of slack: a rotation in progress is not overdue.
        let overdue_after = jiff::SignedDuration::from_mins(10);
        let snapshot = ResourceSnapshot {
            ready_reason: ready_reason.into(),
            keys: self.status.keys.len(),
            key_age_seconds: current.map(|c| seconds(now) - seconds(c.create_date.0)),
            last_used_timestamp: last_used.and_then(|u| u.date.as_ref()).map(|t| seconds(t.0)),
            key_created_timestamp: current.map(|c| seconds(c.create_date.0)),
            next_rotation_timestamp: self.status.next_rotation_at.as_ref().map(|t| seconds(t.0)),
            rotation_overdue: self
                .status
                .next_rotation_at
                .as_ref()
                .is_some_and(|t| crate::plan::after(t.0, overdue_after) < now),
        };
        self.ctx.metrics.resources.observe(&self.obj.namespace().unwrap_or_default(), &self.obj.name_any(), &snapshot);
    }

    async fn note(&self, type_: EventType, reason: &str, note: String) {
        self.ctx.event(self.obj, type_, reason, note).await;
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::json;

    /// Status is the operator's alone: a write removes what anyone else added to it.
    #[test]
    fn the_status_patch_removes_fields_the_operator_did_not_write() {
        let stored = json!({
            "keys": [{"accessKeyId": "A"}, {"accessKeyId": "FORGED"}],
            "pendingCreate": {"since": "2020-01-01T00:00:00Z", "existingKeyIds": []},
            "rotation": {"serial": 1, "requestedAt": "forged"},
        });
        let ours = json!({"keys": [{"accessKeyId": "A"}], "rotation": {"serial": 1}});
        let patch = super::merge_patch(&stored, &ours);
        assert_eq!(
            patch,
            json!({"keys": [{"accessKeyId": "A"}], "pendingCreate": null, "rotation": {"serial": 1, "requestedAt": null}})
        );
        // Applying it (RFC 7396) gives exactly ours.
        let mut applied = stored.clone();
        json_merge(&mut applied, &patch);
        assert_eq!(applied, ours);
    }

    fn json_merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        json_merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    /// A last-use reading compares equal to the same reading after a round trip through the
    /// API server: otherwise every read writes status.
    #[test]
    fn a_sub_second_reading_survives_the_api_servers_precision() {
        let reading: jiff::Timestamp = "2026-11-28T10:11:12.345678Z".parse().unwrap();
        let recorded = Time(crate::plan::record::whole_seconds(reading));
        let stored: Time = serde_json::from_value(serde_json::to_value(&recorded).unwrap()).unwrap();
        assert_eq!(stored, recorded);
        let untruncated: Time = serde_json::from_value(serde_json::to_value(Time(reading)).unwrap()).unwrap();
        assert_ne!(untruncated, Time(reading), "the API server's precision is whole seconds");
    }
}
