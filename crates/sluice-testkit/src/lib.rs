//! Test helpers shared by Sluice's crates; only ever a dev-dependency.
//!
//! * [`service`]: the gate of every test that needs a real broker or database on loopback. With
//!   `SLUICE_IT=1` (as `.ci/run` sets after `scripts/services.sh`) an unreachable service fails
//!   the test; without it the test is skipped with one line naming the service.
//! * [`proxy::TcpProxy`]: a loopback TCP proxy a test can take down and bring back, to check that
//!   connectors reconnect when their service restarts, without restarting the shared service.
//! * [`disk::SmallDisk`]: a small tmpfs to fill up, for disk-full tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod disk;
pub mod proxy;

use std::time::Duration;

/// Whether tests must fail when a service they need is unreachable (`SLUICE_IT=1`).
pub fn integration_required() -> bool {
    std::env::var("SLUICE_IT").is_ok_and(|v| v == "1")
}

/// Whether `name` (e.g. `"RabbitMQ"`) answers on `addr` (e.g. `"127.0.0.1:5672"`).
///
/// Returns `true` when a TCP connection opens within two seconds. Otherwise, with `SLUICE_IT=1`
/// it panics, failing the test with what to do; without it, it prints one line saying the test is
/// skipped and returns `false`. Use it as `if !service("RabbitMQ", ADDR).await { return; }`.
pub async fn service(name: &str, addr: &str) -> bool {
    let reachable = matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    );
    if reachable {
        return true;
    }
    if integration_required() {
        panic!(
            "{name} is not reachable at {addr} and SLUICE_IT=1 requires it: \
             start it with scripts/services.sh"
        );
    }
    eprintln!(
        "SKIPPED: {name} is not reachable at {addr}; run scripts/services.sh, \
         and set SLUICE_IT=1 to make this a failure"
    );
    false
}

/// A unique name for a test's queue, topic, table or key: `prefix` plus the process id and a
/// counter, so tests running side by side (and reruns against a long-lived service) never share.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{}_{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_skipped_or_fails_under_sluice_it() {
        // Port 1 on loopback is closed on any machine that runs these tests.
        let outcome = tokio::spawn(async { service("Nothing", "127.0.0.1:1").await }).await;
        if integration_required() {
            assert!(
                outcome.is_err(),
                "SLUICE_IT=1 must turn a missing service into a failure"
            );
        } else {
            assert!(!outcome.unwrap());
        }
    }

    #[tokio::test]
    async fn an_open_port_passes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        assert!(service("Listener", &addr).await);
    }

    #[test]
    fn unique_names_differ() {
        assert_ne!(unique("q"), unique("q"));
        assert!(unique("orders").starts_with("orders_"));
    }
}
