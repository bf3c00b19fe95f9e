//! `IamAccessKey`: one IAM user's access key, published in a Secret of the same namespace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema, core::Rule};
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use super::{
    Duration,
    duration::{at_least, longer_than},
};

/// The shortest `rotation.interval` (and policy `maxKeyAge`): it keeps the operator out of a loop
/// of rotations, and is short enough for tests. A platform team sets a real floor with a
/// policy's `minRotationInterval`.
pub const MIN_ROTATION_INTERVAL: Duration = Duration::from_secs(5);

/// The shortest `rotation.usageCheckInterval`: last-use reads are IAM calls.
pub const MIN_USAGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A DNS-1123 subdomain (object names: Secrets, Deployments, ...); at most 253 characters.
pub const DNS1123_SUBDOMAIN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Most bytes of `spec.secret.annotations` (keys and values): half of what a Secret's
/// annotations may hold, leaving room for the operator's own and other tools'.
pub const MAX_ANNOTATIONS_SIZE: usize = 128 * 1024;

/// Most entries of `spec.secret.template.data`.
pub const MAX_TEMPLATE_ENTRIES: usize = 32;
/// Longest template of one entry, in characters.
pub const MAX_TEMPLATE_LENGTH: usize = 16 * 1024;
/// Most characters of all of a template's entries together.
pub const MAX_TEMPLATES_SIZE: usize = 64 * 1024;

/// CEL regexes of Kubernetes label and annotation syntax (`[.]` rather than an escaped dot, so
/// that they sit in a CEL string literal as they are).
pub(crate) mod syntax {
    /// The name part of a qualified name: 1-63 characters, alphanumeric at both ends.
    macro_rules! name {
        () => {
            "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
        };
    }
    /// A label key: an optional DNS-1123 subdomain prefix and `/`, then a name.
    pub const LABEL_KEY: &str =
        concat!("^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?", name!(), "$");
    /// An annotation key: as a label key, but the API server lowercases the prefix before it
    /// checks it.
    pub const ANNOTATION_KEY: &str = concat!(
        "^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*/)?",
        name!(),
        "$"
    );
    /// A label value: empty, or a name (at most 63 characters).
    pub const LABEL_VALUE: &str = concat!("^(", name!(), ")?$");
    /// A key of a Secret's data (the API server also refuses `.`, `..` and a leading `..`).
    pub const DATA_KEY: &str = "^[-._a-zA-Z0-9]+$";
}

/// The desired state of an IAM access key and the Secret that carries it.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "iam.keyop.dev",
    version = "v1alpha1",
    kind = "IamAccessKey",
    namespaced,
    doc = "An AWS IAM access key for an IAM user, kept in a Secret of the same namespace: created, activated or deactivated, rotated with overlap, and deleted with the resource.",
    status = "IamAccessKeyStatus",
    shortname = "iak",
    category = "iam",
    printcolumn = r#"{"name":"User","type":"string","jsonPath":".spec.userName"}"#,
    printcolumn = r#"{"name":"Key ID","type":"string","jsonPath":".status.accessKeyId"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.keyStatus"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Last Used","type":"date","jsonPath":".status.lastUsed.date"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = super::adopt::adopt_in_place_needs_a_policy()
)]
#[serde(rename_all = "camelCase")]
pub struct IamAccessKeySpec {
    /// Name of the IAM user that owns the access key (1-64 characters from letters, digits and
    /// `+=,.@_-`). The user must already exist. Immutable: to move to another user, create a new
    /// IamAccessKey.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.userName is immutable: create a new IamAccessKey for another user"))]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[\w+=,.@-]+$"))]
    pub user_name: String,

    /// Desired status of the current access key: `Active` (usable) or `Inactive` (kept, but AWS
    /// refuses requests signed with it). Default `Active`.
    #[serde(default)]
    pub key_status: KeyStatus,

    /// The Secret (in this resource's namespace) that receives the access key.
    #[serde(default)]
    pub secret: SecretSpec,

    /// When and how to replace the access key with a new one. Absent: rotate only on request
    /// (annotation `iam.keyop.dev/rotate-requested-at`) or when the Secret is lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,

    /// Workloads in this namespace restarted (rollout) whenever the Secret receives a new key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub restart_targets: Vec<RestartTarget>,

