//! Rate limits the vault enforces itself: per caller and record token buckets.
//!
//! Owns: [`Bucket`] (also used by the adapters' per-caller limits) and the bounded table of
//! per-record buckets. Must never: hold a lock across I/O.

use std::time::Instant;

use super::{Vault, VaultError};
use crate::config::CallerPolicy;
use crate::record::RecordId;

/// A token bucket refilled continuously.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            at: Instant::now(),
        }
    }

    /// Refills at `rate` per second up to `burst`; the tokens now in the bucket.
    pub fn peek(&mut self, rate: u32, burst: u32) -> f64 {
        let now = Instant::now();
        let burst = f64::from(burst.max(1));
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * f64::from(rate)).min(burst);
        self.at = now;
        self.tokens
    }

    /// Refills at `rate` per second up to `burst`, then takes one token if there is one.
    pub fn take(&mut self, rate: u32, burst: u32) -> bool {
        if self.peek(rate, burst) >= 1.0 {
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
        let bucket =
            buckets.get_or_insert_mut((caller.to_string(), id.clone()), || Bucket::full(rate));
        if bucket.take(rate, rate) {
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
