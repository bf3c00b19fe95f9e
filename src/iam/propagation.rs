//! When to check that a new key authenticates, learned from the keys before it.
//!
//! IAM is eventually consistent: STS refuses a new key for a while (seconds on AWS, not at all
//! on moto). Checking at once and then often spends STS calls, and the account's quota, on
//! refusals; checking late makes every key wait. So a new key is first checked after about as
//! long as the slowest recent key needed: a key that was refused raises the wait to the time it
//! took, and each key accepted at once lowers it a little. Where IAM accepts new keys at once,
//! the wait shrinks to nothing; where it does not, about one first check in ten is refused.

use std::time::Duration;

/// What a key accepted at its first check takes off the wait.
const SHORTER: f64 = 0.975;
/// The longest first wait.
const LONGEST: Duration = Duration::from_secs(30);
/// Between checks of a key already refused: from this, doubling, up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default)]
pub struct Propagation {
    first_check: Duration,
}

impl Propagation {
    /// How long after its creation a new key is first checked.
    pub fn first_check(&self) -> Duration {
        self.first_check
    }

    /// How long after its `refusals`-th refusal a key is checked again: doubling from 250 ms,
    /// and not sooner than a quarter of the first wait (a key refused then is most likely
    /// slower than the others, not about to authenticate), at most 5 s.
    pub fn retry_after(&self, refusals: u32) -> Duration {
        let doubling = RETRY_MIN.saturating_mul(1 << refusals.saturating_sub(1).min(8));
        doubling.max(self.first_check / 4).min(RETRY_MAX)
    }

    /// A key was accepted `accepted_at` after its creation; `refused_at`: when it was last
    /// refused, if it ever was. Throttling and outages say nothing about propagation and are
    /// not refusals.
    pub fn accepted(&mut self, refused_at: Option<Duration>, accepted_at: Duration) {
        self.first_check = match refused_at {
            None => self.first_check.mul_f64(SHORTER),
            // It took somewhere between the two checks: take the middle.
            Some(refused_at) => self.first_check.max((refused_at + accepted_at) / 2).min(LONGEST),
        };
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    /// Keys that authenticate after a delay drawn from `delay`, one after the other, checked the
    /// way the controller does: (STS calls per key, share of first checks refused, final wait).
    fn run(keys: usize, delay: impl Fn(&mut StdRng) -> Duration) -> (f64, f64, Duration) {
        let mut rng = StdRng::seed_from_u64(7);
        let mut learned = Propagation::default();
        let (mut calls, mut refused_first) = (0, 0);
        for _ in 0..keys {
            let needs = delay(&mut rng);
            let (mut at, mut refused_at, mut refusals) = (learned.first_check(), None, 0);
            calls += 1;
            while at < needs {
                refusals += 1;
                refused_at = Some(at);
                at += learned.retry_after(refusals);
                calls += 1;
            }
            refused_first += usize::from(refused_at.is_some());
            learned.accepted(refused_at, at);
        }
        (calls as f64 / keys as f64, refused_first as f64 / keys as f64, learned.first_check())
    }

    #[test]
    fn where_keys_authenticate_at_once_nothing_waits() {
        let (calls, refused, wait) = run(1_000, |_| Duration::ZERO);
        assert_eq!((calls, refused, wait), (1.0, 0.0, Duration::ZERO));
    }

    #[test]
    fn with_aws_like_propagation_few_checks_are_refused() {
        // A new key refused for 4 to 12 s (the fault proxy's AWS-like profile).
        let (calls, refused, wait) = run(1_000, |rng| Duration::from_millis(rng.random_range(4_000..12_000)));
        assert!(calls <= 1.3, "{calls} STS calls per key");
        assert!((0.02..0.25).contains(&refused), "{refused} of first checks refused");
        assert!(wait > Duration::from_secs(9) && wait <= Duration::from_secs(15), "first wait {wait:?}");
    }

    #[test]
    fn one_slow_key_teaches_the_wait_and_fast_ones_shorten_it() {
        let mut learned = Propagation::default();
        // Refused at 2 s, accepted at 4 s: it took about 3 s.
        learned.accepted(Some(Duration::from_secs(2)), Duration::from_secs(4));
        assert_eq!(learned.first_check(), Duration::from_secs(3));
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
    fn retries_back_off_from_a_quarter_second_to_five() {
        let learned = Propagation::default();
        let schedule: Vec<_> = (1..=7).map(|n| learned.retry_after(n).as_millis()).collect();
        assert_eq!(schedule, [250, 500, 1_000, 2_000, 4_000, 5_000, 5_000]);
        let mut slow = Propagation::default();
        slow.accepted(Some(Duration::from_secs(10)), Duration::from_secs(10));
        assert_eq!(slow.retry_after(1), Duration::from_millis(2_500), "a quarter of the first wait");
    }
}
