//! Adopting an access key made outside the operator (`spec.adopt`): when it is planned, and the
//! pure checks a candidate key passes before anything is written. The controller reads the
//! Secret and asks STS; what the answers mean is decided here.

use std::{collections::BTreeMap, fmt};

use super::{Ledger, Owner};
use crate::{
    crd::{AdoptSpec, IamAccessKeySpec, KEY_TAG_PREFIX, KeyStatus},
    iam::SecretAccessKey,
    keys::IamKey,
};

/// Whether `spec.adopt` still has to be acted on: it is read only before the resource's first
/// key (no key tracked, none being created, none ever installed).
pub fn adoption_pending(spec: &IamAccessKeySpec, ledger: &Ledger) -> bool {
    spec.adopt.is_some() && ledger.keys.is_empty() && ledger.pending_create.is_none() && !ledger.installed
}

/// Why a key is not adopted. Every refusal is decided before anything is written: no tag, no
/// Secret write. The messages name the key ID, never its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdoptionRefusal {
    /// A matching policy rule does not allow adoption (`allowAdoption`).
    NotAllowed { policies: Vec<String> },
    /// `creationPolicy: Adopt` found an existing Secret to take over, and a matching policy rule
    /// does not allow adoption (`allowAdoption`): taking over a Secret hands it to the resource
    /// (deleted with it), which its namespace's users may not be allowed to do themselves.
    SecretNotAllowed { secret: String, policies: Vec<String> },
    /// The Secret `spec.adopt` names does not exist.
    SecretMissing { secret: String },
    /// None of the data key pairs looked in holds both halves of a key.
    NoKeyInSecret { secret: String, looked_for: Vec<(String, String)> },
    /// The value under the key ID's data key is not an access key ID.
    NotAnAccessKeyId { secret: String, data_key: String },
    /// IAM does not list the key on the user: another user's key, or one deleted since.
    NotTheUsersKey { access_key_id: String, user: String },
    /// The key carries another owner's tag (another resource, another cluster, or a resource
    /// that retained it when it was deleted).
    OwnedElsewhere { access_key_id: String, by: String },
    /// The key is Inactive in IAM: no consumer can be using it.
    Inactive { access_key_id: String },
    /// STS did not authenticate the key as the user (another identity, or a refusal: a wrong
    /// secret).
    DoesNotAuthenticate { access_key_id: String, user_arn: String, answer: String },
}

impl fmt::Display for AdoptionRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdoptionRefusal::NotAllowed { policies } => write!(
                f,
                "adoption is not allowed: IamAccessKeyPolicy {} does not allow adopting existing keys (spec.rules[].allowAdoption); nothing was changed. Ask a platform admin for allowAdoption in every rule that allows this resource, or remove spec.adopt to have a new key created",
                policies.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
            ),
            AdoptionRefusal::SecretNotAllowed { secret, policies } => write!(
                f,
                "taking over the existing Secret {secret} is not allowed: IamAccessKeyPolicy {} does not allow adopting what exists (spec.rules[].allowAdoption); nothing was changed. Ask a platform admin for allowAdoption in every rule that allows this resource, or set spec.secret.name to a free name",
                policies.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
            ),
            AdoptionRefusal::SecretMissing { secret } => write!(
                f,
                "adoption refused: Secret {secret} named by spec.adopt does not exist in this namespace; nothing was changed. Create it, fix spec.adopt.secretName, or remove spec.adopt to have a new key created"
            ),
            AdoptionRefusal::NoKeyInSecret { secret, looked_for } => write!(
                f,
                "adoption refused: Secret {secret} holds no access key under {}; nothing was changed. Name its data keys in spec.adopt.accessKeyIdKey and spec.adopt.secretAccessKeyKey",
                looked_for.iter().map(|(a, b)| format!("{a}/{b}")).collect::<Vec<_>>().join(", ")
            ),
            AdoptionRefusal::NotAnAccessKeyId { secret, data_key } => write!(
                f,
                "adoption refused: Secret {secret} entry {data_key} is not an access key ID (16-128 letters and digits); nothing was changed. Fix spec.adopt.accessKeyIdKey"
            ),
            AdoptionRefusal::NotTheUsersKey { access_key_id, user } => write!(
                f,
                "adoption refused: access key {access_key_id} is not a key of IAM user {user} (ListAccessKeys does not show it: another user's key, or deleted); nothing was changed. Adopt a key of this user, or remove spec.adopt"
            ),
            AdoptionRefusal::OwnedElsewhere { access_key_id, by } => write!(
                f,
                "adoption refused: access key {access_key_id} is owned by {by} (its tag on the IAM user); nothing was changed. Release it there first (delete that resource with deletionPolicy Retain, then remove the user tag {access_key_id})"
            ),
            AdoptionRefusal::Inactive { access_key_id } => write!(
                f,
                "adoption refused: access key {access_key_id} is Inactive in IAM, so nothing can be using it; nothing was changed. Activate it, or remove spec.adopt to have a new key created"
            ),
            AdoptionRefusal::DoesNotAuthenticate { access_key_id, user_arn, answer } => write!(
                f,
                "adoption refused: access key {access_key_id} does not authenticate as {user_arn} (STS GetCallerIdentity answered {answer}): the Secret's secret access key is wrong or belongs to another key; nothing was changed"
            ),
        }
    }
}

