//! When to check that a new key authenticates, learned from the keys before it.
//!
//! IAM is eventually consistent: STS refuses a new key for a while (seconds on AWS, not at all
//! on moto). Checking at once and then often spends STS calls, and the account's quota, on
//! refusals; checking late makes every key wait. So a new key is first checked after about as
//! long as the slowest recent key needed: a refusal raises the wait to the refused key's age, its
//! acceptance to the time it was accepted, and each key accepted at once lowers it a little. Where IAM accepts new keys at once,
//! the wait shrinks to nothing; where it does not, about one first check in ten is refused.
//!
//! Before any key has authenticated, the wait is unknown. The first key checked then finds it
//! out alone: the keys after it hold their checks until it is accepted (at most `HOLD` after
//! their creation), so a burst of new keys does not probe STS a hundred times over. Where IAM
//! accepts keys at once, that hold lasts one STS call, once.

use std::time::Duration;

/// What a key accepted at its first check takes off the wait.
const SHORTER: f64 = 0.975;
/// The longest first wait.
const LONGEST: Duration = Duration::from_secs(30);
/// Between checks of a key already refused: from this, doubling, up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The longest a new key holds its first check while another finds out the wait: past it, the
/// key checks for itself (the one finding out may have failed for reasons of its own).
pub const HOLD: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, Default)]
pub struct Propagation {
    first_check: Duration,
    /// A key has authenticated since the operator started: `first_check` is learned.
    learned: bool,
    /// A key was checked before any authenticated: it is finding out the wait.
    probing: bool,
}

impl Propagation {
    /// How long after its creation a new key is first checked.
    pub fn first_check(&self) -> Duration {
        self.first_check
    }

    /// A new key's first check waits until another key has found out how long keys take.
    pub fn hold(&self) -> bool {
        self.probing && !self.learned
    }

    /// A new key is about to be checked for the first time: `false` when it should hold instead.
    pub fn start_first_check(&mut self) -> bool {
        let go = !self.hold();
        self.probing |= !self.learned;
        go
    }

    /// A key is settled once one key has been accepted: nothing to hold for.
    pub fn learned(&self) -> bool {
        self.learned
    }

    /// How long from now a key `age` old, checked `checks` times so far, is checked next: never
    /// before the learned wait since its creation (another key may have learned it while this
    /// one waited), and after a check that failed, doubling from 250 ms but not sooner than a
    /// quarter of the learned wait (a key refused then is most likely slower than the others,
    /// not about to authenticate), at most 5 s.
    pub fn next_check(&self, age: Duration, checks: u32) -> Duration {
        let learned = self.first_check.saturating_sub(age);
        if checks == 0 {
            return learned;
        }
        let doubling = RETRY_MIN.saturating_mul(1 << (checks - 1).min(8));
        doubling.max(self.first_check / 4).min(RETRY_MAX).max(learned)
    }

    /// STS refused a new key `age` old: keys can take longer than that.
    pub fn refused(&mut self, age: Duration) {
        if self.learned {
            self.first_check = self.first_check.max(age).min(LONGEST);
        }
    }

