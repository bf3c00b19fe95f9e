//! Which AWS account a resource acts in: the one the policies choose, recorded in
//! `status.account` before its first key; once anything may be in IAM, the recorded one only.

use crate::crd::{AccountRecord, AccountRole, IamAccessKeyStatus};

use super::may_have_written_to_iam;

/// Record the account the policies chose (`None`: the operator's own) for a resource with
/// nothing in IAM yet. A resource that may have keys stays in the account status records:
/// creating keys in a second account would leak the first one's. Then the answer is the
/// `AccountChanged` message, and status is left as it was.
pub fn place_account(status: &mut IamAccessKeyStatus, chosen: Option<&AccountRole>, user: &str) -> Result<(), String> {
    let role_arn = chosen.map(|r| &r.role_arn);
    if may_have_written_to_iam(status) {
        let recorded = status.account.as_ref().and_then(AccountRecord::role);
        if recorded.as_ref().map(|r| &r.role_arn) != role_arn {
            let describe = |role: Option<&AccountRole>| match role {
                Some(r) => format!("AWS account {} (role {})", r.account_id(), r.role_arn),
                None => "the operator's own AWS account".to_string(),
            };
            return Err(format!(
                "the access keys of this resource are in {}, but the IamAccessKeyPolicy rules now place IAM user {user} in {}: nothing is done in either; restore the rule, or delete this IamAccessKey (its keys are deleted where they are) and create it again",
                describe(recorded.as_ref()),
                describe(chosen)
            ));
        }
        // The same role: its external ID follows the rule (deletion assumes the role with it).
        if let (Some(record), Some(role)) = (status.account.as_mut(), chosen) {
            record.external_id = role.external_id.clone();
        }
        return Ok(());
    }
    let record = status.account.get_or_insert_with(AccountRecord::default);
    if record.role_arn.as_ref() != role_arn {
        *record = AccountRecord::default();
    }
    record.role_arn = role_arn.cloned();
    record.external_id = chosen.and_then(|r| r.external_id.clone());
    record.id = chosen.map(|r| r.account_id().to_owned()).or(record.id.take());
    Ok(())
}

/// Status shows the user's ARN, and the account id it names.
pub fn note_user_arn(status: &mut IamAccessKeyStatus, arn: &str) {
    let record = status.account.get_or_insert_with(AccountRecord::default);
    record.user_arn = Some(arn.to_owned());
    record.id = arn.split(':').nth(4).filter(|id| !id.is_empty()).map(str::to_owned).or(record.id.take());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{OwnedKey, PendingCreate};

    fn role(arn: &str) -> AccountRole {
        AccountRole { role_arn: arn.into(), external_id: None, iam_rate_max: None }
    }

    const A: &str = "arn:aws:iam::222222222222:role/iam-key-operator/a";
    const B: &str = "arn:aws:iam::333333333333:role/iam-key-operator/b";

    fn with_key(account: Option<AccountRecord>) -> IamAccessKeyStatus {
        let key: OwnedKey = serde_json::from_value(serde_json::json!({
            "accessKeyId": "AKIA1", "phase": "Current", "createDate": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        IamAccessKeyStatus { keys: vec![key], account, ..Default::default() }
    }

    fn recorded(arn: Option<&str>, id: Option<&str>) -> Option<AccountRecord> {
        Some(AccountRecord {
            id: id.map(Into::into),
            role_arn: arn.map(Into::into),
            user_arn: Some("arn:aws:iam::222222222222:user/k8s/app".into()),
            external_id: None,
        })
    }

    #[test]
    fn before_the_first_key_the_chosen_account_is_recorded_and_may_change() {
        let mut status = IamAccessKeyStatus::default();
        place_account(&mut status, Some(&role(A)), "app").unwrap();
        let record = status.account.clone().unwrap();
        assert_eq!((record.id.as_deref(), record.role_arn.as_deref()), (Some("222222222222"), Some(A)));
        // Nothing in IAM yet: another rule may still move it, and what was learned in A goes.
        note_user_arn(&mut status, "arn:aws:iam::222222222222:user/k8s/app");
        place_account(&mut status, Some(&role(B)), "app").unwrap();
        let record = status.account.clone().unwrap();
        assert_eq!((record.id.as_deref(), record.role_arn.as_deref()), (Some("333333333333"), Some(B)));
        assert_eq!(record.user_arn, None);
        // Back to the operator's own account: no role, the id learned from the user's ARN later.
        place_account(&mut status, None, "app").unwrap();
        assert_eq!(status.account, Some(AccountRecord::default()));
        note_user_arn(&mut status, "arn:aws:iam::123456789012:user/app");
        assert_eq!(status.account.unwrap().id.as_deref(), Some("123456789012"));
    }

    #[test]
    fn a_resource_with_keys_in_one_account_is_not_moved_to_another() {
        for (from, to) in [(Some(A), Some(B)), (Some(A), None), (None, Some(A))] {
            let mut status = with_key(recorded(from, from.map(|_| "222222222222")));
            let before = status.clone();
            let message = place_account(&mut status, to.map(role).as_ref(), "app").unwrap_err();
            assert_eq!(status, before, "{from:?} -> {to:?}: status unchanged");
            let (from_text, to_text) = match (from, to) {
                (Some(_), Some(_)) => ("AWS account 222222222222 (role", "AWS account 333333333333 (role"),
                (Some(_), None) => ("AWS account 222222222222 (role", "in the operator's own AWS account"),
                _ => ("in the operator's own AWS account", "AWS account 222222222222 (role"),
            };
            assert!(message.contains(from_text) && message.contains(to_text), "{message}");
        }
    }

    #[test]
    fn a_create_in_flight_or_keys_from_before_accounts_were_recorded_count_as_keys() {
        // Keys from before status recorded accounts are in the operator's own account.
        let mut status = with_key(None);
        place_account(&mut status, None, "app").unwrap();
        assert!(place_account(&mut status, Some(&role(A)), "app").is_err());
        // A create may have reached IAM: the account it went to holds.
        let pending: PendingCreate =
            serde_json::from_value(serde_json::json!({"since": "2026-01-01T00:00:00Z"})).unwrap();
        let mut status = IamAccessKeyStatus {
            pending_create: Some(pending),
            account: recorded(Some(A), Some("222222222222")),
            ..Default::default()
        };
        assert!(place_account(&mut status, Some(&role(B)), "app").is_err());
        assert!(place_account(&mut status, Some(&role(A)), "app").is_ok());
    }

    #[test]
    fn the_same_role_keeps_the_record_and_follows_the_rules_external_id() {
        let mut status = with_key(recorded(Some(A), Some("222222222222")));
        let with_id = AccountRole { external_id: Some("new-id".into()), iam_rate_max: Some(5), ..role(A) };
        place_account(&mut status, Some(&with_id), "app").unwrap();
        let record = status.account.unwrap();
        assert_eq!(record.external_id.as_deref(), Some("new-id"));
        assert_eq!(record.user_arn.as_deref(), Some("arn:aws:iam::222222222222:user/k8s/app"), "kept");
    }
}
