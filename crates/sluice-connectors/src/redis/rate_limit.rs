//! Redis as the `throttle` step's shared state (`backend: {redis: {url, prefix}}`): one key per
//! throttled key holding its GCRA theoretical arrival time, reserved by a Lua script so a
//! reservation is atomic however many instances share the key.
//!
//! The script reads Redis's own clock (`TIME`), so instances with skewed clocks still share one
//! schedule, and gives each key an expiry at its arrival time: a key whose schedule has passed
//! is in the same state as one never seen, so Redis forgets it. It runs with `EVALSHA`; the
//! script is loaded on first use and again after Redis lost it (a restart, `SCRIPT FLUSH`).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{RedisError, ServerErrorKind};
use sluice_core::ProcessError;
use sluice_core::state::{RateLimit, RateLimitStore, Reservation};

use super::LazyConnection;

/// GCRA in microseconds of Redis's clock; the same arithmetic as the in-memory throttle.
/// KEYS[1]: the key. ARGV: interval, tolerance, max_wait. Returns {granted (1/0), wait}.
/// `%d` keeps every digit of the arrival time (Lua's default number format would round it).
const SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local go_at = tat - tolerance
if go_at < now then go_at = now end
local wait = go_at - now
if wait > max_wait then return {0, wait} end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return {1, wait}
";

/// A throttle's shared schedules in one Redis database, keys `prefix` + the throttled key.
pub struct RedisRateLimit {
    prefix: String,
    conn: LazyConnection,
    /// The script's SHA1 as Redis reported it when loading it.
    sha: Mutex<Option<String>>,
}

impl RedisRateLimit {
    /// A store under `prefix` on `conn`.
    pub(crate) fn new(prefix: String, conn: LazyConnection) -> Self {
        RedisRateLimit {
            prefix,
            conn,
            sha: Mutex::new(None),
        }
    }

    fn sha(&self) -> Option<String> {
        match self.sha.lock() {
            Ok(sha) => sha.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn remember(&self, sha: String) {
        match self.sha.lock() {
            Ok(mut slot) => *slot = Some(sha),
            Err(poisoned) => *poisoned.into_inner() = Some(sha),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

async fn evalsha(
    conn: &mut MultiplexedConnection,
    sha: &str,
    key: &str,
    args: [u64; 3],
) -> Result<(u8, u64), RedisError> {
    redis::cmd("EVALSHA")
        .arg(sha)
        .arg(1)
        .arg(key)
        .arg(&args[..])
        .query_async(conn)
        .await
}

#[async_trait]
impl RateLimitStore for RedisRateLimit {
    async fn reserve(
        &self,
        key: &str,
        limit: RateLimit,
        max_wait: Duration,
    ) -> Result<Reservation, ProcessError> {
        let key = format!("{}{key}", self.prefix);
        let args = [
            micros(limit.interval),
            micros(limit.tolerance),
            micros(max_wait),
        ];
        let known = self.sha();
        let ((granted, wait), loaded) = self
            .conn
            .run("reserving a rate limit slot", |mut conn| {
                let (key, known) = (key.clone(), known.clone());
                async move {
                    if let Some(sha) = &known {
                        match evalsha(&mut conn, sha, &key, args).await {
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    redis::ErrorKind::Server(ServerErrorKind::NoScript)
                                ) => {}
                            answer => return answer.map(|a| (a, None)),
                        }
                    }
                    let sha: String = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(SCRIPT)
                        .query_async(&mut conn)
                        .await?;
                    let answer = evalsha(&mut conn, &sha, &key, args).await?;
                    Ok((answer, Some(sha)))
                }
            })
            .await?;
        if let Some(sha) = loaded {
            self.remember(sha);
        }
        let wait = Duration::from_micros(wait);
        Ok(if granted == 1 {
            Reservation::Granted { wait }
        } else {
            Reservation::OverRate { retry_after: wait }
        })
    }
}
