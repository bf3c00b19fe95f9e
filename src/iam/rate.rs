//! A client-side token bucket for IAM calls: whatever the number of resources, the operator
//! stays under the rate it is given (IAM throttles an account's control-plane calls).
//!
//! The rate is fixed (`--iam-rate`) or adaptive (the default): the way the AWS SDKs' adaptive
//! retry mode paces requests, it is raised along a cubic curve (CUBIC, as in TCP) while IAM
//! answers, and cut multiplicatively when IAM answers `Throttling`, between a floor and a
//! ceiling (`--iam-rate-min`, `--iam-rate-max`). IAM's quota is per account and shared with
//! every other client of the account, so no fixed number is right for long: the limiter learns
//! what the account has to spare right now.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use tokio::time::Instant;

/// After a throttle, the rate is cut to this fraction of what IAM was accepting (CUBIC's β; the
/// AWS SDKs use 0.7).
const BETA: f64 = 0.7;
/// CUBIC's C: how fast the rate grows back. The AWS SDKs use 0.4; a quarter of that climbs
/// back to the rate of the last throttle in ~4 s (at 20/s) instead of ~2.5 s and creeps past it
/// more slowly, so IAM's account-wide quota, which stays where it is for minutes, is probed
/// more gently: fewer throttled calls for a small loss of speed.
const SCALE: f64 = 0.1;
/// Past the rate of the last throttle, the rate grows by at most this fraction of it per second
/// (CUBIC's own curve would triple its lead every few seconds): IAM's quota is a token bucket
/// that hides an overshoot until it is empty, so the lead must be small by then.
const PROBE: f64 = 0.03;
/// An adaptive bucket holds at most this much of the current rate: calls saved up in a lull
/// leave in a burst, and IAM's quota, itself a bucket, is often near empty when the rate is
/// near the quota.
const BUCKET: Duration = Duration::from_millis(500);
/// The rates IAM accepted and the operator used are measured over the last two seconds: one
/// second is too short to average out IAM's own bucket and the bunching of answers on a busy
/// node.
const MEASURE_WINDOW: Duration = Duration::from_secs(2);

/// Which rate a call was let through under: a throttle answer to a call that took its token
/// before the last cut (sent since, or still waiting for its turn) says nothing new (the cut
/// already happened) and does not cut again.
#[derive(Clone, Copy, Debug)]
pub struct Permit {
    epoch: u64,
}

pub struct RateLimiter {
    mode: Mode,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Unlimited,
    Fixed { rate: f64, burst: f64 },
    Adaptive { min: f64, max: f64, burst: f64 },
}

struct State {
    /// Tokens in the bucket (negative: callers waiting for their turn).
    tokens: f64,
    refilled: Instant,
    /// The rate granted now (calls per second).
    rate: f64,
    /// CUBIC: the rate IAM accepted when it last throttled, the time of the cut, and K (when the
    /// curve gets back to that rate).
    last_max: f64,
    last_cut: Instant,
    k: f64,
    /// Cuts so far.
    epoch: u64,
    /// When IAM accepted the calls of the last `MEASURE_WINDOW`.
    accepted: VecDeque<Instant>,
    /// When the calls of the last `MEASURE_WINDOW` were let through.
    sent: VecDeque<Instant>,
    /// Up to when the curve's clock has run.
    advanced: Instant,
}