    /// A key was accepted `accepted_at` after its creation; `refused_at`: when it was last
    /// refused, if it ever was. Throttling and outages say nothing about propagation and are
    /// not refusals.
    pub fn accepted(&mut self, refused_at: Option<Duration>, accepted_at: Duration) {
        self.learned = true;
        self.first_check = match refused_at {
            None => self.first_check.mul_f64(SHORTER),
            // It took at most that long (the middle of the two checks is a bolder guess, and
            // costs a burst of new keys a third more checks while it is learned).
            Some(_) => self.first_check.max(accepted_at).min(LONGEST),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::{cmp::Reverse, collections::BinaryHeap};

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// A new key created every `interval`, each authenticating after a delay drawn from `delay`,
    /// all waiting at once and checked the way the controller checks them: (STS calls per key,
    /// share of first checks refused, final wait).
    fn burst(keys: usize, interval: Duration, delay: impl Fn(&mut StdRng) -> Duration) -> (f64, f64, Duration) {
        const CREATED: u8 = 0;
        const HOLD_OVER: u8 = 1;
        const CHECK: u8 = 2;
        struct Key {
            created: Duration,
            needs: Duration,
            refusals: u32,
            refused_at: Option<Duration>,
            held: bool,
        }
        let mut rng = StdRng::seed_from_u64(7);
        let mut all: Vec<Key> = (0..keys)
            .map(|i| Key {
                created: interval * i as u32,
                needs: delay(&mut rng),
                refusals: 0,
                refused_at: None,
                held: false,
            })
            .collect();
        let mut learned = Propagation::default();
        let mut events: BinaryHeap<_> = all.iter().enumerate().map(|(i, k)| Reverse((k.created, CREATED, i))).collect();
        let (mut calls, mut refused_first) = (0, 0);
        while let Some(Reverse((now, event, i))) = events.pop() {
            let key = &mut all[i];
            let age = now - key.created;
            match event {
                CREATED if !learned.start_first_check() => {
                    key.held = true;
                    events.push(Reverse((key.created + HOLD, HOLD_OVER, i)));
                }
                CREATED | HOLD_OVER if event == CREATED || key.held => {
                    key.held = false;
                    events.push(Reverse((now + learned.next_check(age, 0), CHECK, i)));
                }
                CHECK if age >= key.needs => {
                    calls += 1;
                    refused_first += usize::from(key.refused_at.is_some());
                    learned.accepted(key.refused_at, age);
                    // The keys holding their first check go on.
                    for (j, held) in all.iter_mut().enumerate().filter(|(_, k)| k.held) {
                        held.held = false;
                        events.push(Reverse((now + learned.next_check(now - held.created, 0), CHECK, j)));
                    }
                }
                CHECK => {
                    calls += 1;
                    key.refusals += 1;
                    key.refused_at = Some(age);
                    learned.refused(age);
                    events.push(Reverse((now + learned.next_check(age, key.refusals), CHECK, i)));
                }
                _ => {}
            }
        }
        (calls as f64 / keys as f64, refused_first as f64 / keys as f64, learned.first_check())
    }

    /// What the fault proxy's AWS-like profile does: STS refuses a new key for 4 to 12 s.
    fn aws_like(rng: &mut StdRng) -> Duration {
        Duration::from_millis(rng.random_range(4_000..12_000))
    }

    #[test]
    fn where_keys_authenticate_at_once_nothing_waits() {
        let (calls, refused, wait) = burst(1_000, Duration::from_millis(10), |_| Duration::ZERO);
        assert_eq!((calls, refused, wait), (1.0, 0.0, Duration::ZERO));
    }

    #[test]
    fn with_aws_like_propagation_few_checks_are_refused() {
        // One key after the other.
        let (calls, refused, wait) = burst(1_000, Duration::from_secs(20), aws_like);
        assert!(calls <= 1.3, "{calls} STS calls per key");
        assert!((0.02..0.25).contains(&refused), "{refused} of first checks refused");
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(15), "first wait {wait:?}");
    }

    #[test]
    fn a_burst_of_new_keys_learns_the_wait_from_one() {
        // Four new keys a second (20 IAM calls a second, five per key), from a cold start.
        for keys in [100, 1_000] {
            let (calls, refused, _) = burst(keys, Duration::from_millis(250), aws_like);
            assert!(calls <= 1.5, "{keys} keys: {calls} STS calls per key");
            assert!(refused < 0.5, "{keys} keys: {refused} of first checks refused");
        }
    }

    #[test]
    fn one_slow_key_teaches_the_wait_and_fast_ones_shorten_it() {
        let mut learned = Propagation::default();
        // Refused at 2 s, accepted at 4 s: it took at most 4 s.
        learned.accepted(Some(Duration::from_secs(2)), Duration::from_secs(4));
        assert_eq!(learned.first_check(), Duration::from_secs(4));
        // Refused at 5 s: keys may take longer than that.
        learned.refused(Duration::from_secs(5));
        assert_eq!(learned.first_check(), Duration::from_secs(5));
        // A slower one raises it, never above the cap; a faster one does not lower it.
        learned.accepted(Some(Duration::from_secs(100)), Duration::from_secs(102));
        assert_eq!(learned.first_check(), LONGEST);
        learned.accepted(Some(Duration::from_secs(1)), Duration::from_secs(2));
        assert_eq!(learned.first_check(), LONGEST);
        // IAM now accepts keys at once: the wait melts away.
        for _ in 0..200 {
            learned.accepted(None, learned.first_check());
        }
        assert!(learned.first_check() < Duration::from_secs(1), "{:?}", learned.first_check());
    }

    #[test]
    fn only_the_first_key_probes_until_one_is_accepted() {
        let mut learned = Propagation::default();
        assert!(learned.start_first_check(), "the first key checks at once");
        assert!(!learned.start_first_check(), "the next ones wait for it");
        assert!(learned.hold());
        learned.accepted(Some(Duration::from_secs(4)), Duration::from_secs(8));
        assert!(!learned.hold());
        assert!(learned.start_first_check(), "once the wait is known, every key checks");
        assert!(learned.start_first_check());
    }

    #[test]
    fn retries_back_off_from_a_quarter_second_to_five_and_never_before_the_learned_wait() {
        let learned = Propagation::default();
        let schedule: Vec<_> = (1..=7).map(|n| learned.next_check(Duration::from_secs(60), n).as_millis()).collect();
        assert_eq!(schedule, [250, 500, 1_000, 2_000, 4_000, 5_000, 5_000]);
        let mut slow = Propagation::default();
        slow.accepted(Some(Duration::from_secs(10)), Duration::from_secs(10));
        let at = |age, refusals| slow.next_check(Duration::from_secs(age), refusals);
        assert_eq!(at(60, 1), Duration::from_millis(2_500), "a quarter of the first wait");
        assert_eq!(at(0, 0), Duration::from_secs(10), "a new key waits the learned wait");
        assert_eq!(at(4, 1), Duration::from_secs(6), "a key refused early waits for the learned wait");
    }
}
