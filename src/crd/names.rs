//! Every name the operator writes onto objects it does not define the schema of: annotations,
//! labels, IAM tags, the finalizer and its field manager. One place, so documentation, the
//! chart's admission policy and the code cannot drift apart.

/// Finalizer on every `IamAccessKey`: its keys are deleted before the resource goes.
pub const FINALIZER: &str = "iam.keyop.dev/cleanup";
/// The field manager of every write (server-side apply and merge patches).
pub const FIELD_MANAGER: &str = "iam-key-operator";

/// Annotation that pauses a resource (where a policy allows it).
pub const PAUSED_ANNOTATION: &str = "iam.keyop.dev/paused";
/// Annotation that asks for a new key (an RFC 3339 time; each new value rotates once).
pub const ROTATE_REQUESTED_AT_ANNOTATION: &str = "iam.keyop.dev/rotate-requested-at";

/// Secret label saying the operator wrote it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "iam-key-operator";
/// Secret annotation naming the access key the Secret holds (never the secret).
pub const ACCESS_KEY_ID_ANNOTATION: &str = "iam.keyop.dev/access-key-id";
/// Secret annotation with a fingerprint of `spec.secret` (format, profile, labels, annotations)
/// the Secret was written with: a change of the spec shows up in the metadata-only watch.
pub const LAYOUT_ANNOTATION: &str = "iam.keyop.dev/secret-layout";
/// Secret annotation with a fingerprint of the data layout alone (type and templates): a change
/// of labels or annotations only keeps the data as it is.
pub const DATA_LAYOUT_ANNOTATION: &str = "iam.keyop.dev/secret-data-layout";
/// Secret annotation saying where the secret access key stands verbatim in the data
/// (`<data key>:<offset>:<length>`), so that a new layout can be written with the same key;
/// absent when the data holds only values derived from it.
pub const SECRET_AT_ANNOTATION: &str = "iam.keyop.dev/secret-at";
/// Secret annotation naming the UID of the IamAccessKey whose entries a Secret holds, where no
/// owner reference says it (`creationPolicy` `Orphan` and `Merge`).
pub const WRITTEN_FOR_ANNOTATION: &str = "iam.keyop.dev/written-for";
/// Secret label with the same UID, on the same Secrets: the operator's Secret watch selects by
/// label, and sees through this one the Secrets it writes into without owning them (`Merge`
/// writes into a Secret whose labels are its owner's), and whose entries they are.
pub const WRITTEN_FOR_LABEL: &str = "iam.keyop.dev/written-for";
/// Secret annotation listing the data keys the operator wrote (comma-separated), in a Secret
/// whose other entries it keeps (`creationPolicy` `Adopt` and `Merge`): the next write replaces
/// exactly these, and a `Merge` resource's deletion removes them.
pub const WRITTEN_KEYS_ANNOTATION: &str = "iam.keyop.dev/written-keys";
/// Pod-template annotation whose change makes a restart target roll out.
pub const RESTARTED_FOR_ANNOTATION: &str = "iam.keyop.dev/restarted-for";

/// IAM user tag that claims the user for one resource.
pub const OWNER_TAG: &str = "iam.keyop.dev/owner";
/// Prefix of the value of a per-key tag (the IAM console shows it as the key's description).
/// No space in it: some SigV4 implementations disagree on how a space in a form body is
/// encoded (moto refuses the AWS SDK for Rust's `%20`), and a tag must never be the reason a
/// key is left untagged.
pub const KEY_TAG_PREFIX: &str = "iam-key-operator:";