    /// What happens to the IAM access keys when this resource is deleted: `Delete` them (default)
    /// or `Retain` them in IAM (the Secret is deleted either way). `Retain` holds only where the
    /// IamAccessKeyPolicy rules that allow this resource allow it (`allowRetain`); otherwise the
    /// keys are deleted, and the condition PolicyOverride says so beforehand.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// An access key made outside the operator (by Terraform, Crossplane, Vault or by hand) to
    /// take over as this resource's first key, read from a Secret of this namespace: it must be
    /// one of the user's keys, carry no other owner's tag and authenticate as the user (STS);
    /// then it is tagged as this resource's, published in `spec.secret`'s layout and managed
    /// like a key the operator created (rotation, deletion). Read only before the resource's
    /// first key; only where an IamAccessKeyPolicy rule allows it (`allowAdoption`). A key that
    /// cannot be taken over is refused (condition AdoptionRefused, naming why) and nothing is
    /// changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt: Option<super::AdoptSpec>,
}

/// Whether AWS accepts requests signed with the key.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum KeyStatus {
    #[default]
    Active,
    Inactive,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "Active",
            KeyStatus::Inactive => "Inactive",
        }
    }
}

/// What happens to the IAM keys when the resource is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

/// The Secret that carries the key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.template) || self.format == 'Env'").message("spec.secret.format cannot be combined with spec.secret.template: the template is the whole layout (remove format)"))]
#[x_kube(validation = secret_type_kept())]
#[x_kube(validation = super::adopt::merge_writes_data_only())]
#[x_kube(validation = super::adopt::creation_policy_kind_kept())]
pub struct SecretSpec {
    /// Name of the Secret, in this resource's namespace (a DNS-1123 subdomain: lowercase letters,
    /// digits, `-` and `.`). Default: the resource's name. A Secret of that name that this
    /// resource did not create is never overwritten (condition SecretConflict), unless
    /// `creationPolicy` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub name: Option<String>,

    /// Layout of the Secret's data: `Env` (keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`,
    /// for `envFrom`) or `CredentialsFile` (one key `credentials` holding an AWS shared
    /// credentials file, for a volume mount with `AWS_SHARED_CREDENTIALS_FILE`). Default `Env`.
    #[serde(default)]
    pub format: SecretFormat,

    /// Profile name used in the `CredentialsFile` format (and `profile` in a template). Default
    /// `default`.
    #[serde(default = "default_profile")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.-]+$"))]
    pub profile: String,

    /// Extra labels put on the Secret (at most 32), in Kubernetes label syntax: keys are an
    /// optional DNS subdomain prefix and `/`, then 1-63 letters, digits, `-`, `_` or `.` that
    /// start and end with a letter or digit; values are empty or such a name.
    /// `app.kubernetes.io/managed-by` is always `iam-key-operator`, and Argo CD's tracking label
    /// is never copied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "labels_schema")]
    #[x_kube(validation = Rule::new("!('app.kubernetes.io/managed-by' in self) && !('app.kubernetes.io/instance' in self)").message("spec.secret.labels must not set app.kubernetes.io/managed-by (always iam-key-operator) or app.kubernetes.io/instance (Argo CD's tracking label)"))]
    #[x_kube(validation = Rule::new(format!("self.all(k, k.matches('{}') && k.lastIndexOf('/') <= 253)", syntax::LABEL_KEY)).message("spec.secret.labels: every key must be a Kubernetes label key: an optional DNS subdomain prefix of lowercase letters, digits, '-' and '.' with a '/' (e.g. example.com/), then 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit"))]
    #[x_kube(validation = Rule::new(format!("self.all(k, self[k].matches('{}'))", syntax::LABEL_VALUE)).message("spec.secret.labels: every value must be empty or 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit (use spec.secret.annotations for free text)"))]
    pub labels: BTreeMap<String, String>,

    /// Extra annotations put on the Secret (at most 32; the `iam.keyop.dev/` prefix is
    /// reserved). Keys follow the label key syntax; values are free text, at most 128 KiB
    /// together with the keys.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "annotations_schema")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('iam.keyop.dev/') && k != 'argocd.argoproj.io/tracking-id')").message("spec.secret.annotations must not use the iam.keyop.dev/ prefix or argocd.argoproj.io/tracking-id"))]
    #[x_kube(validation = Rule::new(format!("self.all(k, k.matches('{}') && k.lastIndexOf('/') <= 253)", syntax::ANNOTATION_KEY)).message("spec.secret.annotations: every key must be a Kubernetes annotation key: an optional DNS subdomain prefix with a '/' (e.g. example.com/), then 1-63 letters, digits, '-', '_' or '.' starting and ending with a letter or digit"))]
    #[x_kube(validation = Rule::new(format!("self.map(k, bytes(k).size() + bytes(self[k]).size()).sum() <= {MAX_ANNOTATIONS_SIZE}")).message("spec.secret.annotations: keys and values together must be at most 128 KiB (a Secret's annotations may hold 256 KiB in all): shorten them"))]
    pub annotations: BTreeMap<String, String>,

