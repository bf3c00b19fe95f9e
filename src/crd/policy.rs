//! `IamAccessKeyPolicy`: which namespaces may manage access keys of which IAM users.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema, core::Rule};
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::{
    Duration, MIN_ROTATION_INTERVAL,
    access_key::syntax,
    duration::{at_least, not_shorter_than},
};

/// Cluster-wide rules, written by platform admins, that allow namespaces to manage access keys
/// of IAM users. An IamAccessKey no rule allows gets the condition NotAuthorized and no IAM write.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "iam.keyop.dev",
    version = "v1alpha1",
    kind = "IamAccessKeyPolicy",
    doc = "Cluster-wide rules (for platform admins) that allow namespaces to manage access keys of IAM users.",
    shortname = "iakp",
    category = "iam",
    status = "IamAccessKeyPolicyStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Overlap","type":"string","jsonPath":".status.conditions[?(@.type==\"GrantsOverlap\")].status","description":"True: two namespaces could manage the same IAM user (see the GrantsOverlap condition)"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.rules","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IamAccessKeyPolicySpec {
    /// Each rule allows a set of namespaces to manage a set of IAM users; a resource is allowed
    /// when any rule allows it.
    #[schemars(length(min = 1, max = 64))]
    pub rules: Vec<PolicyRule>,
}

/// Namespaces that may manage access keys of the IAM users this rule matches.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.namespaces) || has(self.namespaceSelector)").message("a rule needs namespaces or namespaceSelector"))]
#[x_kube(validation = Rule::new("has(self.userNames) || has(self.userPathPrefix) || has(self.userTag)").message("a rule needs userNames, userPathPrefix or userTag"))]
#[x_kube(validation = not_shorter_than("minRotationInterval", "maxKeyAge", "spec.rules[].maxKeyAge must not be shorter than the same rule's minRotationInterval: keys would have to rotate more often than the rule allows"))]
#[x_kube(validation = Rule::new("!has(self.allowPause) || !self.allowPause || (!has(self.maxKeyAge) && !has(self.deactivateUnusedAfter))").message("spec.rules[].allowPause cannot be combined with maxKeyAge or deactivateUnusedAfter: a paused resource is not reconciled, so those limits would not hold").field_path(".allowPause"))]
pub struct PolicyRule {
    /// Namespace names or globs (`team-*`): 1-63 lowercase letters, digits, `-`, `*` and `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63), regex(pattern = r"^[-a-z0-9*?]+$")))]
    pub namespaces: Option<Vec<String>>,
    /// Namespaces by label: `matchLabels`, and `matchExpressions` with the operators `In`,
    /// `NotIn` (both with values), `Exists` and `DoesNotExist` (both without).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "namespace_selector_schema")]
    pub namespace_selector: Option<LabelSelector>,
    /// IAM user names or globs; `{namespace}` stands for the resource's namespace
    /// (`{namespace}.*`: a dot, which no namespace name contains, so that namespace `data` cannot
    /// match the users of `data-ingest` as `{namespace}-*` would). 1-128 characters of letters,
    /// digits, `+=,.@_-`, `*`, `?`, `{` and `}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 128), regex(pattern = r"^[\w+=,.@*?{}-]+$")))]
    pub user_names: Option<Vec<String>>,
    /// IAM path prefix the user must be under, e.g. `/k8s/{namespace}/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/([\x21-\x7e]*/)?$"))]
    pub user_path_prefix: Option<String>,
    /// A tag the IAM user must carry; `{namespace}` may appear in the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_tag: Option<UserTagMatch>,
    /// Keys older than this are rotated, whatever the resource's own rotation says (at least
    /// 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = at_least("spec.rules[].maxKeyAge", MIN_ROTATION_INTERVAL, ": keys would rotate continuously"))]
    pub max_key_age: Option<Duration>,
    /// The shortest `spec.rotation.interval` the resources this rule allows may set. A resource
    /// with a shorter interval is refused (condition `PolicyViolation`, naming this policy) and
    /// nothing is written for it until the interval is lengthened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_rotation_interval: Option<Duration>,
    /// Keys not used for this long are deactivated (and reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivate_unused_after: Option<Duration>,
    /// What happens to the existing keys of a resource this rule allowed once no rule allows it
    /// any more (this rule removed or narrowed, the policy deleted, the namespace relabelled):
    /// `Keep` (default) leaves them as they are, `Deactivate` sets them Inactive in IAM,
    /// `Delete` deletes them and the Secret, as deleting the resource would. The resource
    /// records the choice in `status.grant`, so it applies after the rule is gone.
    #[serde(default)]
    pub on_revoke: OnRevoke,
    /// Whether the resources this rule allows may pause themselves with the annotation
    /// `iam.keyop.dev/paused: "true"`, which stops every IAM and Secret write for them, their
    /// deletion included. Default false: the annotation is ignored (condition PolicyOverride
    /// says so). Cannot be combined with maxKeyAge or deactivateUnusedAfter. When several rules
    /// allow a resource, all of them must allow pausing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_pause: bool,
    /// Whether the resources this rule allows may set `deletionPolicy: Retain`, which keeps their
    /// IAM keys when they are deleted. Default false: their keys are deleted with them (condition
    /// PolicyOverride says so beforehand). When several rules allow a resource, all of them must
    /// allow it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_retain: bool,
    /// Whether the resources this rule allows may take over an access key made outside the
    /// operator (`spec.adopt`): a key of the user, held in a Secret of their namespace, that
    /// carries no other owner's tag and authenticates as the user. Default false: such a
    /// resource waits with the condition AdoptionRefused. When several rules allow a resource,
    /// all of them must allow it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_adoption: bool,
    /// Whether the resources this rule allows may write their entries into a Secret someone
    /// else owns (`spec.secret.creationPolicy: Merge`). Default false: such a resource waits
    /// with the condition MergeNotAllowed and nothing is written. When several rules allow a
    /// resource, all of them must allow it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_secret_merge: bool,
    /// The AWS account the users of this rule live in: an IAM role there that the operator
    /// assumes to manage their keys (docs/accounts.md). Absent: the operator's own account and
    /// identity. Tenants never name a role; a resource two rules with different accounts allow
    /// is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountRole>,
}

