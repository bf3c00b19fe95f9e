use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use proptest::prelude::*;

use jiff::SignedDuration;

use super::*;
use crate::crd::{DeletionPolicy, IamAccessKeySpec, RotationSpec};

fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn spec() -> IamAccessKeySpec {
    serde_json::from_value(serde_json::json!({"userName": "app"})).unwrap()
}

fn owner() -> Owner {
    Owner::new("c", "ns", "name")
}

fn iam_key(id: &str, status: KeyStatus) -> IamKey {
    IamKey { access_key_id: id.into(), status, create_date: t(0) }
}

fn owned(id: &str, phase: KeyPhase) -> OwnedKey {
    OwnedKey::new(id, phase, Time(t(0)))
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn claimed_with(keys: &[&str]) -> BTreeMap<String, String> {
    let o = owner();
    let mut m = tags(&[(OWNER_TAG, &o.0)]);
    for k in keys {
        m.insert(k.to_string(), o.key_tag_value());
    }
    m
}

#[derive(Debug)]
struct World {
    spec: IamAccessKeySpec,
    ledger: Ledger,
    user: UserObservation,
    secret: SecretObservation,
    now: Timestamp,
    last_used_due: Option<Timestamp>,
    rotate_requested_at: Option<String>,
    current_last_used: Option<Timestamp>,
    last_used_read_at: Option<Timestamp>,
    limits: crate::policy::Limits,
    secret_layout: SecretLayout,
}

impl World {
    fn new(keys: Vec<IamKey>, tags: Option<BTreeMap<String, String>>) -> Self {
        World {
            spec: spec(),
            ledger: Ledger::default(),
            user: UserObservation::Found { keys, tags },
            secret: SecretObservation::Missing,
            now: t(100),
            last_used_due: Some(t(10_000)),
            rotate_requested_at: None,
            current_last_used: None,
            last_used_read_at: None,
            limits: Default::default(),
            secret_layout: SecretLayout::Current,
        }
    }

    fn plan(&self) -> Step {
        let o = owner();
        plan_next_step(&Observation {
            now: self.now,
            owner: &o,
            previous_owner: None,
            spec: &self.spec,
            ledger: &self.ledger,
            rotate_requested_at: self.rotate_requested_at.as_deref(),
            user: &self.user,
            secret: &self.secret,
            last_used_due: self.last_used_due,
            current_last_used: self.current_last_used,
            last_used_read_at: self.last_used_read_at,
            limits: &self.limits,
            secret_layout: self.secret_layout,
        })
    }
}

/// A resource whose key A is current, published and Active.
fn converged() -> World {
    let mut w = World::new(vec![iam_key("A", KeyStatus::Active)], Some(claimed_with(&["A"])));
    w.ledger.keys = vec![owned("A", KeyPhase::Current)];
    w.ledger.key_status = Some(KeyStatus::Active);
    w.secret = SecretObservation::Ours { access_key_id: Some("A".into()) };
    w
}

#[test]
fn a_stale_layout_is_rewritten_and_one_that_cannot_be_read_back_takes_a_new_key_after_any_drain() {
    let mut w = converged();
    w.secret_layout = SecretLayout::Stale;
    assert_eq!(w.plan(), Step::RewriteSecret { access_key_id: "A".into() });
    w.secret_layout = SecretLayout::Unrecoverable;
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
    pending(&mut w, &["A"], 100);
    assert_eq!(w.plan(), Step::CreateKey { reason: NewKeyReason::LayoutChanged });
    // One rotation at a time: while a previous key drains, the Secret keeps its old layout and
    // is not read again in a loop.
    let mut w = converged();
    w.user = UserObservation::Found {
        keys: vec![iam_key("A", KeyStatus::Active), iam_key("B", KeyStatus::Active)],
        tags: Some(claimed_with(&["A", "B"])),
    };
    w.ledger.keys.push(OwnedKey { deactivate_at: Some(Time(t(500))), ..owned("B", KeyPhase::Draining) });
    w.secret_layout = SecretLayout::Unrecoverable;
    assert!(matches!(w.plan(), Step::Done { wake_at: Some(_) }), "{:?}", w.plan());
}

#[test]
fn new_resource_reads_tags_records_a_pending_create_then_creates_with_the_claim() {
    let mut w = World::new(vec![], None);
    assert_eq!(w.plan(), Step::ReadUser);
    // Status records that a key may come before anything is written to IAM (the claim).
    w.user = UserObservation::Found { keys: vec![], tags: Some(BTreeMap::new()) };
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec![] });
    pending(&mut w, &[], 100);
    // The claim is written with the new key's tag (one TagUser).
    assert_eq!(w.plan(), Step::CreateKey { reason: NewKeyReason::Initial });
    w.user = UserObservation::Found { keys: vec![], tags: Some(claimed_with(&[])) };
    assert_eq!(w.plan(), Step::CreateKey { reason: NewKeyReason::Initial });
}

#[test]
fn a_claim_lost_to_a_racing_resource_gives_up_only_our_keys_then_waits() {
    // Both read the user unclaimed and created a key; the other's claim was written last.
    let other = Owner::new("test", "team", "rival");
    let mut t = claimed_with(&["A"]);
    t.insert(OWNER_TAG.into(), other.0.clone());
    t.insert("B".into(), other.key_tag_value());
    let mut w = World::new(vec![iam_key("A", KeyStatus::Active), iam_key("B", KeyStatus::Active)], Some(t.clone()));
    w.ledger.keys = vec![owned("A", KeyPhase::Current)];
    w.secret = SecretObservation::Ours { access_key_id: Some("A".into()) };
    assert_eq!(w.plan(), Step::ReleaseKey { access_key_id: "A".into() });
    // Once ours is gone, the other's key and claim stand: wait, touching nothing.
    t.remove("A");
    w.user = UserObservation::Found { keys: vec![iam_key("B", KeyStatus::Active)], tags: Some(t) };
    w.ledger.keys.clear();
    assert_eq!(w.plan(), Step::Blocked(Blocked::UserClaimed { by: other.0 }));
}

#[test]
fn a_new_resource_facing_two_foreign_keys_writes_nothing_not_even_the_claim() {
    let keys = vec![iam_key("F1", KeyStatus::Active), iam_key("F2", KeyStatus::Active)];
    let w = World::new(keys, Some(BTreeMap::new()));
    let blocking = vec!["F1".to_string(), "F2".to_string()];
    assert_eq!(w.plan(), Step::Blocked(Blocked::KeyLimitExceeded { blocking }));
}

/// `status.pendingCreate`: the keys the user had, and `since` (seconds after `t(0)`).
fn pending(w: &mut World, before: &[&str], since: i64) {
    w.ledger.pending_create = Some(before.iter().map(|s| s.to_string()).collect());
    w.ledger.pending_since = Some(t(since));
}

fn key_created(id: &str, at: Timestamp) -> IamKey {
    IamKey { access_key_id: id.into(), status: KeyStatus::Active, create_date: at }
}

#[test]
fn user_claimed_by_another_resource_blocks_before_any_write() {
    let w = World::new(vec![], Some(tags(&[(OWNER_TAG, "other/ns/x")])));
    assert_eq!(w.plan(), Step::Blocked(Blocked::UserClaimed { by: "other/ns/x".into() }));
}