    /// The Secret's type and data as templates (MiniJinja, the Jinja2 syntax), rendered by the
    /// operator once per key: the whole layout, instead of `format`. Inputs: `access_key_id`,
    /// `secret_access_key`, `user_name`, `user_arn`, `account_id`, `profile`, `namespace`,
    /// `name`, `secret_name`; function `ses_smtp_password(secret, region)`; filter `b64encode`
    /// and the built-in filters (`tojson`, `upper`, ...). A template that does not render is
    /// refused before any IAM write (condition InvalidTemplate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<SecretTemplate>,

    /// Whose the Secret is: `Owner` (default: created by the operator, owned by this resource,
    /// deleted with it; an existing Secret is refused), `Adopt` (as Owner, and an existing Secret
    /// no other controller owns is taken over, its other entries kept), `Merge` (never created
    /// nor owned: this resource's entries are written into an existing Secret, and removed from
    /// it at deletion; where a policy rule allows it, `allowSecretMerge`), `Orphan` (as Owner,
    /// without the owner reference: the Secret stays when the resource is deleted). Changes
    /// between Owner and Adopt only, unless `name` changes too.
    #[serde(default)]
    pub creation_policy: super::CreationPolicy,
}

/// A Secret's type cannot change (the API server refuses it): a new type needs a new Secret.
fn secret_type_kept() -> Rule {
    let type_of = |of: &str| format!("(has({of}.template) && has({of}.template.type) ? {of}.template.type : 'Opaque')");
    let name_of = |of: &str| format!("(has({of}.name) ? {of}.name : '')");
    Rule::new(format!("{} == {} || {} != {}", type_of("self"), type_of("oldSelf"), name_of("self"), name_of("oldSelf")))
        .message("spec.secret.template.type cannot change while spec.secret.name stays: a Secret's type is immutable; also give the Secret a new name (a new key is issued into it)")
}

/// The Secret's type and data, each entry a template.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.type) || self.type == 'Opaque' || self.type == 'kubernetes.io/basic-auth' || !self.type.startsWith('kubernetes.io/')").message("spec.secret.template.type: of the kubernetes.io/ types only kubernetes.io/basic-auth fits an access key; use Opaque or a type of your own (example.com/aws)"))]
#[x_kube(validation = Rule::new("!has(self.type) || self.type != 'kubernetes.io/basic-auth' || 'username' in self.data || 'password' in self.data").message("spec.secret.template.type kubernetes.io/basic-auth needs a data entry username or password"))]
pub struct SecretTemplate {
    /// The Secret's type. Default `Opaque`. Immutable for a given Secret name.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$"))]
    pub type_: Option<String>,

    /// The Secret's data: key (letters, digits, `-`, `_`, `.`; at most 253) to template (at
    /// most 16 KiB each, 64 KiB together; at most 32 entries).
    #[schemars(schema_with = "template_data_schema")]
    #[x_kube(validation = Rule::new(format!("self.all(k, k.matches('{}') && size(k) <= 253 && k != '.' && !k.startsWith('..'))", syntax::DATA_KEY)).message("spec.secret.template.data: every key must be a Secret data key: 1-253 letters, digits, '-', '_' or '.', not '.' and not starting with '..'"))]
    #[x_kube(validation = Rule::new(format!("self.map(k, size(self[k])).sum() <= {MAX_TEMPLATES_SIZE}")).message("spec.secret.template.data: the templates together must be at most 64 KiB: shorten them"))]
    pub data: BTreeMap<String, String>,
}

fn template_data_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": MAX_TEMPLATE_ENTRIES,
        "additionalProperties": {"type": "string", "maxLength": MAX_TEMPLATE_LENGTH},
    })
}

impl Default for SecretSpec {
    fn default() -> Self {
        SecretSpec {
            name: None,
            format: SecretFormat::Env,
            profile: default_profile(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            template: None,
            creation_policy: super::CreationPolicy::Owner,
        }
    }
}

/// At most 32 labels of at most 63 characters each: bounds the API server needs to afford the
/// CEL rules over them.
fn labels_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "maxProperties": 32, "additionalProperties": {"type": "string", "maxLength": 63}})
}

