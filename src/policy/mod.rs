//! Tenancy: which namespaces may manage access keys of which IAM users (pure).
//!
//! Default deny: a resource is allowed only when some `IamAccessKeyPolicy` rule matches both its
//! namespace (name glob or label selector) and its IAM user (name glob, path prefix, user tag;
//! `{namespace}` in a pattern stands for the resource's namespace). Several matching rules
//! combine to the strictest limits.

#[cfg(test)]
mod grant_tests;
pub mod overlap;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

use crate::crd::{
    AccountRole, DeletionPolicy, Duration, IamAccessKeyPolicy, IamAccessKeySpec, OnRevoke, PAUSED_ANNOTATION,
    PolicyRule,
};

/// The namespace a resource lives in.
pub struct NamespaceFacts<'a> {
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

/// The IAM user a resource names; path and tags are known only once read from IAM.
pub struct UserFacts<'a> {
    pub name: &'a str,
    pub details: Option<(&'a str, &'a BTreeMap<String, String>)>,
}

/// Limits the matching rules put on the keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Policies whose rules allowed the resource (for messages).
    pub policies: Vec<String>,
    pub max_key_age: Option<Duration>,
    pub deactivate_unused_after: Option<Duration>,
    /// The longest `minRotationInterval` of the matching rules, and the policy that sets it.
    pub min_rotation_interval: Option<(Duration, String)>,
    /// The rule the resource records as its grant.
    pub granting_rule: Option<GrantingRule>,
    /// Policies with a matching rule that does not allow pausing (`allowPause`); empty: the
    /// resource may pause.
    pub pause_refused_by: Vec<String>,
    /// Policies with a matching rule that does not allow `deletionPolicy: Retain`
    /// (`allowRetain`); empty: the resource may retain its keys.
    pub retain_refused_by: Vec<String>,
    /// Policies with a matching rule that does not allow taking over what exists: adopting a
    /// key made outside the operator (`allowAdoption`), writing into a Secret the resource does
    /// not own (`allowSecretMerge`). One list, to keep `Limits` small.
    pub takeover_refused_by: Vec<(Takeover, String)>,
    /// The account the matching rules name (`None`: the operator's own), with the lowest
    /// `iamRateMax` among them.
    pub account: Option<AccountRole>,
}

/// What exists already and a resource may take over, where every matching rule allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// `spec.adopt` (`allowAdoption`).
    Adoption,
    /// `spec.secret.creationPolicy: Merge` (`allowSecretMerge`).
    Merge,
}

/// The rule whose grant a resource records: of the matching rules, the one with the strictest
/// `onRevoke` (`Delete`, then `Deactivate`, then `Keep`); among equals, the first by policy name
/// and rule index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantingRule {
    pub policy: String,
    /// Index in the policy's `spec.rules`.
    pub rule: usize,
    pub on_revoke: OnRevoke,
}

impl GrantingRule {
    fn stricter_than(&self, other: &GrantingRule) -> bool {
        (std::cmp::Reverse(self.on_revoke), &self.policy, self.rule)
            < (std::cmp::Reverse(other.on_revoke), &other.policy, other.rule)
    }
}

impl Limits {
    /// Whether the resource's own settings keep within the limits; otherwise a message naming
    /// the policy and the fix.
    pub fn check(&self, spec: &IamAccessKeySpec) -> Result<(), String> {
        let interval = spec.rotation.as_ref().and_then(|r| r.interval);
        match (&self.min_rotation_interval, interval) {
            (Some((min, policy)), Some(interval)) if interval < *min => Err(format!(
                "spec.rotation.interval {interval} is shorter than {min}, the minimum rotation interval IamAccessKeyPolicy {policy:?} sets for this namespace: lengthen the interval (or remove it and rotate on request)"
            )),
            _ => Ok(()),
        }
    }

    /// Whether the paused annotation holds: every matching rule allows pausing, and no limit
    /// (which a paused resource would escape) applies.
    pub fn pause_allowed(&self) -> bool {
        self.pause_refused_by.is_empty() && self.max_key_age.is_none() && self.deactivate_unused_after.is_none()
    }

    pub fn retain_allowed(&self) -> bool {
        self.retain_refused_by.is_empty()
    }

