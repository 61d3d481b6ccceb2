//! Typed configuration: compiled-in defaults that work with `just up`, then
//! `CRM__SECTION__KEY` environment variables, then command-line flags.
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default on a terminal).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Settings shared by every role.
#[derive(Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL URL of the event store and read models.
    #[arg(
        long = "pg-url",
        env = "CRM__PG__URL",
        default_value = "postgres://crm@127.0.0.1:55432/crm"
    )]
    pub pg_url: String,
    /// Connections per process in the PostgreSQL pool.
    #[arg(
        long = "pg-pool-size",
        env = "CRM__PG__POOL_SIZE",
        default_value_t = 16
    )]
    pub pg_pool_size: usize,
    /// Statement timeout for every PostgreSQL statement, in seconds.
    #[arg(
        long = "pg-statement-timeout-secs",
        env = "CRM__PG__STATEMENT_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub pg_statement_timeout_secs: u64,
    /// NATS URL (JetStream must be enabled).
    #[arg(
        long = "nats-url",
        env = "CRM__NATS__URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// Address the gRPC server listens on.
    #[arg(
        long = "grpc-addr",
        env = "CRM__GRPC__ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,
    /// How long a graceful shutdown may take per phase, in seconds.
    #[arg(
        long = "shutdown-grace-secs",
        env = "CRM__SHUTDOWN__GRACE_SECS",
        default_value_t = 20
    )]
    pub shutdown_grace_secs: u64,
    /// Secret key for the HMACs of unique values (emails, tax ids), at least
    /// 32 characters. Unset: a fixed development key, with a warning. Changing
    /// it later needs a re-keying of stored reservations.
    #[arg(
        long = "reservation-key",
        env = "CRM__SECURITY__RESERVATION_KEY",
        hide_env_values = true
    )]
    pub reservation_key: Option<String>,
    /// JetStream stream the relay publishes to (created or updated at start).
    #[arg(
        long = "relay-stream",
        env = "CRM__RELAY__STREAM",
        default_value = "CRM_EVENTS"
    )]
    pub relay_stream: String,
    /// First tokens of every published subject:
    /// `<prefix>.<tenant>.<stream_type>.<stream_id>.<event_type>`.
    #[arg(
        long = "relay-subject-prefix",
        env = "CRM__RELAY__SUBJECT_PREFIX",
        default_value = "crm.v1"
    )]
    pub relay_subject_prefix: String,
    /// Publishes awaiting their JetStream ack at once.
    #[arg(
        long = "relay-window",
        env = "CRM__RELAY__WINDOW",
        default_value_t = 1024
    )]
    pub relay_window: usize,
    /// How long the stream keeps events, in days; 0 keeps them forever.
    #[arg(
        long = "relay-max-age-days",
        env = "CRM__RELAY__MAX_AGE_DAYS",
        default_value_t = 0
    )]
    pub relay_max_age_days: u64,
    /// Most `Subscribe`/`ReadAll` streams open at once in one process; more
    /// are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long = "query-max-subscriptions",
        env = "CRM__QUERY__MAX_SUBSCRIPTIONS",
        default_value_t = 256
    )]
    pub query_max_subscriptions: usize,
    /// How long a query waits for its `min_position` before answering
    /// UNAVAILABLE, in milliseconds.
    #[arg(
        long = "query-min-position-wait-ms",
        env = "CRM__QUERY__MIN_POSITION_WAIT_MS",
        default_value_t = 2000
    )]
    pub query_min_position_wait_ms: u64,
    /// How often the scheduler looks for what has fallen due, in
    /// milliseconds; 0 leaves the scheduler out of `crm all` (tests drive
    /// their own, with a clock they control).
    #[arg(
        long = "scheduler-interval-ms",
        env = "CRM__SCHEDULER__INTERVAL_MS",
        default_value_t = 1000
    )]
    pub scheduler_interval_ms: u64,
    /// Log line format.
    #[arg(
        long = "log-format",
        env = "CRM__LOG__FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// A setting that cannot be used, naming its key.
