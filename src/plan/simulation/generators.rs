//! Random histories for proptest. Small tables keep shrinking effective: proptest shrinks an
//! index towards 0.

use proptest::prelude::*;

use super::{
    GRACES, INTERVALS, MAX_KEY_AGES, RETAINS, UNUSED_AFTERS, WAITS,
    world::{Event, Failpoint, Forgery, History, PersonTag, RotationChoice},
};
use crate::crd::{KeyPhase, KeyStatus};

pub fn key_status() -> impl Strategy<Value = KeyStatus> {
    prop_oneof![3 => Just(KeyStatus::Active), 1 => Just(KeyStatus::Inactive)]
}

pub fn rotation_choice() -> impl Strategy<Value = Option<RotationChoice>> {
    proptest::option::of((0..INTERVALS.len(), 0..GRACES.len(), 0..RETAINS.len(), any::<bool>()).prop_map(
        |(interval, grace, retain, wait_for_unused)| RotationChoice { interval, grace, retain, wait_for_unused },
    ))
}

pub fn failpoint() -> impl Strategy<Value = Failpoint> {
    prop_oneof![
        Just(Failpoint::AfterCreateKey),
        Just(Failpoint::AfterTag),
        Just(Failpoint::AfterSecret),
        Just(Failpoint::BeforeStatus),
        Just(Failpoint::MidStep),
    ]
}

pub fn forgery() -> impl Strategy<Value = Forgery> {
    prop_oneof![
        Just(Forgery::PendingLongAgo),
        Just(Forgery::PendingAhead),
        Just(Forgery::ListsForeignKey(KeyPhase::Inactive)),
        Just(Forgery::ListsForeignKey(KeyPhase::Draining)),
        Just(Forgery::ListsForeignKey(KeyPhase::Current)),
        Just(Forgery::KeysWiped),
        Just(Forgery::PendingListsKeys),
    ]
}

pub fn person_tag() -> impl Strategy<Value = PersonTag> {
    prop_oneof![Just(PersonTag::Unrelated), Just(PersonTag::GoneKey), Just(PersonTag::OtherResource)]
}

pub fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        10 => Just(Event::Step),
        5 => Just(Event::Reconcile),
        5 => (0..WAITS.len()).prop_map(Event::Wait),
        1 => Just(Event::Crash),
        3 => failpoint().prop_map(Event::ArmFailpoint),
        2 => Just(Event::BumpSerial),
        2 => Just(Event::RequestRotation),
        1 => Just(Event::RequestAnnotationRemoved),
        2 => Just(Event::DeleteSecret),
        1 => (0..2usize).prop_map(Event::PersonDeactivates),
        1 => (0..2usize).prop_map(Event::PersonReactivates),
        1 => (0..2usize).prop_map(Event::PersonDeletes),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(tagged, active)| Event::PersonAddsKey { tagged, active }),
        1 => key_status().prop_map(Event::SpecKeyStatus),
        1 => rotation_choice().prop_map(Event::SpecRotation),
        1 => any::<bool>().prop_map(Event::SpecRestartTargets),
        2 => Just(Event::ClientUsesItsKey),
        1 => Just(Event::ClientReloadsSecret),
        1 => Just(Event::VerifyFailsOnce),
        2 => forgery().prop_map(Event::TenantForgesStatus),
        1 => person_tag().prop_map(Event::PersonTagsUser),
    ]
}

pub fn history() -> impl Strategy<Value = History> {
    let policy = (0..MAX_KEY_AGES.len(), 0..UNUSED_AFTERS.len(), any::<bool>());
    let events = proptest::collection::vec(event(), 0..48);
    (key_status(), rotation_choice(), any::<bool>(), policy, any::<u64>(), events).prop_map(
        |(key_status, rotation, restart_targets, policy, seed, events)| History {
            key_status,
            rotation,
            restart_targets,
            policy,
            seed,
            events,
        },
    )
}