#[test]
fn a_secret_we_did_not_write_is_a_conflict_even_before_the_claim() {
    let mut w = World::new(vec![], Some(BTreeMap::new()));
    w.secret = SecretObservation::NotOurs;
    assert_eq!(w.plan(), Step::Blocked(Blocked::SecretConflict));
}

#[test]
fn a_key_whose_secret_name_was_taken_is_deleted_before_the_conflict_is_reported() {
    // Our verified key could not be written: someone created a Secret of that name in between.
    let mut w = World::new(vec![iam_key("F", KeyStatus::Active), iam_key("OURS", KeyStatus::Active)], None);
    w.secret = SecretObservation::NotOurs;
    w.ledger.pending_create = Some(vec!["F".into()]);
    assert_eq!(w.plan(), Step::ReadUser, "tags are needed to tell ours from foreign");
    let mut tags = claimed_with(&["OURS"]);
    tags.insert("F".into(), "someone-else".into());
    w.user = UserObservation::Found {
        keys: vec![iam_key("F", KeyStatus::Active), iam_key("OURS", KeyStatus::Active)],
        tags: Some(tags.clone()),
    };
    assert_eq!(w.plan(), Step::DeleteOrphan { access_key_id: "OURS".into(), tagged: true });
    w.user = UserObservation::Found { keys: vec![iam_key("F", KeyStatus::Active)], tags: Some(tags) };
    assert_eq!(w.plan(), Step::Blocked(Blocked::SecretConflict), "the foreign key is never touched");
}

#[test]
fn converged_resource_needs_no_tags_and_waits_for_the_next_due_time() {
    let mut w = converged();
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Active)], tags: None };
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(10_000)) });
}

#[test]
fn untagged_key_created_during_an_interrupted_create_is_deleted_but_older_foreign_keys_are_not() {
    let mut w =
        World::new(vec![iam_key("F", KeyStatus::Active), iam_key("LOST", KeyStatus::Active)], Some(claimed_with(&[])));
    pending(&mut w, &["F"], 0);
    assert_eq!(w.plan(), Step::DeleteOrphan { access_key_id: "LOST".into(), tagged: false });
    w.user = UserObservation::Found { keys: vec![iam_key("F", KeyStatus::Active)], tags: Some(claimed_with(&[])) };
    assert_eq!(w.plan(), Step::CreateKey { reason: NewKeyReason::Initial });
}

#[test]
fn an_untagged_key_is_the_remains_of_a_create_only_inside_its_window() {
    let since = t(1000);
    let mut ledger =
        Ledger { pending_create: Some(vec!["BEFORE".into()]), pending_since: Some(since), ..Default::default() };
    let at = |d: SignedDuration| since.checked_add(d).unwrap();
    let leftover =
        |ledger: &Ledger, id: &str, created: Timestamp| left_by_interrupted_create(&key_created(id, created), ledger);
    // The clock skew AWS tolerates, on either side of the window.
    assert!(leftover(&ledger, "K", at(-CLOCK_SKEW)));
    assert!(leftover(&ledger, "K", since));
    assert!(leftover(&ledger, "K", at(CREATE_WINDOW + CLOCK_SKEW)));
    assert!(!leftover(&ledger, "K", at(-CLOCK_SKEW - SignedDuration::from_secs(1))), "created before the create began");
    assert!(
        !leftover(&ledger, "K", at(CREATE_WINDOW + CLOCK_SKEW + SignedDuration::from_secs(1))),
        "created after the create must have happened"
    );
    assert!(!leftover(&ledger, "BEFORE", since), "the user had it before");
    ledger.pending_since = None;
    assert!(!leftover(&ledger, "K", since), "no since, no proof");
    ledger.pending_create = None;
    assert!(!leftover(&ledger, "K", since), "no create in progress");
}

#[test]
fn a_create_recorded_long_ago_is_renewed_before_the_key_is_created() {
    assert!(create_window_open(t(0), t(0)));
    assert!(create_window_open(t(0), t(60)));
    assert!(!create_window_open(t(0), t(61)), "older than CREATE_WINDOW");
    assert!(!create_window_open(t(10), t(0)), "recorded in the future");
}

// Forged status: whoever can write status (a tenant granted iamaccesskeys/status, say) must not
// be able to aim the operator at a key that IAM does not show as this resource's.

#[test]
fn forged_pending_create_from_long_ago_with_no_existing_keys_deletes_nothing() {
    // A person's untagged key, created an hour before the forged write; `since` a day back.
    let mut w = World::new(vec![key_created("PERSON", t(-3600))], Some(claimed_with(&[])));
    w.ledger.keys = vec![];
    pending(&mut w, &[], -86_400);
    let step = w.plan();
    assert!(!matches!(step, Step::DeleteOrphan { .. }), "{step:?}");
    // A new `since` now: the key predates it by more than the clock skew.
    pending(&mut w, &[], 100);
    let step = w.plan();
    assert!(!matches!(step, Step::DeleteOrphan { .. }), "{step:?}");
    // Nor on deletion.
    let o = owner();
    let user = UserObservation::Found { keys: vec![key_created("PERSON", t(-3600))], tags: Some(claimed_with(&[])) };
    for since in [-86_400, 100] {
        pending(&mut w, &[], since);
        let cleanup = plan_cleanup(&CleanupObservation {
            owner: &o,
            previous_owner: None,
            policy: DeletionPolicy::Delete,
            creation_policy: crate::crd::CreationPolicy::Owner,
            ledger: &w.ledger,
            user: &user,
            secret: &SecretObservation::Missing,
        });
        assert!(!matches!(cleanup, CleanupStep::DeleteKey { .. }), "{cleanup:?}");
    }
}

#[test]
fn forged_pending_create_in_the_future_deletes_nothing() {
    let mut w = World::new(vec![iam_key("PERSON", KeyStatus::Active)], Some(claimed_with(&[])));
    pending(&mut w, &[], 86_400);
    let step = w.plan();
    assert!(!matches!(step, Step::DeleteOrphan { .. }), "{step:?}");
}

#[test]
fn a_key_status_lists_without_our_tag_is_disowned_never_deleted_or_changed() {
    // Status (forged) lists a person's untagged key as retired long ago, and another resource's
    // key as draining past its grace period.
    let mut w = converged();
    let keys = vec![iam_key("A", KeyStatus::Active), iam_key("THEIRS", KeyStatus::Active)];
    let mut retired = owned("THEIRS", KeyPhase::Inactive);
    retired.delete_at = Some(Time(t(1)));
    w.ledger.keys.push(retired);
    // Status explains IAM: no tags are read, but no key is changed without them.
    w.user = UserObservation::Found { keys: keys.clone(), tags: None };
    assert_eq!(w.plan(), Step::ReadUser);
    w.user = UserObservation::Found { keys: keys.clone(), tags: Some(claimed_with(&["A"])) };
    assert_eq!(w.plan(), Step::DisownKey { access_key_id: "THEIRS".into() });
    let mut tags = claimed_with(&["A"]);
    tags.insert("THEIRS".into(), "iam-key-operator:c/other/app".into());
    w.ledger.keys[1].phase = KeyPhase::Draining;
    w.ledger.keys[1].deactivate_at = Some(Time(t(1)));
    w.user = UserObservation::Found { keys, tags: Some(tags) };
    assert_eq!(w.plan(), Step::DisownKey { access_key_id: "THEIRS".into() });
}

