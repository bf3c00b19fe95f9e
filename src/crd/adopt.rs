//! Taking over what already exists: `spec.secret.creationPolicy` (whose the Secret is) and
//! `spec.adopt` (an access key made outside the operator, held in a Secret of the namespace).

use kube::{KubeSchema, core::Rule};
use serde::{Deserialize, Serialize};

use super::access_key::{DNS1123_SUBDOMAIN, syntax};

/// Whose the Secret is, and what happens to it when the resource goes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum CreationPolicy {
    /// The operator creates the Secret and owns it (owner reference, label
    /// `app.kubernetes.io/managed-by`); it is deleted with the resource. A Secret of that name
    /// it did not create is refused (SecretConflict).
    #[default]
    Owner,
    /// As `Owner`, and an existing Secret that no other controller owns is taken over: owner
    /// reference and label added, its other entries, labels and annotations kept.
    Adopt,
    /// Never creates or owns the Secret: writes its entries into an existing Secret someone else
    /// owns, and removes only those when the resource is deleted. Only where an
    /// IamAccessKeyPolicy rule allows it (`allowSecretMerge`).
    Merge,
    /// As `Owner`, without the owner reference: the Secret stays when the resource is deleted.
    Orphan,
}

impl CreationPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            CreationPolicy::Owner => "Owner",
            CreationPolicy::Adopt => "Adopt",
            CreationPolicy::Merge => "Merge",
            CreationPolicy::Orphan => "Orphan",
        }
    }

    /// Whether the Secret carries the resource's owner reference (and so is deleted with it).
    pub fn owns(self) -> bool {
        matches!(self, CreationPolicy::Owner | CreationPolicy::Adopt)
    }

    /// Whether entries of the Secret that the operator did not write are kept on each write
    /// (a taken-over or shared Secret), rather than the Secret being replaced whole.
    pub fn keeps_others(self) -> bool {
        matches!(self, CreationPolicy::Adopt | CreationPolicy::Merge)
    }
}

/// The pairs of data keys an adopted key is looked for under, in this order, when
/// `spec.adopt` names none: this operator's `Env` format (and most hand-made Secrets and
/// Terraform's), a Crossplane provider-aws AccessKey connection Secret, and the fields of Vault's
/// AWS secrets engine.
pub const ADOPT_KEY_PAIRS: &[(&str, &str)] =
    &[("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("username", "password"), ("access_key", "secret_key")];

/// An access key made outside the operator, to be taken over as this resource's current key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.accessKeyIdKey) == has(self.secretAccessKeyKey)").message("spec.adopt.accessKeyIdKey and spec.adopt.secretAccessKeyKey go together: set both, or neither to look for AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, username/password or access_key/secret_key"))]
pub struct AdoptSpec {
    /// The Secret, in this resource's namespace, that holds the key (read once, before the
    /// resource's first key). Default: the Secret this resource writes (`spec.secret.name`),
    /// which then needs `spec.secret.creationPolicy` `Adopt` or `Merge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS1123_SUBDOMAIN))]
    pub secret_name: Option<String>,

    /// The data key holding the access key ID. Default: the first pair present of
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `username`/`password` (a Crossplane
    /// AccessKey's connection Secret) and `access_key`/`secret_key` (Vault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = syntax::DATA_KEY))]
    pub access_key_id_key: Option<String>,

    /// The data key holding the secret access key (with `accessKeyIdKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = syntax::DATA_KEY))]
    pub secret_access_key_key: Option<String>,
}

impl AdoptSpec {
    /// The pairs of data keys to look in, in order.
    pub fn key_pairs(&self) -> Vec<(String, String)> {
        match (&self.access_key_id_key, &self.secret_access_key_key) {
            (Some(id), Some(secret)) => vec![(id.clone(), secret.clone())],
            _ => ADOPT_KEY_PAIRS.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }
    }
}

/// CEL: the Secret `spec.adopt` reads, with its default (the Secret the resource writes).
const ADOPT_SOURCE: &str = "(has(self.spec.adopt.secretName) ? self.spec.adopt.secretName : (has(self.spec.secret) && has(self.spec.secret.name) ? self.spec.secret.name : self.metadata.name))";
/// CEL: the Secret the resource writes.
const SECRET_TARGET: &str =
    "(has(self.spec.secret) && has(self.spec.secret.name) ? self.spec.secret.name : self.metadata.name)";
/// CEL: the creation policy, with its default.
const POLICY: &str =
    "(has(self.spec.secret) && has(self.spec.secret.creationPolicy) ? self.spec.secret.creationPolicy : 'Owner')";

/// Adopting a key in place (from the Secret the resource writes) needs a policy that may write
/// into an existing Secret.
pub fn adopt_in_place_needs_a_policy() -> Rule {
    Rule::new(format!("!has(self.spec.adopt) || {ADOPT_SOURCE} != {SECRET_TARGET} || {POLICY} in ['Adopt', 'Merge']"))
        .message("spec.adopt reads the key from the Secret this resource writes (spec.adopt.secretName defaults to spec.secret.name, or metadata.name), which exists: set spec.secret.creationPolicy to Adopt (take that Secret over) or Merge (write into it), or name another Secret in spec.adopt.secretName")
}

/// `Merge` writes data only: the Secret's type, labels and annotations are its owner's.
pub fn merge_writes_data_only() -> Rule {
    Rule::new("!has(self.creationPolicy) || self.creationPolicy != 'Merge' || ((!has(self.labels) || size(self.labels) == 0) && (!has(self.annotations) || size(self.annotations) == 0) && (!has(self.template) || !has(self.template.type)))")
        .message("spec.secret.creationPolicy Merge writes only data entries into a Secret someone else owns: remove spec.secret.labels, spec.secret.annotations and spec.secret.template.type (the Secret's metadata and type are its owner's)")
}

/// Owner and Adopt mark a Secret as the resource's with an owner reference, Orphan and Merge with
/// an annotation: a change between the two kinds needs a new Secret.
pub fn creation_policy_kind_kept() -> Rule {
    let kind = |of: &str| {
        format!(
            "((has({of}.creationPolicy) ? {of}.creationPolicy : 'Owner') in ['Owner', 'Adopt'] ? 'Owner' : (has({of}.creationPolicy) ? {of}.creationPolicy : 'Owner'))"
        )
    };
    let name_of = |of: &str| format!("(has({of}.name) ? {of}.name : '')");
    Rule::new(format!("{} == {} || {} != {}", kind("self"), kind("oldSelf"), name_of("self"), name_of("oldSelf")))
        .message("spec.secret.creationPolicy can change between Owner and Adopt only, unless spec.secret.name changes too: the operator marks the Secret as its own differently under Merge and Orphan; give the Secret a new name (a new key is issued into it)")
}