/// At most 32 annotations; values free text (their total size in bytes is checked by a rule,
/// which the API server can afford only with a bound on each).
fn annotations_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"type": "string", "maxLength": MAX_ANNOTATIONS_SIZE},
    })
}

fn default_profile() -> String {
    "default".into()
}

/// Layout of the Secret's data.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum SecretFormat {
    #[default]
    Env,
    CredentialsFile,
}

/// Rotation schedule and the overlap that keeps clients working through a rotation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = longer_than("gracePeriod", "interval", "spec.rotation.interval must be longer than spec.rotation.gracePeriod (default 10m): the previous key must be retired before the next rotation; lengthen the interval or shorten the grace period"))]
pub struct RotationSpec {
    /// Rotate when the current key is this old (e.g. `720h`). Absent: no scheduled rotation.
    /// At least 5s and longer than `gracePeriod`; a policy may demand more
    /// (`minRotationInterval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = at_least("spec.rotation.interval", MIN_ROTATION_INTERVAL, ": rotate less often (e.g. 720h), or request rotations with rotation.serial"))]
    pub interval: Option<Duration>,

    /// How long the previous key stays Active after the new one is published, so running clients
    /// can pick up the new Secret. Default `10m`.
    #[serde(default = "default_grace_period")]
    pub grace_period: Duration,

    /// How long the previous key is then kept Inactive before it is deleted: a window in which an
    /// admin can reactivate it in IAM to roll back. Default `24h`.
    #[serde(default = "default_retain_inactive")]
    pub retain_inactive: Duration,

    /// Increase to rotate now (GitOps-friendly: the change is in the spec). Default 0.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub serial: i64,

    /// Deactivate the previous key only once IAM shows no use of it since the new key was
    /// published (AWS's advice for rotation), checked every `usageCheckInterval` after the grace
    /// period, for at most `maxWait`. Default false.
    #[serde(default)]
    pub wait_for_unused: bool,

    /// With `waitForUnused`: how often the previous key's last use is read (at least 1s).
    /// Default `5m`.
    #[serde(default = "default_usage_check_interval")]
    #[x_kube(validation = at_least("spec.rotation.usageCheckInterval", MIN_USAGE_CHECK_INTERVAL, ": each check is an IAM call"))]
    pub usage_check_interval: Duration,

    /// With `waitForUnused`: after this long the previous key is deactivated even if still in
    /// use (a Warning event says so). Default `24h`.
    #[serde(default = "default_max_wait")]
    pub max_wait: Duration,
}

impl Default for RotationSpec {
    fn default() -> Self {
        RotationSpec {
            interval: None,
            grace_period: default_grace_period(),
            retain_inactive: default_retain_inactive(),
            serial: 0,
            wait_for_unused: false,
            usage_check_interval: default_usage_check_interval(),
            max_wait: default_max_wait(),
        }
    }
}

fn default_usage_check_interval() -> Duration {
    Duration::from_secs(300)
}

fn default_max_wait() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_grace_period() -> Duration {
    Duration::from_secs(600)
}

fn default_retain_inactive() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// A workload to roll out when the key in the Secret changes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct RestartTarget {
    /// Kind of the workload: `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: RestartKind,
    /// Name of the workload, in this resource's namespace (a DNS-1123 subdomain: lowercase
    /// letters, digits, `-` and `.`).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub name: String,
}

