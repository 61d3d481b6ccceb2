//! Test helpers that use the real infrastructure, never mocks of it.
//!
//! - [`TestDb`]: a fresh PostgreSQL database per test, cloned from a migrated
//!   template (one per migration fingerprint), dropped afterwards, so tests run
//!   in parallel without seeing each other.
//! - [`TestNats`]: a JetStream stream and subject prefix per test on the
//!   shared NATS; [`NatsServer`]: a private nats-server to kill and restart.
//! - [`eventually`]: waits on a condition with a deadline instead of sleeping.
mod db;
mod nats;

pub use db::{TestDb, admin_config};
pub use nats::{NatsServer, TestNats, shared_url};

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