#[test]
fn a_forged_current_key_is_never_set_to_the_spec_status() {
    // Status lists a person's key as the current one; the spec asks for Inactive.
    let mut w = World::new(vec![iam_key("PERSON", KeyStatus::Active)], None);
    w.ledger.keys = vec![owned("PERSON", KeyPhase::Current)];
    w.ledger.key_status = Some(KeyStatus::Active);
    w.secret = SecretObservation::Ours { access_key_id: Some("PERSON".into()) };
    w.spec.key_status = KeyStatus::Inactive;
    assert_eq!(w.plan(), Step::ReadUser, "no SetKeyStatus without proof");
    w.user = UserObservation::Found { keys: vec![iam_key("PERSON", KeyStatus::Active)], tags: Some(claimed_with(&[])) };
    assert_eq!(w.plan(), Step::DisownKey { access_key_id: "PERSON".into() });
}

#[test]
fn cleanup_deletes_only_keys_iam_shows_as_ours_whatever_status_lists() {
    let o = owner();
    // Status lists a person's untagged key and another resource's tagged key.
    let ledger = Ledger {
        keys: vec![owned("PERSON", KeyPhase::Current), owned("THEIRS", KeyPhase::Draining)],
        ..Default::default()
    };
    let mut tags = claimed_with(&[]);
    tags.insert("THEIRS".into(), "iam-key-operator:c/other/app".into());
    let user = UserObservation::Found {
        keys: vec![iam_key("PERSON", KeyStatus::Active), iam_key("THEIRS", KeyStatus::Active)],
        tags: Some(tags),
    };
    for policy in [DeletionPolicy::Delete, DeletionPolicy::Retain] {
        let step = plan_cleanup(&CleanupObservation {
            owner: &o,
            previous_owner: None,
            policy,
            creation_policy: crate::crd::CreationPolicy::Owner,
            ledger: &ledger,
            user: &user,
            secret: &SecretObservation::Ours { access_key_id: Some("PERSON".into()) },
        });
        // Only our claim is removed; then the Secret (ours) goes.
        assert_eq!(step, CleanupStep::Untag { tag_keys: vec![OWNER_TAG.into()] }, "{policy:?}");
    }
}

#[test]
fn only_a_recorded_create_or_key_means_iam_may_hold_something_of_the_resource() {
    use crate::crd::{IamAccessKeyStatus, PendingCreate, RotationRecord};
    let mut status = IamAccessKeyStatus::default();
    assert!(!may_have_written_to_iam(&status), "never allowed, or never got as far as a create");
    status.conditions = vec![];
    status.pending_create = Some(PendingCreate { since: Time(t(0)), existing_key_ids: vec![] });
    assert!(may_have_written_to_iam(&status));
    status.pending_create = None;
    status.keys = vec![owned("A", KeyPhase::Current)];
    assert!(may_have_written_to_iam(&status));
    // Its keys deleted in IAM and forgotten: the claim may still be on the user.
    status.keys.clear();
    status.rotation = Some(RotationRecord::default());
    assert!(may_have_written_to_iam(&status));
}

#[test]
fn tagged_key_that_never_reached_the_secret_is_an_orphan() {
    let w = World::new(vec![iam_key("B", KeyStatus::Active)], Some(claimed_with(&["B"])));
    assert_eq!(w.plan(), Step::DeleteOrphan { access_key_id: "B".into(), tagged: true });
}

#[test]
fn key_in_the_secret_but_not_in_status_is_adopted() {
    let mut w = World::new(vec![iam_key("B", KeyStatus::Active)], Some(claimed_with(&["B"])));
    w.secret = SecretObservation::Ours { access_key_id: Some("B".into()) };
    assert_eq!(w.plan(), Step::AdoptSecretKey { key: iam_key("B", KeyStatus::Active) });
}

#[test]
fn secret_deleted_issues_a_new_key_and_current_drains() {
    let mut w = converged();
    w.secret = SecretObservation::Missing;
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
}

#[test]
fn console_deactivation_is_drift_and_is_reverted_but_a_spec_change_is_not_drift() {
    let mut w = converged();
    // Status explains IAM, yet a key is changed only once its tag proves it ours.
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Inactive)], tags: None };
    assert_eq!(w.plan(), Step::ReadUser);
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Inactive)], tags: Some(claimed_with(&["A"])) };
    let step = Step::SetKeyStatus { access_key_id: "A".into(), status: KeyStatus::Active, drift: true };
    assert_eq!(w.plan(), step);
    let mut w = converged();
    w.spec.key_status = KeyStatus::Inactive;
    let step = Step::SetKeyStatus { access_key_id: "A".into(), status: KeyStatus::Inactive, drift: false };
    assert_eq!(w.plan(), step);
}

#[test]
fn current_key_deleted_in_iam_is_untagged_forgotten_then_replaced() {
    let mut w = converged();
    w.user = UserObservation::Found { keys: vec![], tags: Some(claimed_with(&["A"])) };
    assert_eq!(w.plan(), Step::UntagStale { tag_keys: vec!["A".into()] });
    w.user = UserObservation::Found { keys: vec![], tags: Some(claimed_with(&[])) };
    assert_eq!(w.plan(), Step::ForgetKey { access_key_id: "A".into(), expected: false });
    w.ledger.keys.clear();
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec![] });
}

#[test]
fn two_foreign_keys_block_with_key_limit_exceeded_naming_them() {
    let w =
        World::new(vec![iam_key("F1", KeyStatus::Active), iam_key("F2", KeyStatus::Inactive)], Some(claimed_with(&[])));
    let blocking = vec!["F1".to_string(), "F2".to_string()];
    assert_eq!(w.plan(), Step::Blocked(Blocked::KeyLimitExceeded { blocking }));
}

#[test]
fn rotation_makes_room_only_by_deleting_our_retired_key() {
    let mut w = converged();
    w.user = UserObservation::Found {
        keys: vec![iam_key("A", KeyStatus::Active), iam_key("OLD", KeyStatus::Inactive)],
        tags: Some(claimed_with(&["A", "OLD"])),
    };
    let mut old = owned("OLD", KeyPhase::Inactive);
    old.delete_at = Some(Time(t(50_000)));
    w.ledger.keys.push(old);
    w.spec.rotation = Some(RotationSpec { serial: 1, ..Default::default() });
    assert_eq!(w.plan(), Step::MakeRoom { access_key_id: "OLD".into() });
}

