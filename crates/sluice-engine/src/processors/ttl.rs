//! Time to live of stored entries (cached results, idempotency keys, checked-in bodies): the
//! one rule for a configured `ttl` and the one way an in-memory store turns it into an expiry,
//! so every store treats the same `ttl` the same way.

use std::time::Duration;

use sluice_core::BuildError;
use tokio::time::Instant;

/// A TTL that outlasts the clock's range stands for "until the process stops".
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The configured `ttl`, refused when zero: an entry that expires as it is stored is never found.
pub(crate) fn checked(ttl: Duration) -> Result<Duration, BuildError> {
    if ttl.is_zero() {
        return Err(BuildError::field("ttl", "give a duration longer than zero"));
    }
    Ok(ttl)
}

/// When an entry stored at `now` for `ttl` expires; a TTL too large for the clock means "until
/// the process stops".
pub(crate) fn expires_at(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or_else(|| now + FOREVER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_refused_at_the_ttl_field() {
        let e = checked(Duration::ZERO).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ttl"));
        assert_eq!(
            checked(Duration::from_secs(1)).unwrap(),
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_ttl_does_not_overflow() {
        let now = Instant::now();
        assert_eq!(
            expires_at(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(expires_at(now, Duration::MAX), now + FOREVER);
    }
}
