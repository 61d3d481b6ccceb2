//! Shared pieces of the release benchmarks: timing, percentiles, and the one
//! output format every benchmark prints, next to the raw ceiling measured in
//! the same run:
//!
//! `BENCH name=<name> value=<n> unit=<unit> ceiling=<n> ratio=<n>`
use std::time::{Duration, Instant};

/// How long each measured phase runs: `BENCH_SECS`, default 5.
pub fn phase_duration() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

/// Prints one figure with its ceiling and their ratio.
pub fn report(name: &str, value: f64, unit: &str, ceiling: f64) {
    let ratio = if ceiling > 0.0 { value / ceiling } else { 0.0 };
    println!(
        "BENCH name={name} value={value:.3} unit={unit} ceiling={ceiling:.3} ratio={ratio:.2}"
    );
}

/// Progress for a human watching, on stderr so the BENCH block stays clean.
pub fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

/// Latencies collected by one phase.
#[derive(Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn record(&mut self, took: Duration) {
        self.0.push(took);
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `p`-th percentile (0..=100) in milliseconds.
    pub fn percentile_ms(&mut self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let rank = ((p / 100.0) * (self.0.len() - 1) as f64).round() as usize;
        self.0[rank.min(self.0.len() - 1)].as_secs_f64() * 1000.0
    }
}

/// Counts units done by concurrent workers over a phase.
pub struct Rate {
    started: Instant,
}

impl Rate {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn per_second(&self, units: u64) -> f64 {
        units as f64 / self.started.elapsed().as_secs_f64()
    }
}

/// A realistic event payload (a created contact), about 300 bytes.
pub fn contact_payload(n: u64) -> serde_json::Value {
    serde_json::json!({
        "name": { "given": "Ada", "family": format!("Lovelace-{n}") },
        "emails": [{ "address": format!("ada.{n}@example.com"), "primary": true }],
        "phones": [{ "number": "+8613800138000", "kind": "mobile" }],
        "preferences": { "channel": "email", "language": "en-GB", "time_zone": "Europe/London" },
        "occurred_at": "2026-11-28T10:00:00Z"
    })
}