#[test]
fn draining_key_is_retired_after_grace_then_deleted_after_the_window() {
    let mut w = converged();
    w.user = UserObservation::Found {
        keys: vec![iam_key("A", KeyStatus::Active), iam_key("OLD", KeyStatus::Active)],
        tags: None,
    };
    let mut old = owned("OLD", KeyPhase::Draining);
    old.deactivate_at = Some(Time(t(200)));
    old.delete_at = Some(Time(t(300)));
    w.ledger.keys.push(old.clone());
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(200)) });
    w.now = t(200);
    // The tags prove the key ours before it is changed.
    assert_eq!(w.plan(), Step::ReadUser);
    let keys = vec![iam_key("A", KeyStatus::Active), iam_key("OLD", KeyStatus::Active)];
    w.user = UserObservation::Found { keys, tags: Some(claimed_with(&["A", "OLD"])) };
    assert_eq!(w.plan(), Step::RetireKey { access_key_id: "OLD".into(), already_inactive: false, still_in_use: false });
    old.phase = KeyPhase::Inactive;
    w.ledger.keys[1] = old;
    // An admin reactivated it for a rollback: not fought during the window.
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(300)) });
    w.now = t(300);
    assert_eq!(w.plan(), Step::DeleteRetired { access_key_id: "OLD".into() });
}

#[test]
fn serial_bump_and_annotation_rotate_once() {
    let mut w = converged();
    w.spec.rotation = Some(RotationSpec { serial: 2, ..Default::default() });
    w.ledger.rotated_serial = 1;
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
    w.ledger.rotated_serial = 2;
    w.rotate_requested_at = Some("2026-01-01T00:00:00Z".into());
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
    w.ledger.rotate_requested_at = w.rotate_requested_at.clone();
    assert!(matches!(w.plan(), Step::Done { .. }));
}

#[test]
fn cleanup_deletes_our_keys_untags_then_deletes_the_secret_and_never_touches_foreign_keys() {
    let o = owner();
    let ledger = Ledger { keys: vec![owned("A", KeyPhase::Current)], ..Default::default() };
    let mut all_tags = claimed_with(&["A"]);
    all_tags.insert("F".into(), "someone else".into());
    let keys = vec![iam_key("F", KeyStatus::Active), iam_key("A", KeyStatus::Active)];
    let secret = SecretObservation::Ours { access_key_id: Some("A".into()) };
    let run = |policy, keys: Vec<IamKey>, tags: BTreeMap<String, String>| {
        let user = UserObservation::Found { keys, tags: Some(tags) };
        plan_cleanup(&CleanupObservation {
            owner: &o,
            previous_owner: None,
            policy,
            creation_policy: crate::crd::CreationPolicy::Owner,
            ledger: &ledger,
            user: &user,
            secret: &secret,
        })
    };
    assert_eq!(
        run(DeletionPolicy::Delete, keys.clone(), all_tags.clone()),
        CleanupStep::DeleteKey { access_key_id: "A".into() }
    );
    let only_foreign = vec![iam_key("F", KeyStatus::Active)];
    let untag = CleanupStep::Untag { tag_keys: vec!["A".into(), OWNER_TAG.into()] };
    assert_eq!(run(DeletionPolicy::Delete, only_foreign.clone(), all_tags.clone()), untag);
    assert_eq!(
        run(DeletionPolicy::Retain, keys, all_tags.clone()),
        CleanupStep::MarkRetained { access_key_ids: vec!["A".into()] }
    );
    let mut untagged = all_tags.clone();
    untagged.retain(|k, _| k == "F");
    assert_eq!(run(DeletionPolicy::Delete, only_foreign, untagged), CleanupStep::DeleteSecret);
}

// Random worlds: whatever IAM, status and the Secret look like (status forged included: it may
// list any key, record any pending create, with or without keys), and whatever tags the user
// carries (ours, another resource's, a person's, retained ones, tags of keys that are gone), the
// planner never changes or deletes a key IAM does not show as this resource's, never deletes or
// retires the current key, never creates a third key, and never touches a tag it did not write;
// on deletion, it deletes only keys IAM shows as ours. Each kind of step has its rule.
fn arb_world() -> impl Strategy<Value = World> {
    let ids = ["A", "B", "C", "D"];
    // Creation dates around `since`: far before, just inside and just outside the create's
    // window (5m of clock skew before, 1m + 5m after), far after.
    let offsets = [-86_400, -301, -300, 10, 360, 361, 86_400];
    // (id, active, tag kind (see `tag_value`), created at offsets[..])
    let key = (0..4usize, any::<bool>(), 0..6u8, 0..offsets.len());
    // Tags of keys that are not on the user: (id, tag kind); and a tag unrelated to keys.
    let other_tags = (proptest::collection::vec((0..4usize, 0..6u8), 0..=2), any::<bool>());
    (
        proptest::collection::vec(key, 0..=2),
        proptest::collection::vec((0..4usize, 0..3u8, 0..400i64), 0..=3),
        0..3u8,
        0..3u8,
        0..4usize,
        0..400i64,
        0..3i64,
        (any::<bool>(), proptest::collection::vec(0..4usize, 0..=2)),
        any::<bool>(),
        other_tags,
    )
        .prop_map(
            move |(iam, ledger, claim, secret_kind, secret_id, now, serial, pending, tags_read, (gone_tags, team))| {
                let mut keys: Vec<IamKey> = vec![];
                let mut tag_map = BTreeMap::new();
                let o = owner();
                match claim {
                    0 => {}
                    1 => drop(tag_map.insert(OWNER_TAG.to_string(), o.0.clone())),
                    _ => drop(tag_map.insert(OWNER_TAG.to_string(), "c/ns/other".to_string())),
                }
                if team {
                    tag_map.insert("team".to_string(), "billing".to_string());
                }
                let since = t(200);
                for (i, active, tag, created) in iam {
                    let id = ids[i];
                    if keys.iter().any(|k| k.access_key_id == id) {
                        continue;
                    }
                    let status = if active { KeyStatus::Active } else { KeyStatus::Inactive };
                    keys.push(IamKey {
                        access_key_id: id.into(),
                        status,
                        create_date: after(since, SignedDuration::from_secs(offsets[created])),
                    });
                    if let Some(v) = tag_value(tag) {
                        tag_map.insert(id.to_string(), v);
                    }
                }
                for (i, tag) in gone_tags {
                    let id = ids[i];
                    if !keys.iter().any(|k| k.access_key_id == id)
                        && let Some(v) = tag_value(tag)
                    {
                        tag_map.insert(id.to_string(), v);
                    }
                }
                let mut w = World::new(keys, tags_read.then_some(tag_map));
                for (i, phase, at) in ledger {
                    let id = ids[i];
                    if w.ledger.keys.iter().any(|k| k.access_key_id == id) {
                        continue;
                    }
                    let phase = [KeyPhase::Current, KeyPhase::Draining, KeyPhase::Inactive][phase as usize];
                    if phase == KeyPhase::Current && w.ledger.keys.iter().any(|k| k.phase == KeyPhase::Current) {
                        continue;
                    }
                    let mut k = owned(id, phase);
                    k.deactivate_at = Some(Time(t(at)));
                    k.delete_at = Some(Time(t(at + 100)));
                    w.ledger.keys.push(k);
                }
                w.secret = match secret_kind {
                    0 => SecretObservation::Missing,
                    1 => SecretObservation::NotOurs,
                    _ => SecretObservation::Ours { access_key_id: Some(ids[secret_id].to_string()) },
                };
                w.now = t(now);
                w.spec.rotation = Some(RotationSpec { serial, ..Default::default() });
                if let (true, before) = pending {
                    w.ledger.pending_create = Some(before.into_iter().map(|i| ids[i].to_string()).collect());
                    w.ledger.pending_since = Some(since);
                }
                w
            },
        )
}

