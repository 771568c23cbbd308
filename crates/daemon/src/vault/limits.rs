//! Rate limits the vault enforces itself: per caller and record token buckets.
//!
//! Owns: [`Bucket`] (also used by the adapters' per-caller limits) and the bounded table of
//! per-record buckets. Must never: hold a lock across I/O.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Vault, VaultError};
use crate::config::CallerPolicy;
use crate::record::RecordId;

/// The source of monotonic time for every rate limit and refusal window: the time since a fixed
/// origin, never going back. Tests inject their own ([`Vault::with_monotonic`]) to move time
/// instead of sleeping.
pub type Monotonic = Arc<dyn Fn() -> Duration + Send + Sync>;

/// The system's monotonic clock, from the first time it is read in this process.
pub fn system_monotonic() -> Monotonic {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    Arc::new(|| ORIGIN.get_or_init(Instant::now).elapsed())
}

/// A token bucket refilled continuously. Time is passed in (a [`Monotonic`] reading), so the
/// bucket never reads a clock itself.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    at: Duration,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(burst: u32, now: Duration) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Refills at `rate` per second up to `burst` until `now`; the tokens then in the bucket.
    pub fn peek(&mut self, rate: u32, burst: u32, now: Duration) -> f64 {
        let burst = f64::from(burst.max(1));
        let elapsed = now.saturating_sub(self.at);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(rate)).min(burst);
        self.at = self.at.max(now);
        self.tokens
    }

    /// Refills at `rate` per second up to `burst` until `now`, then takes one token if there
    /// is one.
    pub fn take(&mut self, rate: u32, burst: u32, now: Duration) -> bool {
        if self.peek(rate, burst, now) >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per caller and record token buckets (bounded: least recently used pairs are dropped).
#[derive(Debug)]
pub(super) struct RecordLimits(std::sync::Mutex<lru::LruCache<(String, RecordId), Bucket>>);

impl Default for RecordLimits {
    fn default() -> Self {
        Self(std::sync::Mutex::new(lru::LruCache::new(
            std::num::NonZeroUsize::new(100_000).unwrap_or(std::num::NonZeroUsize::MIN),
        )))
    }
}

impl Vault {
    /// Takes a token from the caller's bucket for this record, if it has a per-record limit.
    pub(super) fn record_token(
        &self,
        caller: &str,
        policy: &CallerPolicy,
        id: &RecordId,
    ) -> Result<(), VaultError> {
        let Some(rate) = policy.record_rate_per_second else {
            return Ok(());
        };
        let mut buckets = self
            .record_limits
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = self.monotonic_now();
        let bucket =
            buckets.get_or_insert_mut((caller.to_string(), id.clone()), || Bucket::full(rate, now));
        if bucket.take(rate, rate, now) {
            Ok(())
        } else {
            drop(buckets);
            super::metrics::Metrics::count(&self.metrics.rate_limited, "record");
            Err(VaultError::RecordRateLimited {
                caller: caller.to_string(),
                rate,
                id: id.to_string(),
            })
        }
    }
}
