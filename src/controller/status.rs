//! The conditions in status: `Ready` and `PolicyOverride`.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{
    crd::{IamAccessKey, IamAccessKeyStatus},
    policy::Overrides,
};

/// Set the `Ready` condition; the transition time only moves when the status flips.
pub fn set_ready(status: &mut IamAccessKeyStatus, obj: &IamAccessKey, ready: bool, reason: &str, message: String) {
    let value = if ready { "True" } else { "False" };
    let previous = status.conditions.iter().find(|c| c.type_ == "Ready");
    let last_transition_time = match previous {
        Some(p) if p.status == value => p.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    let condition = Condition {
        type_: "Ready".into(),
        status: value.into(),
        reason: reason.into(),
        message,
        observed_generation: obj.metadata.generation,
        last_transition_time,
    };
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.push(condition);
}

/// Condition type (and event reason) saying what of a resource's settings the policies overrule.
pub const POLICY_OVERRIDE: &str = "PolicyOverride";

/// Set the `PolicyOverride` condition (`True`, reason `PauseNotAllowed` or `RetainNotAllowed`,
/// each overruled setting in the message), or remove it when nothing is overruled. Whether it
/// changed.
pub fn set_policy_override(status: &mut IamAccessKeyStatus, obj: &IamAccessKey, overrides: &Overrides) -> bool {
    let previous = status.conditions.iter().find(|c| c.type_ == POLICY_OVERRIDE).cloned();
    let Some(reason) = overrides.reason() else {
        status.conditions.retain(|c| c.type_ != POLICY_OVERRIDE);
        return previous.is_some();
    };
    let message = overrides.message();
    let same = |p: &Condition| p.message == message && p.reason == reason;
    if previous.as_ref().is_some_and(|p| same(p) && p.observed_generation == obj.metadata.generation) {
        return false;
    }
    let changed = previous.as_ref().is_none_or(|p| !same(p));
    let condition = Condition {
        type_: POLICY_OVERRIDE.into(),
        status: "True".into(),
        reason: reason.into(),
        message,
        observed_generation: obj.metadata.generation,
        last_transition_time: previous.map_or_else(|| Time(Timestamp::now()), |p| p.last_transition_time),
    };
    status.conditions.retain(|c| c.type_ != POLICY_OVERRIDE);
    status.conditions.push(condition);
    changed
}