/// A per-key tag: none, ours, another resource's, a person's description, ours retained, or
/// another cluster's name for this very resource.
fn tag_value(kind: u8) -> Option<String> {
    let o = owner();
    match kind {
        0 => None,
        1 => Some(o.key_tag_value()),
        2 => Some("iam-key-operator:x/y/z".into()),
        3 => Some("alice's laptop".into()),
        4 => Some(o.retained_tag_value()),
        _ => Some(Owner::new("old-cluster", "ns", "name").key_tag_value()),
    }
}

/// The oracle: whether IAM shows the key as this resource's, from the rule as docs/decisions.md
/// states it, not from the planner's code. Our tag on it; or no tag at all, not among the keys
/// `pendingCreate` recorded, and created from 5 minutes before its `since` to 6 minutes after.
/// Without the tags, nothing is proven.
fn oracle_ours(w: &World, id: &str) -> bool {
    let UserObservation::Found { keys, tags: Some(tags) } = &w.user else { return false };
    let Some(key) = keys.iter().find(|k| k.access_key_id == id) else { return false };
    match tags.get(id) {
        Some(v) => *v == format!("iam-key-operator:{}", owner().0),
        None => match (&w.ledger.pending_create, w.ledger.pending_since) {
            (Some(before), Some(since)) => {
                let from = since.as_second() - 300;
                let to = since.as_second() + 360;
                !before.iter().any(|b| b == id) && (from..=to).contains(&key.create_date.as_second())
            }
            _ => false,
        },
    }
}

/// The oracle's answer for a tag: whether this resource wrote it (its claim, or its key's tag).
fn oracle_our_tag(key: &str, value: &str) -> bool {
    let o = owner();
    (key == OWNER_TAG && value == o.0) || value == format!("iam-key-operator:{}", o.0)
}

proptest! {
    #[test]
    fn planner_never_touches_keys_iam_does_not_show_as_ours_nor_exceeds_two(w in arb_world()) {
        let UserObservation::Found { keys, tags } = &w.user else { unreachable!() };
        let ids: Vec<String> = keys.iter().map(|k| k.access_key_id.clone()).collect();
        let in_iam = |id: &str| ids.iter().any(|k| k == id);
        let tracked = |id: &str| w.ledger.keys.iter().find(|k| k.access_key_id == id);
        let current = w.ledger.keys.iter().find(|k| k.phase == KeyPhase::Current).map(|k| k.access_key_id.clone());
        let is_current = |id: &str| current.as_deref() == Some(id);
        let in_secret = |id: &str| w.secret == SecretObservation::Ours { access_key_id: Some(id.to_owned()) };
        let tag = |id: &str| tags.as_ref().and_then(|t| t.get(id)).cloned();
        let step = w.plan();
        match &step {
            Step::ReadUser => prop_assert!(tags.is_none()),
            Step::Blocked(Blocked::UserClaimed { by }) => {
                prop_assert!(tag(OWNER_TAG).as_ref() == Some(by) && *by != owner().0);
                // Keys it created are given up first.
                prop_assert!(!ids.iter().any(|k| tag(k).is_some_and(|v| oracle_our_tag(k, &v))), "{step:?}");
            }
            // The user claimed by another: only a key with our tag is given up.
            Step::ReleaseKey { access_key_id: id } => {
                prop_assert!(tag(OWNER_TAG).is_some_and(|c| c != owner().0), "{step:?}");
                prop_assert!(in_iam(id) && tag(id).is_some_and(|v| oracle_our_tag(id, &v)), "{step:?}");
            }
            Step::Blocked(Blocked::SecretConflict) => prop_assert_eq!(&w.secret, &SecretObservation::NotOurs),
            Step::Blocked(Blocked::KeyLimitExceeded { blocking }) => {
                prop_assert!(keys.len() >= MAX_KEYS_PER_USER);
                prop_assert_eq!(blocking, &ids);
            }
            Step::Blocked(Blocked::KeyUnused { access_key_id: id, .. }) => prop_assert!(is_current(id)),
            Step::Blocked(Blocked::Paused | Blocked::UserNotFound) => prop_assert!(false, "{step:?} with a user found"),
            // Owner, no spec.adopt, no policy limits on them in this world.
            Step::Blocked(Blocked::AdoptionRefused(_) | Blocked::MergeNotAllowed { .. } | Blocked::SecretNotFound) => {
                prop_assert!(false, "{step:?} without spec.adopt or creationPolicy Merge")
            }
            Step::ClaimUser => prop_assert!(tags.is_some() && tag(OWNER_TAG).is_none()),
            Step::TakeOverTags { .. } => prop_assert!(false, "{step:?} without a previous cluster name"),
            Step::AdoptKey => prop_assert!(false, "{step:?} without spec.adopt"),
            Step::DeleteOrphan { access_key_id: id, tagged } => {
                prop_assert!(oracle_ours(&w, id), "{step:?} on a key IAM does not show as ours");
                prop_assert!(tracked(id).is_none() && !is_current(id));
                prop_assert_eq!(*tagged, tag(id).is_some());
                prop_assert!(!(*tagged && in_secret(id)), "{step:?}: the key the Secret holds");
            }
            Step::AdoptSecretKey { key } => {
                let id = key.access_key_id.as_str();
                prop_assert!(oracle_ours(&w, id) && tag(id).is_some() && in_secret(id) && tracked(id).is_none());
            }
            Step::UntagStale { tag_keys } => {
                for k in tag_keys {
                    let value = tag(k).unwrap_or_default();
                    prop_assert!(oracle_our_tag(k, &value) && k != OWNER_TAG && !in_iam(k), "{step:?}");
                }
            }
            Step::ForgetKey { access_key_id: id, .. } => prop_assert!(tracked(id).is_some() && !in_iam(id)),
            // A key status lists is kept only with our tag on it (an untagged one inside a
            // create is then deleted as that create's remains).
            Step::DisownKey { access_key_id: id } => {
                prop_assert!(tracked(id).is_some() && tags.is_some());
                prop_assert!(!oracle_our_tag(id, &tag(id).unwrap_or_default()));
            }
            Step::MakeRoom { access_key_id: id } | Step::DeleteRetired { access_key_id: id } => {
                prop_assert!(oracle_ours(&w, id), "{step:?} on a key IAM does not show as ours");
                prop_assert!(!is_current(id));
                prop_assert_eq!(tracked(id).map(|k| k.phase), Some(KeyPhase::Inactive));
            }
            Step::RetireKey { access_key_id: id, .. } => {
                prop_assert!(oracle_ours(&w, id), "{step:?} on a key IAM does not show as ours");
                prop_assert!(!is_current(id));
                prop_assert_eq!(tracked(id).map(|k| k.phase), Some(KeyPhase::Draining));
            }
            Step::SetKeyStatus { access_key_id: id, status, .. } => {
                prop_assert!(oracle_ours(&w, id), "{step:?} on a key IAM does not show as ours");
                prop_assert!(is_current(id) && *status == w.spec.key_status);
            }
            Step::DeactivateUnused { access_key_id: id, .. } => {
                prop_assert!(oracle_ours(&w, id), "{step:?} on a key IAM does not show as ours");
                prop_assert!(is_current(id) && w.limits.deactivate_unused_after.is_some());
            }
            Step::StartCreate { existing_key_ids } => {
                prop_assert!(keys.len() < MAX_KEYS_PER_USER);
                prop_assert_eq!(existing_key_ids, &ids);
            }
            Step::CreateKey { .. } => {
                prop_assert!(keys.len() < MAX_KEYS_PER_USER);
                prop_assert_eq!(w.ledger.pending_create.as_ref(), Some(&ids));
            }
            Step::ClearPending => prop_assert!(w.ledger.pending_create.is_some()),
            Step::RewriteSecret { .. } => prop_assert!(false, "{step:?} with the Secret's layout current"),
            Step::RestartTargets { access_key_id: id } => {
                prop_assert!(is_current(id) && !w.spec.restart_targets.is_empty())
            }
            Step::CheckKeyUsage { access_key_id: id } => {
                prop_assert_eq!(tracked(id).map(|k| k.phase), Some(KeyPhase::Draining))
            }
            Step::RefreshLastUsed { access_key_id: id } => prop_assert!(is_current(id)),
            Step::Done { wake_at } => prop_assert!(wake_at.is_none_or(|t| t > w.now), "{step:?} at {}", w.now),
        }
    }

    #[test]
    fn cleanup_deletes_and_retains_only_keys_iam_shows_as_ours(
        w in arb_world(),
        retain in any::<bool>(),
        creation_policy in prop_oneof![
            Just(crate::crd::CreationPolicy::Owner),
            Just(crate::crd::CreationPolicy::Adopt),
            Just(crate::crd::CreationPolicy::Merge),
            Just(crate::crd::CreationPolicy::Orphan),
        ],
    ) {
        let o = owner();
        let policy = if retain { DeletionPolicy::Retain } else { DeletionPolicy::Delete };
        let step = plan_cleanup(&CleanupObservation {
            owner: &o, previous_owner: None, policy, creation_policy, ledger: &w.ledger, user: &w.user, secret: &w.secret,
        });
        let tags = match &w.user {
            UserObservation::Found { tags, .. } => tags.clone(),
            UserObservation::Missing => None,
        };
        let secret_ours = matches!(w.secret, SecretObservation::Ours { .. });
        match &step {
            CleanupStep::ReadUser => prop_assert!(tags.is_none()),
            CleanupStep::DeleteKey { access_key_id: id } => prop_assert!(oracle_ours(&w, id), "{step:?}"),
            CleanupStep::MarkRetained { access_key_ids } => {
                prop_assert!(retain, "{step:?} under deletionPolicy Delete");
                for id in access_key_ids {
                    prop_assert!(oracle_ours(&w, id), "{step:?}");
                }
            }
            CleanupStep::Untag { tag_keys } => {
                let tags = tags.unwrap_or_default();
                for k in tag_keys {
                    prop_assert!(oracle_our_tag(k, tags.get(k).map_or("", String::as_str)), "{step:?}");
                }
            }
            // Only a Secret the resource owns is deleted; Orphan leaves it, Merge takes back its entries.
            CleanupStep::DeleteSecret => prop_assert!(secret_ours && creation_policy.owns(), "{step:?}"),
            CleanupStep::LeaveSecret => {
                prop_assert!(secret_ours && creation_policy == crate::crd::CreationPolicy::Orphan, "{step:?}")
            }
            CleanupStep::UnmergeSecret => {
                prop_assert!(secret_ours && creation_policy == crate::crd::CreationPolicy::Merge, "{step:?}")
            }
            CleanupStep::Done => prop_assert!(!secret_ours, "{step:?}"),
        }
    }
}