/// The key a Secret's data holds: its ID, its secret, and the pair of data keys it was found
/// under. Values are trimmed (a Secret made with `kubectl create secret --from-file` often ends
/// in a newline).
pub fn read_candidate(
    spec: &AdoptSpec,
    secret_name: &str,
    data: &BTreeMap<String, Vec<u8>>,
) -> Result<(String, SecretAccessKey, (String, String)), AdoptionRefusal> {
    let pairs = spec.key_pairs();
    let text = |key: &str| {
        let value = data.get(key)?;
        let text = std::str::from_utf8(value).ok()?.trim();
        (!text.is_empty()).then(|| text.to_owned())
    };
    for (id_key, secret_key) in &pairs {
        let (Some(id), Some(secret)) = (text(id_key), text(secret_key)) else { continue };
        if !looks_like_an_access_key_id(&id) {
            return Err(AdoptionRefusal::NotAnAccessKeyId { secret: secret_name.into(), data_key: id_key.clone() });
        }
        return Ok((id, SecretAccessKey::new(secret), (id_key.clone(), secret_key.clone())));
    }
    Err(AdoptionRefusal::NoKeyInSecret { secret: secret_name.into(), looked_for: pairs })
}

/// IAM's access key ID: 16-128 word characters (in practice `AKIA` and 16 more).
pub fn looks_like_an_access_key_id(s: &str) -> bool {
    (16..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What IAM must show of a candidate key before STS is asked: one of the user's keys, Active,
/// and tagged by nobody else. A key tagged as this resource's (an adoption interrupted after its
/// tag) or retained under this very name (a resource deleted with `deletionPolicy: Retain`, now
/// created again) passes.
pub fn check_candidate(
    owner: &Owner,
    user: &str,
    keys: &[IamKey],
    tags: &BTreeMap<String, String>,
    access_key_id: &str,
) -> Result<IamKey, AdoptionRefusal> {
    let id = access_key_id.to_owned();
    let Some(key) = keys.iter().find(|k| k.access_key_id == access_key_id) else {
        return Err(AdoptionRefusal::NotTheUsersKey { access_key_id: id, user: user.into() });
    };
    match tags.get(access_key_id) {
        None => {}
        Some(v) if *v == owner.key_tag_value() || *v == owner.retained_tag_value() => {}
        Some(v) => return Err(AdoptionRefusal::OwnedElsewhere { access_key_id: id, by: describe_tag(v) }),
    }
    if key.status == KeyStatus::Inactive {
        return Err(AdoptionRefusal::Inactive { access_key_id: id });
    }
    Ok(key.clone())
}

/// A per-key tag's value, as a person reads it.
fn describe_tag(value: &str) -> String {
    match value.strip_prefix(KEY_TAG_PREFIX) {
        Some(rest) => match rest.strip_prefix("retained:") {
            Some(owner) => format!("IamAccessKey {owner}, which retained it when it was deleted"),
            None => format!("IamAccessKey {rest}"),
        },
        None => format!("whoever tagged it {value:?}"),
    }
}

/// STS's answer for the candidate: `Ok` when it authenticates as the user.
pub fn judge_identity(
    access_key_id: &str,
    user_arn: &str,
    answer: Result<&str, String>,
) -> Result<(), AdoptionRefusal> {
    let refused = |answer: String| AdoptionRefusal::DoesNotAuthenticate {
        access_key_id: access_key_id.into(),
        user_arn: user_arn.into(),
        answer,
    };
    match answer {
        Ok(arn) if arn == user_arn => Ok(()),
        Ok(arn) => Err(refused(format!("another identity, {arn}"))),
        Err(message) => Err(refused(message)),
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;
    use crate::crd::{KeyPhase, OwnedKey};

    fn owner() -> Owner {
        Owner::new("c", "ns", "app")
    }

    fn key(id: &str, status: KeyStatus) -> IamKey {
        IamKey { access_key_id: id.into(), status, create_date: Timestamp::UNIX_EPOCH }
    }

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    const ID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    #[test]
    fn the_key_is_found_under_the_first_pair_present_and_trimmed() {
        let spec = AdoptSpec::default();
        let env = data(&[("AWS_ACCESS_KEY_ID", ID), ("AWS_SECRET_ACCESS_KEY", SECRET), ("username", "x")]);
        let (id, secret, pair) = read_candidate(&spec, "s", &env).unwrap();
        assert_eq!((id.as_str(), secret.expose(), pair.0.as_str()), (ID, SECRET, "AWS_ACCESS_KEY_ID"));
        // Crossplane's connection Secret, with other entries and a trailing newline.
        let crossplane = data(&[("username", &format!("{ID}\n")), ("password", SECRET), ("endpoint", "x")]);
        let (id, _, pair) = read_candidate(&spec, "s", &crossplane).unwrap();
        assert_eq!((id.as_str(), pair), (ID, ("username".into(), "password".into())));
        let vault = data(&[("access_key", ID), ("secret_key", SECRET)]);
        assert_eq!(read_candidate(&spec, "s", &vault).unwrap().2.0, "access_key");
        // Named keys: only those.
        let named = AdoptSpec {
            secret_name: None,
            access_key_id_key: Some("id".into()),
            secret_access_key_key: Some("key".into()),
        };
        assert!(matches!(read_candidate(&named, "s", &env), Err(AdoptionRefusal::NoKeyInSecret { .. })));
        assert_eq!(read_candidate(&named, "s", &data(&[("id", ID), ("key", SECRET)])).unwrap().0, ID);
    }

    #[test]
    fn a_secret_without_a_key_is_refused_naming_what_was_looked_for_and_never_the_secret() {
        let spec = AdoptSpec::default();
        let half = data(&[("AWS_ACCESS_KEY_ID", ID)]);
        let e = read_candidate(&spec, "tf", &half).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, username/password"), "{text}");
        let not_an_id = data(&[("username", "alice"), ("password", SECRET)]);
        let e = read_candidate(&spec, "tf", &not_an_id).unwrap_err();
        assert_eq!(e, AdoptionRefusal::NotAnAccessKeyId { secret: "tf".into(), data_key: "username".into() });
        assert!(!e.to_string().contains(SECRET));
    }

    #[test]
    fn only_an_active_key_of_the_user_that_nobody_else_tagged_passes() {
        let keys = [key(ID, KeyStatus::Active), key("AKIAINACTIVE00000000", KeyStatus::Inactive)];
        let o = owner();
        let none = BTreeMap::new();
        assert_eq!(check_candidate(&o, "u", &keys, &none, ID).unwrap().access_key_id, ID);
        assert!(matches!(
            check_candidate(&o, "u", &keys, &none, "AKIAOTHERUSER0000000"),
            Err(AdoptionRefusal::NotTheUsersKey { .. })
        ));
        assert!(matches!(
            check_candidate(&o, "u", &keys, &none, "AKIAINACTIVE00000000"),
            Err(AdoptionRefusal::Inactive { .. })
        ));
        let tagged = |v: &str| BTreeMap::from([(ID.to_string(), v.to_string())]);
        // Ours already (interrupted after the tag), or retained under this very name: taken.
        assert!(check_candidate(&o, "u", &keys, &tagged(&o.key_tag_value()), ID).is_ok());
        assert!(check_candidate(&o, "u", &keys, &tagged(&o.retained_tag_value()), ID).is_ok());
        // Anyone else's: refused, naming them.
        let other = Owner::new("other-cluster", "ns", "app");
        for (value, named) in [
            (other.key_tag_value(), "IamAccessKey other-cluster/ns/app"),
            (other.retained_tag_value(), "retained it"),
            ("terraform".to_string(), "\"terraform\""),
        ] {
            let e = check_candidate(&o, "u", &keys, &tagged(&value), ID).unwrap_err();
            assert!(matches!(e, AdoptionRefusal::OwnedElsewhere { .. }), "{value}");
            assert!(e.to_string().contains(named), "{e}");
        }
    }

    #[test]
    fn sts_must_answer_with_the_users_arn() {
        let arn = "arn:aws:iam::123456789012:user/u";
        assert!(judge_identity(ID, arn, Ok(arn)).is_ok());
        let other = judge_identity(ID, arn, Ok("arn:aws:iam::123456789012:user/v")).unwrap_err();
        assert!(other.to_string().contains("another identity, arn:aws:iam::123456789012:user/v"), "{other}");
        let refused = judge_identity(ID, arn, Err("SignatureDoesNotMatch".into())).unwrap_err();
        assert!(matches!(refused, AdoptionRefusal::DoesNotAuthenticate { .. }));
    }

    #[test]
    fn adoption_is_read_only_before_the_first_key() {
        let mut spec: IamAccessKeySpec = serde_json::from_value(serde_json::json!({"userName": "u"})).unwrap();
        let fresh = Ledger::default();
        assert!(!adoption_pending(&spec, &fresh), "nothing to adopt");
        spec.adopt = Some(AdoptSpec::default());
        assert!(adoption_pending(&spec, &fresh));
        let with_key = Ledger {
            keys: vec![OwnedKey::new(
                ID,
                KeyPhase::Current,
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
            )],
            ..Default::default()
        };
        assert!(!adoption_pending(&spec, &with_key));
        assert!(!adoption_pending(&spec, &Ledger { installed: true, ..Default::default() }), "a key was lost since");
        let creating = Ledger { pending_create: Some(vec![]), ..Default::default() };
        assert!(!adoption_pending(&spec, &creating));
    }
}