    /// Whether the resource may take this over: some rule allows the resource, and every one
    /// that does allows it.
    pub fn takeover_allowed(&self, what: Takeover) -> bool {
        !self.policies.is_empty() && self.takeover_refused_by.iter().all(|(w, _)| *w != what)
    }

    /// The policies with a rule that refuses it (all that allow the resource, if none does).
    pub fn takeover_refused_by(&self, what: Takeover) -> Vec<String> {
        let refusing: Vec<String> =
            self.takeover_refused_by.iter().filter(|(w, _)| *w == what).map(|(_, p)| p.clone()).collect();
        if refusing.is_empty() { self.policies.clone() } else { refusing }
    }

    /// The deletion policy that applies: `Retain` only where every matching rule allows it.
    pub fn deletion_policy(&self, spec: &IamAccessKeySpec) -> DeletionPolicy {
        match spec.deletion_policy {
            DeletionPolicy::Retain if self.retain_allowed() => DeletionPolicy::Retain,
            _ => DeletionPolicy::Delete,
        }
    }

    /// What of the resource's own settings the policies overrule, each with the policy that does
    /// and the fix.
    pub fn overrides(&self, spec: &IamAccessKeySpec, paused: bool) -> Overrides {
        let pause = (paused && !self.pause_allowed()).then(|| {
            let refused_by = if self.pause_refused_by.is_empty() { &self.policies } else { &self.pause_refused_by };
            format!(
                "the annotation {PAUSED_ANNOTATION}=true is ignored: IamAccessKeyPolicy {} does not allow pausing \
                 (spec.rules[].allowPause), so this resource is still reconciled and its deletion still removes its keys; \
                 remove the annotation, or ask a platform admin for allowPause in every rule that allows this resource",
                names(refused_by)
            )
        });
        let retain = (spec.deletion_policy == DeletionPolicy::Retain && !self.retain_allowed()).then(|| {
            format!(
                "deletionPolicy Retain is not allowed by IamAccessKeyPolicy {} (spec.rules[].allowRetain): the access keys \
                 will be deleted with this resource; set deletionPolicy: Delete, or ask a platform admin for allowRetain",
                names(&self.retain_refused_by)
            )
        });
        Overrides { pause, retain }
    }
}

/// What the policies overrule of a resource's settings: each a message naming the policy and
/// the fix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// The paused annotation is ignored.
    pub pause: Option<String>,
    /// `deletionPolicy: Retain` is treated as `Delete`.
    pub retain: Option<String>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        self.pause.is_none() && self.retain.is_none()
    }

    /// The condition's reason: `PauseNotAllowed` whenever the pause is ignored (tools that read
    /// the annotation, such as the Argo CD health check, look for it), else `RetainNotAllowed`.
    pub fn reason(&self) -> Option<&'static str> {
        if self.pause.is_some() {
            Some("PauseNotAllowed")
        } else if self.retain.is_some() {
            Some("RetainNotAllowed")
        } else {
            None
        }
    }

    pub fn message(&self) -> String {
        self.pause.iter().chain(&self.retain).cloned().collect::<Vec<_>>().join("; ")
    }
}

/// `"a"`, or `"a", "b"`.
fn names(policies: &[String]) -> String {
    policies.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
}

