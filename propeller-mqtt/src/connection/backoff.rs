//! When to try again after a failed connection.
//!
//! For the first [`FAST_PHASE`] of an outage we retry every 1 to 2 seconds, so a
//! broker back from a restart is found within 2 s of its return. After that
//! the delay doubles up to the cap, so a long outage costs little. Every delay
//! is jittered so that a fleet of proplets does not reconnect in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How long an outage is treated as a blip.
pub(crate) const FAST_PHASE: Duration = Duration::from_secs(10);
const FAST_MAX: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        // RandomState is seeded per process from the OS: enough for jitter,
        // without a rand dependency.
        let seed = RandomState::new().build_hasher().finish() | 1;
        Self {
            min,
            max,
            next: min,
            rng: seed,
        }
    }

    /// The delay before the next attempt, `outage` into an outage.
    pub fn next_delay(&mut self, outage: Duration) -> Duration {
        let base = self.next;
        self.next = match outage < FAST_PHASE {
            true => (base * 2).min(FAST_MAX.max(self.min)),
            false => (base * 2).min(self.max),
        };
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        // Jitter only downwards, so the bounds above hold.
        let delay = base.mul_f64(0.75 + 0.25 * unit).min(self.max);
        // Whole milliseconds: logs read `retry_in=1.636s`, not nanoseconds.
        Duration::from_millis(delay.as_millis() as u64)
    }

    /// Back to the shortest delay, after a successful connection.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[test]
    fn short_outages_retry_within_two_seconds() {
        let mut backoff = backoff();
        let mut outage = Duration::ZERO;
        while outage < FAST_PHASE {
            let delay = backoff.next_delay(outage);
            assert!(
                delay <= FAST_MAX && delay >= Duration::from_millis(750),
                "{delay:?}"
            );
            outage += delay;
        }
    }

    #[test]
    fn long_outages_back_off_to_the_cap_and_reset() {
        let mut backoff = backoff();
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay(FAST_PHASE)).collect();
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(60)),
            "{delays:?}"
        );
        assert!(delays[5] >= Duration::from_secs(24), "{delays:?}");
        assert!(delays[11] >= Duration::from_secs(45), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay(Duration::ZERO) <= Duration::from_secs(1));
    }

    /// `P_MQTT_RECONNECT_MIN` above the quick retries' 2 s is respected.
    #[test]
    fn a_minimum_above_two_seconds_holds_in_the_first_seconds_too() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(60));
        for _ in 0..3 {
            let delay = backoff.next_delay(Duration::ZERO);
            assert!(delay >= Duration::from_millis(3750), "{delay:?}");
        }
    }

    #[test]
    fn two_clients_do_not_retry_in_lockstep() {
        let (mut a, mut b) = (backoff(), backoff());
        let same = (0..8)
            .filter(|_| a.next_delay(FAST_PHASE) == b.next_delay(FAST_PHASE))
            .count();
        assert!(same < 8);
    }
}