#[test]
fn restart_targets_roll_out_once_per_published_key() {
    let mut w = converged();
    w.spec.restart_targets =
        vec![crate::crd::RestartTarget { kind: crate::crd::RestartKind::Deployment, name: "web".into() }];
    assert_eq!(w.plan(), Step::RestartTargets { access_key_id: "A".into() });
    w.ledger.restarted_for = Some("A".into());
    assert!(matches!(w.plan(), Step::Done { .. }));
}

fn draining_world(wait_for_unused: bool) -> World {
    let mut w = converged();
    w.user = UserObservation::Found {
        keys: vec![iam_key("A", KeyStatus::Active), iam_key("OLD", KeyStatus::Active)],
        tags: Some(claimed_with(&["A", "OLD"])),
    };
    let mut old = owned("OLD", KeyPhase::Draining);
    old.replaced_at = Some(Time(t(100)));
    old.deactivate_at = Some(Time(t(200)));
    w.ledger.keys.push(old);
    w.spec.rotation = Some(RotationSpec {
        wait_for_unused,
        usage_check_interval: "10s".parse().unwrap(),
        max_wait: "1000s".parse().unwrap(),
        ..Default::default()
    });
    w.now = t(200);
    w
}

#[test]
fn wait_for_unused_holds_a_used_key_active_and_rechecks_on_its_interval() {
    let mut w = draining_world(true);
    assert_eq!(w.plan(), Step::CheckKeyUsage { access_key_id: "OLD".into() });
    // Used during the last interval: wait for the next check.
    w.ledger.keys[1].usage_checked_at = Some(Time(t(200)));
    w.ledger.keys[1].last_used_at = Some(Time(t(195)));
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(210)) });
    w.now = t(210);
    assert_eq!(w.plan(), Step::CheckKeyUsage { access_key_id: "OLD".into() });
    // Still used within the last interval (10s before the check): keep waiting.
    w.ledger.keys[1].usage_checked_at = Some(Time(t(210)));
    w.ledger.keys[1].last_used_at = Some(Time(t(205)));
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(220)) });
    // The client switched: no use during the interval before the check. Retire.
    w.now = t(220);
    w.ledger.keys[1].usage_checked_at = Some(Time(t(220)));
    let retire = Step::RetireKey { access_key_id: "OLD".into(), already_inactive: false, still_in_use: false };
    assert_eq!(w.plan(), retire);
}

#[test]
fn wait_for_unused_counts_a_use_in_the_second_the_key_was_replaced() {
    // Replaced at t(100) plus half a second; IAM says "used at t(100)", to the second: that use
    // may have come after the replacement, so the key is in use.
    let mut w = draining_world(true);
    let half = SignedDuration::from_millis(500);
    w.ledger.keys[1].replaced_at = Some(Time(t(100) + half));
    w.ledger.keys[1].deactivate_at = Some(Time(t(101) + half));
    w.now = t(102);
    w.ledger.keys[1].usage_checked_at = Some(Time(t(102)));
    w.ledger.keys[1].last_used_at = Some(Time(t(100)));
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(112)) });
    // Used the second before: that was before the replacement.
    w.ledger.keys[1].last_used_at = Some(Time(t(99)));
    assert!(matches!(w.plan(), Step::RetireKey { still_in_use: false, .. }));
}