/// An IAM role in the account where a rule's users live, assumed with STS AssumeRole.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountRole {
    /// The role's ARN, `arn:aws:iam::<account id>:role/<path and name>`.
    #[schemars(length(max = 2048), regex(pattern = r"^arn:aws(-[a-z]+)*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$"))]
    pub role_arn: String,
    /// The external ID the role's trust policy asks for (`sts:ExternalId`): 2-1224 letters,
    /// digits and `+=,.@:/-`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 1224), regex(pattern = r"^[\w+=,.@:/-]+$"))]
    pub external_id: Option<String>,
    /// The most IAM calls per second the operator makes in this account (the adaptive rate's
    /// ceiling, or a lower fixed rate); default `--iam-rate-max`. Rules naming the same account
    /// share one rate: the lowest ceiling holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub iam_rate_max: Option<u32>,
}

impl AccountRole {
    /// The account id the role ARN names.
    pub fn account_id(&self) -> &str {
        self.role_arn.split(':').nth(4).unwrap_or_default()
    }

    /// Same role and external ID: the same account and credentials (the rate ceiling aside).
    pub fn same_identity(&self, other: &AccountRole) -> bool {
        self.role_arn == other.role_arn && self.external_id == other.external_id
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a revoked grant does to the keys it allowed.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, schemars::JsonSchema,
)]
pub enum OnRevoke {
    /// Leave the keys as they are: they keep working until the resource is deleted.
    #[default]
    Keep,
    /// Set the keys Inactive in IAM (they come back when a rule allows the resource again).
    Deactivate,
    /// Delete the keys and the Secret.
    Delete,
}

impl OnRevoke {
    pub fn as_str(self) -> &'static str {
        match self {
            OnRevoke::Keep => "Keep",
            OnRevoke::Deactivate => "Deactivate",
            OnRevoke::Delete => "Delete",
        }
    }
}

/// What the operator found when it last checked the policy. Written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IamAccessKeyPolicyStatus {
    /// The policy generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: the rules can be applied as written (False, reason `InvalidRule` or
    /// `Unreadable`, names what cannot). `GrantsOverlap`: True (reason `OverlappingGrants`) when
    /// two existing namespaces, by this policy's rules or by them and another policy's, could
    /// manage the same IAM user; the message names the namespaces, rules and an example user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Number of rules (the `Rules` column of `kubectl get -o wide`: a JSONPath cannot count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<i64>,
}

/// An IAM user tag to match.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct UserTagMatch {
    /// Tag key.
    #[schemars(length(min = 1, max = 128))]
    pub key: String,
    /// Tag value; `{namespace}` stands for the resource's namespace.
    #[schemars(length(max = 256))]
    pub value: String,
}

/// Kubernetes' label selector schema, bounded (so that the API server can afford its CEL rules
/// on every rule of a policy) and checked: operators, values, and label syntax.
fn namespace_selector_schema(_: &mut SchemaGenerator) -> Schema {
    let values_match_operator =
        Rule::new("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)")
            .message("In and NotIn need values, Exists and DoesNotExist take none");
    let key_syntax = Rule::new(format!("self.key.matches('{}')", syntax::LABEL_KEY)).message(
        "key must be a label key: an optional DNS subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit",
    );
    let labels_syntax = Rule::new(format!("self.all(k, k.matches('{}'))", syntax::LABEL_KEY)).message(
        "matchLabels keys must be label keys: an optional DNS subdomain prefix and '/', then 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit",
    );
    // Values by pattern: a CEL rule over every value of every expression of every rule costs
    // more than the API server allows.
    let label_value = json_schema!({"type": "string", "maxLength": 63, "pattern": syntax::LABEL_VALUE});
    json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-map-type": "atomic",
        "properties": {
            "matchExpressions": {
                "description": "Label selector requirements (at most 16), ANDed.",
                "type": "array",
                "maxItems": 16,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "description": "The label key that the requirement applies to.",
                            "type": "string",
                            "maxLength": 317,
                        },
                        "operator": {
                            "description": "`In`, `NotIn` (with values), `Exists` or `DoesNotExist` (without).",
                            "type": "string",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                        },
                        "values": {
                            "description": "Label values (at most 64): non-empty for `In` and `NotIn`, absent for `Exists` and `DoesNotExist`.",
                            "type": "array",
                            "maxItems": 64,
                            "items": label_value,
                        },
                    },
                    "x-kubernetes-validations": [values_match_operator, key_syntax],
                },
            },
            "matchLabels": {
                "description": "Labels (at most 16) the namespace must carry, with these values.",
                "type": "object",
                "maxProperties": 16,
                "additionalProperties": label_value,
                "x-kubernetes-validations": [labels_syntax],
            },
        },
    })
}