fn note_policy(list: &mut Vec<String>, policy: String) {
    if !list.contains(&policy) {
        list.push(policy);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // one per reconcile, moved rarely
pub enum Decision {
    Allowed(Limits),
    Denied(String),
    /// A rule for this namespace depends on the user's IAM path or tags: read the user, ask again.
    NeedUserDetails,
    /// Rules naming different AWS accounts allow the resource (which ones, and the fix).
    AccountConflict(String),
}

/// The decision of every rule, whatever account it names (`kubectl iak why`).
pub fn authorize(policies: &[Arc<IamAccessKeyPolicy>], ns: &NamespaceFacts, user: &UserFacts) -> Decision {
    authorize_where(policies, ns, user, |_| true)
}

/// The decision of the rules that name `account` (`None`: the operator's own), with the user as
/// that account shows it.
pub fn authorize_in(
    policies: &[Arc<IamAccessKeyPolicy>],
    ns: &NamespaceFacts,
    user: &UserFacts,
    account: Option<&AccountRole>,
) -> Decision {
    let mut decision = authorize_where(policies, ns, user, |rule| same_account(rule.account.as_ref(), account));
    if let Decision::Allowed(limits) = &mut decision {
        limits.account = account.cloned();
        if let Some(role) = &mut limits.account {
            role.iam_rate_max = account_ceiling(policies, role.account_id());
        }
    }
    decision
}

/// The lowest `iamRateMax` of every rule naming a role in `account_id`, whatever namespaces it
/// is for: the account has one rate limiter, so every resource acting there must ask for the
/// same ceiling (a ceiling per namespace would replace the limiter back and forth).
fn account_ceiling(policies: &[Arc<IamAccessKeyPolicy>], account_id: &str) -> Option<u32> {
    let roles = policies.iter().flat_map(|p| &p.spec.rules).filter_map(|r| r.account.as_ref());
    roles.filter(|role| role.account_id() == account_id).filter_map(|role| role.iam_rate_max).min()
}

fn same_account(a: Option<&AccountRole>, b: Option<&AccountRole>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same_identity(b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

fn matching_rules<'a>(
    policies: &'a [Arc<IamAccessKeyPolicy>],
    ns: &'a NamespaceFacts,
) -> impl Iterator<Item = &'a PolicyRule> {
    policies.iter().flat_map(|p| &p.spec.rules).filter(move |rule| namespace_matches(rule, ns))
}

/// The accounts the rules for this namespace name, each once (`None`: the operator's own), in
/// a stable order: where a user has to be looked up to decide.
pub fn accounts(policies: &[Arc<IamAccessKeyPolicy>], ns: &NamespaceFacts) -> Vec<Option<AccountRole>> {
    let mut accounts: Vec<Option<AccountRole>> = vec![];
    for rule in matching_rules(policies, ns) {
        let named = rule.account.as_ref().map(|r| AccountRole { iam_rate_max: None, ..r.clone() });
        if !accounts.iter().any(|a| same_account(a.as_ref(), named.as_ref())) {
            accounts.push(named);
        }
    }
    accounts.sort();
    accounts
}

/// Several accounts' decisions made one: allowed in exactly one account is allowed there; in
/// none is denied; in several is refused, naming the rules, rather than guessing.
pub fn combine(decisions: Vec<Decision>, ns: &NamespaceFacts, user: &str) -> Decision {
    let mut allowed: Vec<Limits> = vec![];
    let mut denial = None;
    for decision in decisions {
        match decision {
            Decision::Allowed(limits) => allowed.push(limits),
            Decision::NeedUserDetails => return Decision::NeedUserDetails,
            Decision::Denied(message) => denial = denial.or(Some(message)),
            conflict @ Decision::AccountConflict(_) => return conflict,
        }
    }
    match allowed.len() {
        0 => Decision::Denied(denial.unwrap_or_else(|| denied_message(ns.name, user))),
        1 => Decision::Allowed(allowed.remove(0)),
        _ => {
            let each = allowed
                .iter()
                .map(|l| {
                    let rule = l
                        .granting_rule
                        .as_ref()
                        .map_or(String::new(), |g| format!("IamAccessKeyPolicy {:?} rules[{}]", g.policy, g.rule));
                    let account = l
                        .account
                        .as_ref()
                        .map_or("the operator's own account".to_string(), |r| format!("role {}", r.role_arn));
                    format!("{rule} ({account})")
                })
                .collect::<Vec<_>>();
            Decision::AccountConflict(format!(
                "rules that name different AWS accounts allow namespace {:?} to manage IAM user {user:?}: {}; the operator does not guess: a platform admin must make one account's rules exclude this user",
                ns.name,
                each.join(", ")
            ))
        }
    }
}

fn denied_message(namespace: &str, user: &str) -> String {
    format!(
        "no IamAccessKeyPolicy allows namespace {namespace:?} to manage access keys of IAM user {user:?}: ask a platform admin for a policy rule"
    )
}

fn authorize_where(
    policies: &[Arc<IamAccessKeyPolicy>],
    ns: &NamespaceFacts,
    user: &UserFacts,
    considered: impl Fn(&PolicyRule) -> bool,
) -> Decision {
    let mut limits = Limits::default();
    let mut undecided = false;
    for policy in policies {
        for (index, rule) in policy.spec.rules.iter().enumerate() {
            if !namespace_matches(rule, ns) || !considered(rule) {
                continue;
            }
            match user_matches(rule, ns.name, user) {
                Some(true) => {
                    note_policy(&mut limits.policies, policy.name_any());
                    // A rule with limits cannot allow pausing (the schema refuses it too).
                    let limited = rule.max_key_age.is_some() || rule.deactivate_unused_after.is_some();
                    if !rule.allow_pause || limited {
                        note_policy(&mut limits.pause_refused_by, policy.name_any());
                    }
                    if !rule.allow_retain {
                        note_policy(&mut limits.retain_refused_by, policy.name_any());
                    }
                    for (what, allowed) in
                        [(Takeover::Adoption, rule.allow_adoption), (Takeover::Merge, rule.allow_secret_merge)]
                    {
                        let refusal = (what, policy.name_any());
                        if !allowed && !limits.takeover_refused_by.contains(&refusal) {
                            limits.takeover_refused_by.push(refusal);
                        }
                    }
                    limits.max_key_age = strictest(limits.max_key_age, rule.max_key_age);
                    limits.deactivate_unused_after =
                        strictest(limits.deactivate_unused_after, rule.deactivate_unused_after);
                    if let Some(min) = rule.min_rotation_interval
                        && limits.min_rotation_interval.as_ref().is_none_or(|(longest, _)| min > *longest)
                    {
                        limits.min_rotation_interval = Some((min, policy.name_any()));
                    }
                    let granting = GrantingRule { policy: policy.name_any(), rule: index, on_revoke: rule.on_revoke };
                    if limits.granting_rule.as_ref().is_none_or(|held| granting.stricter_than(held)) {
                        limits.granting_rule = Some(granting);
                    }
                }
                Some(false) => {}
                None => undecided = true,
            }
        }
    }
    // Limits come from every matching rule, so all must be decided before allowing.
    if undecided {
        Decision::NeedUserDetails
    } else if limits.policies.is_empty() {
        Decision::Denied(denied_message(ns.name, user.name))
    } else {
        Decision::Allowed(limits)
    }
}

/// How one policy rule judges a namespace/user pair: what `kubectl iak why` prints for each rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleVerdict {
    pub policy: String,
    /// Index in the policy's `spec.rules`.
    pub rule: usize,
    pub outcome: RuleOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleOutcome {
    /// The rule allows the pair.
    Allows,
    /// The rule is not about this namespace (why).
    OtherNamespace(String),
    /// The namespace matches, the user does not (why).
    OtherUser(String),
    /// The namespace matches; the user's IAM path or tags decide (which).
    NeedsUserDetails(String),
}

/// Each rule of each policy on a namespace/user pair, by the same matching [`authorize`] uses;
/// `authorize` combines them into the decision.
pub fn explain(policies: &[Arc<IamAccessKeyPolicy>], ns: &NamespaceFacts, user: &UserFacts) -> Vec<RuleVerdict> {
    let mut verdicts = vec![];
    for policy in policies {
        for (index, rule) in policy.spec.rules.iter().enumerate() {
            let outcome = if !namespace_matches(rule, ns) {
                let mut by = vec![];
                if let Some(names) = &rule.namespaces {
                    by.push(format!("namespaces {names:?}"));
                }
                if rule.namespace_selector.is_some() {
                    by.push("namespaceSelector (the namespace's labels do not match)".to_string());
                }
                RuleOutcome::OtherNamespace(format!("namespace {:?} matches neither of {}", ns.name, by.join(" and ")))
            } else {
                match user_matches(rule, ns.name, user) {
                    Some(true) => RuleOutcome::Allows,
                    Some(false) => RuleOutcome::OtherUser(user_mismatch(rule, ns.name, user)),
                    None => RuleOutcome::NeedsUserDetails(user_criteria(rule, ns.name)),
                }
            };
            verdicts.push(RuleVerdict { policy: policy.name_any(), rule: index, outcome });
        }
    }
    verdicts
}

/// The user criteria of a rule, with `{namespace}` expanded.
fn user_criteria(rule: &PolicyRule, namespace: &str) -> String {
    let expand = |pattern: &str| pattern.replace("{namespace}", namespace);
    let mut parts = vec![];
    if let Some(names) = &rule.user_names {
        parts.push(format!("userNames {:?}", names.iter().map(|p| expand(p)).collect::<Vec<_>>()));
    }
    if let Some(prefix) = &rule.user_path_prefix {
        parts.push(format!("userPathPrefix {:?}", expand(prefix)));
    }
    if let Some(tag) = &rule.user_tag {
        parts.push(format!("userTag {}={:?}", tag.key, expand(&tag.value)));
    }
    parts.join(", ")
}

fn user_mismatch(rule: &PolicyRule, namespace: &str, user: &UserFacts) -> String {
    let expand = |pattern: &str| pattern.replace("{namespace}", namespace);
    let mut failed = vec![];
    if let Some(names) = &rule.user_names
        && !names.iter().any(|p| glob_matches(&expand(p), user.name))
    {
        failed.push(format!(
            "user {:?} matches none of userNames {:?}",
            user.name,
            names.iter().map(|p| expand(p)).collect::<Vec<_>>()
        ));
    }
    if let Some((path, tags)) = user.details {
        if let Some(prefix) = &rule.user_path_prefix
            && !path.starts_with(&expand(prefix))
        {
            failed.push(format!("path {path:?} is not under userPathPrefix {:?}", expand(prefix)));
        }
        if let Some(tag) = &rule.user_tag
            && tags.get(&tag.key).is_none_or(|v| *v != expand(&tag.value))
        {
            failed.push(format!("the user has no tag {}={:?}", tag.key, expand(&tag.value)));
        }
    }
    failed.join("; ")
}

fn strictest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub(crate) fn namespace_matches(rule: &PolicyRule, ns: &NamespaceFacts) -> bool {
    let by_name = rule.namespaces.iter().flatten().any(|pattern| glob_matches(pattern, ns.name));
    let by_labels = rule.namespace_selector.as_ref().is_some_and(|s| selector_matches(s, ns.labels));
    by_name || by_labels
}

/// Every criterion the rule sets must hold. `None`: it depends on details not read yet.
fn user_matches(rule: &PolicyRule, namespace: &str, user: &UserFacts) -> Option<bool> {
    let expand = |pattern: &str| pattern.replace("{namespace}", namespace);
    if let Some(names) = &rule.user_names
        && !names.iter().any(|p| glob_matches(&expand(p), user.name))
    {
        return Some(false);
    }
    if rule.user_path_prefix.is_none() && rule.user_tag.is_none() {
        return Some(true);
    }
    let (path, tags) = user.details?;
    let path_ok = rule.user_path_prefix.as_ref().is_none_or(|prefix| path.starts_with(&expand(prefix)));
    let tag_ok = rule.user_tag.as_ref().is_none_or(|t| tags.get(&t.key).is_some_and(|v| *v == expand(&t.value)));
    Some(path_ok && tag_ok)
}

/// What in a policy's rules cannot work as written (empty: nothing), each naming its field.
/// The schema refuses most mistakes; these are the ones it cannot see.
pub fn rule_problems(policy: &IamAccessKeyPolicy) -> Vec<String> {
    let mut problems = vec![];
    // A namespace name for trying patterns: the shortest there is.
    let expand = |pattern: &str| pattern.replace("{namespace}", "a");
    let unknown_placeholder = |pattern: &str| {
        let rest = pattern.replace("{namespace}", "");
        (rest.contains('{') || rest.contains('}')).then_some(())
    };
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        for (j, pattern) in rule.user_names.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}].userNames[{j}] {pattern:?}");
            if unknown_placeholder(pattern).is_some() {
                problems.push(format!(
                    "{field}: only {{namespace}} is replaced, and IAM user names cannot contain braces: it matches no user"
                ));
            } else if overlap::glob_intersection(&expand(pattern), "*").is_none() {
                problems.push(format!("{field} matches no IAM user name (1-64 letters, digits and +=,.@_-)"));
            }
        }
        if let Some(prefix) = &rule.user_path_prefix
            && unknown_placeholder(prefix).is_some()
        {
            problems.push(format!(
                "spec.rules[{i}].userPathPrefix {prefix:?}: only {{namespace}} is replaced; any other placeholder is matched literally, braces included"
            ));
        }
        if let Some(tag) = &rule.user_tag
            && unknown_placeholder(&tag.value).is_some()
        {
            problems.push(format!(
                "spec.rules[{i}].userTag.value {:?}: only {{namespace}} is replaced, and IAM tag values cannot contain braces: it matches no user",
                tag.value
            ));
        }
    }
    problems
}

/// `*` matches any run of characters, `?` any one character; everything else literally.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if let Some((star, matched)) = backtrack {
            // Let the last `*` swallow one more character and retry.
            pi = star + 1;
            ti = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}
