//! Exponential backoff with jitter, so that a fleet of proplets does not
//! reconnect in lockstep after a broker restart.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delays from `min` doubling up to `max`, each scaled by a random 0.8..1.2.
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

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        let delay = base.mul_f64(0.8 + 0.4 * unit).clamp(self.min, self.max);
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

    #[test]
    fn grows_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let mut backoff = Backoff::new(min, max);
        let delays: Vec<_> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| (min..=max).contains(d)), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(1200));
        assert!(delays[5] >= Duration::from_millis(25_600), "{delays:?}");
        assert!(delays[11] >= Duration::from_secs(48), "{delays:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(1200));
    }

    #[test]
    fn two_clients_do_not_retry_in_lockstep() {
        let mut a = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let same = (0..8).filter(|_| a.next_delay() == b.next_delay()).count();
        assert!(same < 8);
    }
}
