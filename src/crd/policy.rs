//! `IamAccessKeyPolicy`: which namespaces may manage access keys of which IAM users.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Duration;

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
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".spec.rules[*]","priority":1}"#,
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
pub struct PolicyRule {
    /// Namespace names or globs (`team-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    /// Namespaces by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// IAM user names or globs; `{namespace}` stands for the resource's namespace
    /// (`{namespace}-*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_names: Option<Vec<String>>,
    /// IAM path prefix the user must be under, e.g. `/k8s/{namespace}/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/([\x21-\x7e]*/)?$"))]
    pub user_path_prefix: Option<String>,
    /// A tag the IAM user must carry; `{namespace}` may appear in the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_tag: Option<UserTagMatch>,
    /// Keys older than this are rotated, whatever the resource's own rotation says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_key_age: Option<Duration>,
    /// Keys not used for this long are deactivated (and reported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivate_unused_after: Option<Duration>,
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