impl RateLimiter {
    /// `rate` calls per second on average, at most `burst` at once. A rate of 0 means unlimited.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let mode = if rate > 0.0 { Mode::Fixed { rate, burst } } else { Mode::Unlimited };
        Self::with_mode(mode, rate.max(0.0), burst)
    }

    /// A rate that adapts to IAM's answers, between `min` and `max` calls per second (`min` at
    /// least 0.1, `max` at least `min`). It starts at half the ceiling. The bucket holds at most
    /// half a second of the current rate (and never more than `burst`), and one token right
    /// after a cut.
    pub fn adaptive(min: f64, max: f64, burst: u32) -> Self {
        let min = min.max(0.1);
        let max = max.max(min);
        let burst = f64::from(burst.max(1));
        let start = (max / 2.0).max(min);
        let tokens = burst.min(start * BUCKET.as_secs_f64()).max(1.0);
        Self::with_mode(Mode::Adaptive { min, max, burst }, start, tokens)
    }

    fn with_mode(mode: Mode, rate: f64, tokens: f64) -> Self {
        let now = Instant::now();
        let state = State {
            tokens,
            refilled: now,
            rate,
            last_max: rate,
            last_cut: now,
            k: 0.0,
            epoch: 0,
            accepted: VecDeque::new(),
            sent: VecDeque::new(),
            advanced: now,
        };
        RateLimiter { mode, state: Mutex::new(state) }
    }

    /// The rate granted now, in calls per second (0: unlimited).
    pub fn rate(&self) -> f64 {
        match self.mode {
            Mode::Unlimited => 0.0,
            Mode::Fixed { rate, .. } => rate,
            Mode::Adaptive { .. } => {
                let mut state = self.lock();
                self.grow(&mut state, Instant::now());
                state.rate
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bucket's capacity at `rate`.
    fn capacity(&self, rate: f64) -> f64 {
        match self.mode {
            Mode::Unlimited => f64::INFINITY,
            Mode::Fixed { burst, .. } => burst,
            Mode::Adaptive { burst, .. } => burst.min(rate * BUCKET.as_secs_f64()).max(1.0),
        }
    }

    /// Wait for a token.
    pub async fn acquire(&self) -> Permit {
        if self.mode == Mode::Unlimited {
            return Permit { epoch: 0 };
        }
        // Take the token now (the balance may go negative) and sleep off the debt: callers
        // are served in arrival order without a lock held across the wait.
        let (wait, epoch) = {
            let mut state = self.lock();
            let now = Instant::now();
            self.grow(&mut state, now);
            let rate = state.rate;
            let elapsed = now.duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * rate).min(self.capacity(rate));
            state.refilled = now;
            state.tokens -= 1.0;
            if matches!(self.mode, Mode::Adaptive { .. }) {
                state.sent.push_back(now);
            }
            let wait = if state.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-state.tokens / rate) };
            (wait, state.epoch)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Permit { epoch }
    }

    /// What IAM answered to the call `permit` let through: `throttled` if it asked to slow down.
    /// Any other answer (an error too) counts as accepted: only throttling says the rate is
    /// too high.
    pub fn observe(&self, permit: Permit, throttled: bool) {
        let Mode::Adaptive { min, max, .. } = self.mode else { return };
        let mut state = self.lock();
        let now = Instant::now();
        self.grow(&mut state, now);
        while state.accepted.front().is_some_and(|t| now.duration_since(*t) > MEASURE_WINDOW) {
            state.accepted.pop_front();
        }
        if !throttled {
            state.accepted.push_back(now);
            return;
        }
        if permit.epoch < state.epoch {
            // Let through before the last cut: that cut was the answer to it already.
            return;
        }
        // The curve comes back to what IAM was accepting lately when that is less
        // than the rate granted (others share the account's quota), but one cut takes away at
        // most half: after a quiet spell the latest count says little.
        let accepted = state.accepted.len() as f64 / MEASURE_WINDOW.as_secs_f64();
        let reference = accepted.max(state.rate * BETA).min(state.rate).clamp(min, max);
        // CUBIC's fast convergence: throttled below the rate of the last throttle, the quota
        // left to us shrank (or was overestimated): aim the curve's plateau lower still.
        state.last_max = if reference < state.last_max { reference * (1.0 + BETA) / 2.0 } else { reference };
        state.last_cut = now;
        state.epoch += 1;
        state.k = ((state.last_max - reference * BETA).max(0.0) / SCALE).cbrt();
        state.rate = (reference * BETA).clamp(min, max);
        // No burst right after a cut: the bucket holds no more than one token.
        let capacity = self.capacity(state.rate).min(1.0);
        state.tokens = state.tokens.min(capacity);
    }

    /// Move the rate along the cubic curve to `now`. The curve's clock runs only while the
    /// operator uses at least half the rate: a quiet operator learns nothing about IAM's quota,
    /// and must not come back from a quiet spell with a rate it never tried.
    fn grow(&self, state: &mut State, now: Instant) {
        let Mode::Adaptive { min, max, .. } = self.mode else { return };
        while state.sent.front().is_some_and(|t| now.duration_since(*t) > MEASURE_WINDOW) {
            state.sent.pop_front();
        }
        let used = state.sent.len() as f64 / MEASURE_WINDOW.as_secs_f64();
        if used < state.rate / 2.0 {
            state.last_cut += now.duration_since(state.advanced);
        }
        state.advanced = now;
        let t = now.duration_since(state.last_cut).as_secs_f64();
        let cubic = SCALE * (t - state.k).powi(3) + state.last_max;
        let cubic = cubic.min(state.last_max * (1.0 + PROBE * (t - state.k).max(0.0)));
        // Only ever raised between cuts: the curve starts below the current rate after a cut.
        let next = cubic.clamp(min, max);
        if next > state.rate {
            // Tokens earned so far were earned at the old rate.
            let elapsed = now.duration_since(state.refilled).as_secs_f64();
            state.tokens = (state.tokens + elapsed * state.rate).min(self.capacity(state.rate));
            state.refilled = now;
            state.rate = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_holds_the_rate() {
        let limiter = RateLimiter::new(10.0, 5);
        let start = tokio::time::Instant::now();
        for _ in 0..25 {
            limiter.acquire().await;
        }
        // 5 at once, then 20 more at 10/s.
        let elapsed = start.elapsed().as_secs_f64();
        assert!((1.9..2.2).contains(&elapsed), "{elapsed}");
        assert_eq!(limiter.rate(), 10.0);
    }

    #[tokio::test]
    async fn zero_rate_is_unlimited() {
        let limiter = RateLimiter::new(0.0, 1);
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            limiter.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(limiter.rate(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_rate_ignores_throttling() {
        let limiter = RateLimiter::new(10.0, 5);
        let permit = limiter.acquire().await;
        limiter.observe(permit, true);
        assert_eq!(limiter.rate(), 10.0);
    }

    /// Calls one after the other for `secs` seconds, each answered as `throttled` says.
    async fn run(limiter: &RateLimiter, secs: f64, throttled: impl Fn(f64) -> bool) -> usize {
        let start = Instant::now();
        let mut calls = 0;
        while start.elapsed().as_secs_f64() < secs {
            let permit = limiter.acquire().await;
            limiter.observe(permit, throttled(limiter.rate()));
            calls += 1;
        }
        calls
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_rate_rises_while_iam_answers_up_to_the_ceiling() {
        let limiter = RateLimiter::adaptive(1.0, 40.0, 40);
        assert_eq!(limiter.rate(), 20.0, "starts at half the ceiling");
        let mut last = limiter.rate();
        for _ in 0..40 {
            run(&limiter, 1.0, |_| false).await;
            let now = limiter.rate();
            assert!(now >= last, "never lowered without a throttle: {last} -> {now}");
            last = now;
        }
        assert_eq!(last, 40.0, "reaches the ceiling and stays there");
        run(&limiter, 30.0, |_| false).await;
        assert_eq!(limiter.rate(), 40.0);
        // Idle time raises it no further.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(limiter.rate(), 40.0);
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_rate_is_cut_on_throttling_and_learns_the_quota() {
        // IAM accepts 10 calls per second and throttles above (by the rate the limiter grants).
        let limiter = RateLimiter::adaptive(1.0, 50.0, 50);
        let start_rate = limiter.rate();
        let permit = limiter.acquire().await;
        limiter.observe(permit, true);
        // Nothing accepted yet: the reference is 70% of the rate granted (at most
        // half goes in one cut), and the new rate 70% of that.
        let cut = start_rate * BETA * BETA;
        assert_eq!(limiter.rate(), cut, "cut at once");
        // Answers to calls sent before that cut do not cut again.
        limiter.observe(permit, true);
        assert_eq!(limiter.rate(), cut, "one cut per throttling episode");
        // Nor do answers to calls let through after it that had taken their token before.
        let (early, late) = (limiter.acquire().await, limiter.acquire().await);
        limiter.observe(early, true);
        let second = limiter.rate();
        assert!(second < cut);
        limiter.observe(late, true);
        assert_eq!(limiter.rate(), second, "a call queued before the cut does not cut again");

        let quota = 10.0;
        let mut throttled = 0usize;
        let mut calls = 0usize;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let permit = limiter.acquire().await;
            let over = limiter.rate() > quota;
            throttled += usize::from(over);
            calls += 1;
            limiter.observe(permit, over);
        }
        let rate = limiter.rate();
        println!("quota {quota}/s: {calls} calls in 120 s, {throttled} throttled, rate now {rate:.2}");
        assert!((quota * BETA * 0.9..=quota * 1.5).contains(&rate), "settles around the quota: {rate}");
        let mean = calls as f64 / 120.0;
        assert!((quota * 0.7..=quota * 1.2).contains(&mean), "uses most of the quota: {mean}/s");
        assert!((throttled as f64) < calls as f64 * 0.05, "{throttled} of {calls} calls throttled");
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_rate_never_leaves_floor_and_ceiling() {
        let limiter = RateLimiter::adaptive(2.0, 8.0, 20);
        // Throttled at every call for a minute: down to the floor, never below.
        run(&limiter, 60.0, |_| true).await;
        assert_eq!(limiter.rate(), 2.0);
        // Even when the measured accepted rate is tiny.
        for _ in 0..50 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let permit = limiter.acquire().await;
            limiter.observe(permit, true);
            assert!(limiter.rate() >= 2.0);
        }
        // Then never throttled: up to the ceiling, never above.
        let mut max_seen: f64 = 0.0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            let permit = limiter.acquire().await;
            limiter.observe(permit, false);
            max_seen = max_seen.max(limiter.rate());
        }
        assert_eq!(max_seen, 8.0);
        // The bucket never holds more than half a second of the rate: no burst above it.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t = Instant::now();
        for _ in 0..16 {
            limiter.acquire().await;
        }
        let took = t.elapsed().as_secs_f64();
        assert!(took >= 1.49, "16 calls at 8/s with a half-second bucket take 1.5 s: {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_operator_keeps_its_rate() {
        // Two calls a second at a rate of 25: nothing learnt about IAM's quota, no rise.
        let limiter = RateLimiter::adaptive(1.0, 50.0, 50);
        for _ in 0..120 {
            let permit = limiter.acquire().await;
            limiter.observe(permit, false);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(limiter.rate(), 25.0);
        // Busy again: the curve resumes where it stopped.
        run(&limiter, 10.0, |_| false).await;
        assert!(limiter.rate() > 25.0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_burst_right_after_a_cut() {
        let limiter = RateLimiter::adaptive(1.0, 20.0, 20);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let permit = limiter.acquire().await;
        limiter.observe(permit, true);
        let rate = limiter.rate();
        let t = Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        let took = t.elapsed().as_secs_f64();
        assert!(took >= 3.5 / rate, "5 calls right after a cut to {rate}/s took {took} s");
    }
}