#[derive(Debug, thiserror::Error)]
#[error("configuration {key}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl Config {
    /// Defaults with the environment applied, as the binary would see them.
    pub fn from_env() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        <Only as clap::Parser>::parse_from(["crm"]).config
    }

    /// The PostgreSQL connection settings, validated.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut config =
            tokio_postgres::Config::from_str(&self.pg_url).map_err(|e| ConfigError {
                key: "CRM__PG__URL",
                reason: e.to_string(),
            })?;
        if self.pg_pool_size == 0 {
            return Err(ConfigError {
                key: "CRM__PG__POOL_SIZE",
                reason: "must be at least 1".into(),
            });
        }
        // Notices ("already exists, skipping") are not worth a log line.
        config.options(format!(
            "-c statement_timeout={}s -c client_min_messages=warning",
            self.pg_statement_timeout_secs
        ));
        Ok(config)
    }

    /// The reservation HMAC key, or the development key with a warning.
    pub fn reservation_key(&self) -> Result<Vec<u8>, ConfigError> {
        match &self.reservation_key {
            Some(key) if key.len() >= 32 => Ok(key.as_bytes().to_vec()),
            Some(_) => Err(ConfigError {
                key: "CRM__SECURITY__RESERVATION_KEY",
                reason: "must be at least 32 characters".into(),
            }),
            None => {
                tracing::warn!(
                    "CRM__SECURITY__RESERVATION_KEY is not set: using the development key; set it in production"
                );
                Ok(b"crm-development-reservation-key-not-for-production".to_vec())
            }
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Checks every setting; call once at startup.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.pg_config()?;
        if !self.nats_url.starts_with("nats://") && !self.nats_url.starts_with("tls://") {
            return Err(ConfigError {
                key: "CRM__NATS__URL",
                reason: "must start with nats:// or tls://".into(),
            });
        }
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !token(&self.relay_stream) {
            return Err(ConfigError {
                key: "CRM__RELAY__STREAM",
                reason: "must be 1 or more of [A-Za-z0-9_-]".into(),
            });
        }
        if !self.relay_subject_prefix.split('.').all(token) {
            return Err(ConfigError {
                key: "CRM__RELAY__SUBJECT_PREFIX",
                reason: "must be dot-separated tokens of [A-Za-z0-9_-] (no wildcards)".into(),
            });
        }
        if !(1..=65_536).contains(&self.relay_window) {
            return Err(ConfigError {
                key: "CRM__RELAY__WINDOW",
                reason: "must be 1 to 65536".into(),
            });
        }
        Ok(())
    }
}

/// Hides a URL's password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Logged once at startup, so secrets are redacted.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("pg_url", &redact(&self.pg_url))
            .field("pg_pool_size", &self.pg_pool_size)
            .field("pg_statement_timeout_secs", &self.pg_statement_timeout_secs)
            .field("nats_url", &redact(&self.nats_url))
            .field("grpc_addr", &self.grpc_addr)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field(
                "reservation_key",
                &self.reservation_key.as_ref().map(|_| "***"),
            )
            .field("relay_stream", &self.relay_stream)
            .field("relay_subject_prefix", &self.relay_subject_prefix)
            .field("relay_window", &self.relay_window)
            .field("relay_max_age_days", &self.relay_max_age_days)
            .field("query_max_subscriptions", &self.query_max_subscriptions)
            .field(
                "query_min_position_wait_ms",
                &self.query_min_position_wait_ms,
            )
            .field("scheduler_interval_ms", &self.scheduler_interval_ms)
            .field("log_format", &self.log_format)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_passwords() {
        let mut config = Config::from_env();
        config.pg_url = "postgres://crm:s3cret@db:5432/crm".into();
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://crm:***@db:5432/crm"), "{shown}");
    }

    #[test]
    fn bad_settings_name_their_key() {
        let mut config = Config::from_env();
        config.pg_url = "not a url at all".into();
        assert_eq!(config.validate().unwrap_err().key, "CRM__PG__URL");
        let mut config = Config::from_env();
        config.nats_url = "http://x".into();
        assert_eq!(config.validate().unwrap_err().key, "CRM__NATS__URL");
        let mut config = Config::from_env();
        config.pg_pool_size = 0;
        assert_eq!(config.validate().unwrap_err().key, "CRM__PG__POOL_SIZE");
        let mut config = Config::from_env();
        config.relay_subject_prefix = "crm.*".into();
        assert_eq!(
            config.validate().unwrap_err().key,
            "CRM__RELAY__SUBJECT_PREFIX"
        );
        let mut config = Config::from_env();
        config.relay_stream = "a.b".into();
        assert_eq!(config.validate().unwrap_err().key, "CRM__RELAY__STREAM");
        let mut config = Config::from_env();
        config.relay_window = 0;
        assert_eq!(config.validate().unwrap_err().key, "CRM__RELAY__WINDOW");
    }
}
