//! What every role shares: configuration, telemetry, and shutdown.
//!
//! Roles are library functions `run(config, listener, shutdown)`; this crate
//! gives them their typed [`Config`], sets up tracing and OpenTelemetry once
//! per process, and turns SIGINT/SIGTERM into a cancellation.
pub mod config;
pub mod shutdown;
pub mod telemetry;

pub use config::{Config, ConfigError, LogFormat};