/// Workload kinds that can be restarted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum RestartKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// What the operator observed and did. Written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IamAccessKeyStatus {
    /// ID of the key currently published in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Status of the current key in IAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_status: Option<KeyStatus>,
    /// When IAM created the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_date: Option<Time>,
    /// Name of the Secret that holds the current key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Last use of the current key, as IAM reports it (refreshed periodically, not live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<LastUsed>,
    /// When the next scheduled rotation is due (absent: none scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_at: Option<Time>,
    /// Every key this resource owns in IAM, with its phase.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<OwnedKey>,
    /// Set while a key is being created: the IDs that existed before, so a key left behind by an
    /// interrupted create (untagged, created near `since` and not among them) can be recognised
    /// and removed after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_create: Option<PendingCreate>,
    /// Number of keys on the user that this resource does not own (never changed by it).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub foreign_keys: u32,
    /// The rotation serial and rotate-request time already acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationRecord>,
    /// The key ID the restart targets were last rolled out for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarted_for: Option<String>,
    /// The policy rule that allows this resource, as last seen, with its `onRevoke`: kept after
    /// the rule is gone, so that what the rule said about its keys still applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<GrantRecord>,
    /// The AWS account the keys are in, recorded before the first key is created: revocation and
    /// deletion act there even when the rule that named it is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountRecord>,
    /// The resource generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, with a reason when it is not (UserNotFound, NotAuthorized, KeyLimitExceeded,
    /// SecretConflict, IamUnavailable, Throttled, UserClaimed, Paused, ...); `PolicyOverride`
    /// when a policy overrules the resource's pause annotation or `deletionPolicy: Retain`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Last use of a key as reported by IAM GetAccessKeyLastUsed.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastUsed {
    /// When the key was last used to sign a request (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<Time>,
    /// AWS service of that request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Region of that request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// When the operator last asked IAM.
    pub checked_at: Time,
    /// Which key this describes.
    pub access_key_id: String,
}

/// A key owned by this resource.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OwnedKey {
    /// IAM access key ID.
    pub access_key_id: String,
    /// `Current`: published in the Secret. `Draining`: replaced, still Active for the grace
    /// period. `Inactive`: deactivated, deleted at `deleteAt`.
    pub phase: KeyPhase,
    /// When IAM created the key.
    pub create_date: Time,
    /// When a Draining key is deactivated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivate_at: Option<Time>,
    /// When a retired key is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_at: Option<Time>,
    /// When a previous key was replaced by a new one in the Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_at: Option<Time>,
    /// Last use of a draining key, as IAM reported it (with `waitForUnused`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Time>,
    /// When that last use was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_checked_at: Option<Time>,
}

impl OwnedKey {
    /// A key in `phase`, with nothing scheduled yet.
    pub fn new(access_key_id: impl Into<String>, phase: KeyPhase, create_date: Time) -> Self {
        OwnedKey {
            access_key_id: access_key_id.into(),
            phase,
            create_date,
            deactivate_at: None,
            delete_at: None,
            replaced_at: None,
            last_used_at: None,
            usage_checked_at: None,
        }
    }
}

/// Phase of an owned key.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum KeyPhase {
    Current,
    Draining,
    Inactive,
}

/// Marker of a key creation in progress.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCreate {
    /// When the creation started.
    pub since: Time,
    /// Keys the user had before it started.
    #[serde(default)]
    pub existing_key_ids: Vec<String>,
}

/// The grant a resource holds (or held), recorded from the policy that gave it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantRecord {
    /// The IamAccessKeyPolicy whose rule allows the resource (of several, the one with the
    /// strictest `onRevoke`).
    pub policy: String,
    /// Index of that rule in the policy's `spec.rules`.
    pub rule: u32,
    /// What happens to the keys when no rule allows the resource any more.
    pub on_revoke: super::OnRevoke,
    /// When the operator found that no rule allows the resource any more (absent: allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<Time>,
}

/// Where a resource's keys are: the account, the role assumed there, the user's ARN.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountRecord {
    /// The AWS account id (absent until known, for the operator's own account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The role assumed in it (absent: the operator's own identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// The external ID the role asks for (an external ID is not a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// The IAM user's ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_arn: Option<String>,
}

impl AccountRecord {
    /// The role recorded, as a rule names it (no rate ceiling: the rules' applies).
    pub fn role(&self) -> Option<super::AccountRole> {
        let role_arn = self.role_arn.clone()?;
        Some(super::AccountRole { role_arn, external_id: self.external_id.clone(), iam_rate_max: None })
    }
}

/// Rotation triggers already acted on.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotationRecord {
    /// `spec.rotation.serial` of the last rotation.
    #[serde(default)]
    pub serial: i64,
    /// Value of the `iam.keyop.dev/rotate-requested-at` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_at: Option<String>,
    /// When the last rotation published its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotated_at: Option<Time>,
    /// Why the last rotation happened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reason: Option<String>,
}

impl IamAccessKey {
    /// Whether the resource carries the pause annotation (whether the pause holds is the
    /// policies' call: `Limits::pause_allowed`).
    pub fn is_paused(&self) -> bool {
        self.metadata.annotations.as_ref().and_then(|a| a.get(super::PAUSED_ANNOTATION)).is_some_and(|v| v == "true")
    }
}