#[test]
fn wait_for_unused_gives_up_after_max_wait_and_says_so() {
    let mut w = draining_world(true);
    w.ledger.keys[1].usage_checked_at = Some(Time(t(1095)));
    w.ledger.keys[1].last_used_at = Some(Time(t(1090)));
    w.now = t(1100);
    let retire = Step::RetireKey { access_key_id: "OLD".into(), already_inactive: false, still_in_use: true };
    assert_eq!(w.plan(), retire);
}

#[test]
fn a_usage_check_made_during_the_grace_period_does_not_count() {
    let mut w = draining_world(true);
    w.ledger.keys[1].usage_checked_at = Some(Time(t(150)));
    assert_eq!(w.plan(), Step::CheckKeyUsage { access_key_id: "OLD".into() });
    let w = draining_world(false);
    assert!(matches!(w.plan(), Step::RetireKey { still_in_use: false, .. }));
}

#[test]
fn scheduled_rotation_is_due_interval_after_the_key_was_created() {
    let mut w = converged();
    w.spec.rotation = Some(RotationSpec { interval: Some("200s".parse().unwrap()), ..Default::default() });
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(200)) });
    w.now = t(200);
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
}

#[test]
fn policy_max_key_age_forces_a_rotation_before_the_schedule() {
    let mut w = converged();
    w.spec.rotation = Some(RotationSpec { interval: Some("1000s".parse().unwrap()), ..Default::default() });
    w.limits.max_key_age = Some("300s".parse().unwrap());
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(300)) });
    w.now = t(300);
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
    pending(&mut w, &["A"], 300);
    assert_eq!(w.plan(), Step::CreateKey { reason: NewKeyReason::MaxKeyAge });
}

#[test]
fn policy_deactivates_an_unused_key_and_reports_it_without_fighting_back() {
    let mut w = converged();
    w.limits.deactivate_unused_after = Some("500s".parse().unwrap());
    w.current_last_used = Some(t(50));
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(550)) });
    w.now = t(550);
    // A reading from before the limit passed may miss a use: read again first.
    assert_eq!(w.plan(), Step::RefreshLastUsed { access_key_id: "A".into() });
    w.last_used_read_at = Some(t(550));
    assert_eq!(w.plan(), Step::DeactivateUnused { access_key_id: "A".into(), since: t(50) });
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Inactive)], tags: None };
    assert_eq!(w.plan(), Step::Blocked(Blocked::KeyUnused { access_key_id: "A".into(), since: t(50) }));
    // A rotation request issues a fresh, usable key.
    w.rotate_requested_at = Some("now".into());
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec!["A".into()] });
}

#[test]
fn a_tag_left_by_a_deleted_key_is_removed_before_the_key_is_forgotten() {
    let mut w = converged();
    let mut old = owned("OLD", KeyPhase::Inactive);
    old.delete_at = Some(Time(t(50)));
    w.ledger.keys.push(old);
    // OLD was deleted in IAM, but its tag stayed (the untag after the delete failed).
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Active)], tags: None };
    assert_eq!(w.plan(), Step::ReadUser);
    w.user =
        UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Active)], tags: Some(claimed_with(&["A", "OLD"])) };
    assert_eq!(w.plan(), Step::UntagStale { tag_keys: vec!["OLD".into()] });
    w.user = UserObservation::Found { keys: vec![iam_key("A", KeyStatus::Active)], tags: Some(claimed_with(&["A"])) };
    assert_eq!(w.plan(), Step::ForgetKey { access_key_id: "OLD".into(), expected: true });
}

// Counterexamples the simulation found, kept as plain tests.

/// The Secret is lost while the previous key drains: the planner rightly waits for the end of
/// the grace period (both slots are ours) — and then retires the draining key, rather than
/// answering `KeyLimitExceeded` naming our own two keys, which would never free a slot.
#[test]
fn secret_lost_while_a_key_drains_retires_it_instead_of_blocking_forever() {
    let keys = vec![iam_key("K1", KeyStatus::Active), iam_key("K2", KeyStatus::Active)];
    let mut w = World::new(keys, Some(claimed_with(&["K1", "K2"])));
    let mut draining = owned("K1", KeyPhase::Draining);
    draining.deactivate_at = Some(Time(t(600)));
    draining.replaced_at = Some(Time(t(0)));
    w.ledger.keys = vec![draining, owned("K2", KeyPhase::Current)];
    w.ledger.key_status = Some(KeyStatus::Active);
    w.last_used_due = Some(t(3600));
    // During the grace period: wait for it to end (both slots are ours, one frees up then).
    w.now = t(1);
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(600)) });
    // At its end the draining key must be retired (then deleted after retainInactive, or
    // deleted early by MakeRoom), not reported as a key limit nobody can resolve.
    w.now = t(600);
    let retire = Step::RetireKey { access_key_id: "K1".into(), already_inactive: false, still_in_use: false };
    assert_eq!(w.plan(), retire);
}

/// A policy's `deactivateUnusedAfter` decides only on a reading taken after the limit passed:
/// the last reading, however old, may miss a use (here a client used the key since), and after
/// a restart the next read is spread up to `--last-used-refresh` ahead, so "not due" does not
/// mean "fresh" either.
#[test]
fn deactivate_unused_reads_last_use_again_before_deactivating() {
    let mut w = World::new(vec![iam_key("K1", KeyStatus::Active)], None);
    w.ledger.keys = vec![owned("K1", KeyPhase::Current)];
    w.ledger.key_status = Some(KeyStatus::Active);
    w.secret = SecretObservation::Ours { access_key_id: Some("K1".into()) };
    w.limits.deactivate_unused_after = Some(crate::crd::Duration::from_secs(86_400));
    w.now = t(86_400);
    w.last_used_due = Some(t(86_400));
    assert_eq!(w.plan(), Step::RefreshLastUsed { access_key_id: "K1".into() });
}

/// A rotation that is due but waits for a draining key (a key adopted past `maxKeyAge`, an
/// `interval` shorter than `gracePeriod`, `waitForUnused` holding the previous key) wakes up when
/// that key retires, not at the past due time: the controller would requeue at once, a hot loop.
#[test]
fn a_rotation_held_back_by_a_draining_key_does_not_wake_in_the_past() {
    let keys = vec![iam_key("K1", KeyStatus::Active), iam_key("K2", KeyStatus::Active)];
    let mut w = World::new(keys, None);
    w.spec.rotation =
        Some(RotationSpec { interval: Some(crate::crd::Duration::from_secs(3600)), ..Default::default() });
    let mut draining = owned("K1", KeyPhase::Draining);
    draining.deactivate_at = Some(Time(t(4000)));
    draining.replaced_at = Some(Time(t(0)));
    w.ledger.keys = vec![draining, owned("K2", KeyPhase::Current)];
    w.ledger.key_status = Some(KeyStatus::Active);
    w.secret = SecretObservation::Ours { access_key_id: Some("K2".into()) };
    w.now = t(3700);
    w.last_used_due = Some(t(7200));
    // The scheduled rotation (due at t(3600)) waits for K1, which retires at t(4000).
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(4000)) });
}

/// Limits from one policy, `p`, with `allow` of adoption and merging.
fn allowing(adoption: bool, merge: bool) -> crate::policy::Limits {
    use crate::policy::Takeover;
    let refused = [(Takeover::Adoption, adoption), (Takeover::Merge, merge)]
        .into_iter()
        .filter(|(_, allowed)| !allowed)
        .map(|(what, _)| (what, "p".to_string()))
        .collect();
    crate::policy::Limits { policies: vec!["p".into()], takeover_refused_by: refused, ..Default::default() }
}

/// A fresh resource with `spec.adopt`, its user holding the key X (made by Terraform) and
/// another key of someone else.
fn adopting() -> World {
    let mut w =
        World::new(vec![iam_key("X", KeyStatus::Active), iam_key("Y", KeyStatus::Active)], Some(BTreeMap::new()));
    w.spec.adopt = Some(crate::crd::AdoptSpec::default());
    w.spec.secret.creation_policy = crate::crd::CreationPolicy::Adopt;
    w.limits = allowing(true, false);
    w.secret = SecretObservation::Available;
    w
}

#[test]
fn adoption_needs_every_matching_rule_to_allow_it_and_changes_nothing_until_then() {
    let mut w = adopting();
    w.limits = allowing(false, false);
    assert_eq!(
        w.plan(),
        Step::Blocked(Blocked::AdoptionRefused(AdoptionRefusal::NotAllowed { policies: vec!["p".into()] }))
    );
    // Not even read: the refusal comes before the user's tags are needed.
    w.user = UserObservation::Found { keys: vec![iam_key("X", KeyStatus::Active)], tags: None };
    assert!(matches!(w.plan(), Step::Blocked(Blocked::AdoptionRefused(_))));
    w.limits = allowing(true, false);
    assert_eq!(w.plan(), Step::ReadUser, "the tags tell whose the key is");
}

#[test]
fn adoption_takes_the_key_over_instead_of_creating_one_even_with_both_slots_taken() {
    let w = adopting();
    assert_eq!(w.plan(), Step::AdoptKey, "no slot is needed: the key is on the user already");
    // In place, under Merge too; from another Secret into a missing one.
    let mut merge = adopting();
    merge.spec.secret.creation_policy = crate::crd::CreationPolicy::Merge;
    merge.limits = allowing(true, true);
    assert_eq!(merge.plan(), Step::AdoptKey);
    let mut elsewhere = adopting();
    elsewhere.secret = SecretObservation::Missing;
    assert_eq!(elsewhere.plan(), Step::AdoptKey);
    // A user another resource claims, or a Secret that is not ours to write: those reasons first.
    let mut claimed = adopting();
    claimed.user = UserObservation::Found {
        keys: vec![iam_key("X", KeyStatus::Active)],
        tags: Some(tags(&[(OWNER_TAG, "c/ns/other")])),
    };
    assert_eq!(claimed.plan(), Step::Blocked(Blocked::UserClaimed { by: "c/ns/other".into() }));
    let mut conflict = adopting();
    conflict.secret = SecretObservation::NotOurs;
    assert_eq!(conflict.plan(), Step::Blocked(Blocked::SecretConflict));
}

#[test]
fn an_interrupted_adoption_resumes_and_never_deletes_the_adopted_key() {
    // Crash after the Secret was written, before the tag: the key is in our Secret, untagged.
    let mut w = adopting();
    w.secret = SecretObservation::Ours { access_key_id: Some("X".into()) };
    assert_eq!(w.plan(), Step::AdoptKey);
    // Crash after the tag (which carries the claim), before status: recorded as found in the Secret.
    w.user = UserObservation::Found {
        keys: vec![iam_key("X", KeyStatus::Active), iam_key("Y", KeyStatus::Active)],
        tags: Some(claimed_with(&["X"])),
    };
    assert_eq!(w.plan(), Step::AdoptSecretKey { key: iam_key("X", KeyStatus::Active) });
    // Claimed by this resource already (a key of an earlier one, say), nothing tracked: adopt.
    w.user = UserObservation::Found { keys: vec![iam_key("X", KeyStatus::Active)], tags: Some(claimed_with(&[])) };
    w.secret = SecretObservation::Available;
    assert_eq!(w.plan(), Step::AdoptKey);
}

#[test]
fn spec_adopt_is_read_only_before_the_first_key() {
    // Adopted: managed like a created key from then on.
    let mut w = converged();
    w.spec.adopt = Some(crate::crd::AdoptSpec::default());
    w.ledger.installed = true;
    assert_eq!(w.plan(), Step::Done { wake_at: Some(t(10_000)) });
    // The adopted key deleted outside: a new key, not another adoption.
    let mut lost = adopting();
    lost.ledger.installed = true;
    lost.user = UserObservation::Found { keys: vec![], tags: Some(claimed_with(&[])) };
    assert_eq!(lost.plan(), Step::StartCreate { existing_key_ids: vec![] });
}

#[test]
fn merge_needs_every_matching_rule_to_allow_it_and_an_existing_secret() {
    let mut w = World::new(vec![], Some(BTreeMap::new()));
    w.spec.secret.creation_policy = crate::crd::CreationPolicy::Merge;
    w.limits = allowing(false, false);
    assert_eq!(w.plan(), Step::Blocked(Blocked::MergeNotAllowed { policies: vec!["p".into()] }));
    w.limits = allowing(false, true);
    assert_eq!(w.plan(), Step::Blocked(Blocked::SecretNotFound), "never created");
    w.secret = SecretObservation::Available;
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec![] });
    // Allowed once and no longer: nothing more is written (the keys stay as they are).
    let mut merged = converged();
    merged.spec.secret.creation_policy = crate::crd::CreationPolicy::Merge;
    merged.limits = allowing(false, false);
    merged.spec.rotation = Some(RotationSpec { serial: 1, ..Default::default() });
    assert!(matches!(merged.plan(), Step::Blocked(Blocked::MergeNotAllowed { .. })));
    // A Secret gone under Merge: a key of ours that nobody holds is deleted, then it waits.
    let mut gone = converged();
    gone.spec.secret.creation_policy = crate::crd::CreationPolicy::Merge;
    gone.limits = allowing(false, true);
    gone.secret = SecretObservation::Missing;
    assert_eq!(gone.plan(), Step::Blocked(Blocked::SecretNotFound));
}

#[test]
fn adopt_plans_an_available_secret_like_a_missing_one_where_adoption_is_allowed() {
    let mut w = World::new(vec![], Some(BTreeMap::new()));
    w.spec.secret.creation_policy = crate::crd::CreationPolicy::Adopt;
    w.spec.secret.name = Some("theirs".into());
    w.secret = SecretObservation::Available;
    w.limits = allowing(false, false);
    assert_eq!(
        w.plan(),
        Step::Blocked(Blocked::AdoptionRefused(AdoptionRefusal::SecretNotAllowed {
            secret: "theirs".into(),
            policies: vec!["p".into()]
        }))
    );
    // A missing Secret is created as under Owner: nothing to take over.
    w.secret = SecretObservation::Missing;
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec![] });
    w.secret = SecretObservation::Available;
    w.limits = allowing(true, false);
    assert_eq!(w.plan(), Step::StartCreate { existing_key_ids: vec![] });
}
