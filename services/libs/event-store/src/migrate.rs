//! Schema migrations: numbered SQL files applied once, in order, under an
//! advisory lock (so concurrent starters do not race), each checksummed so an
//! edited migration stops startup instead of silently diverging.
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::StoreError;

/// One migration file, embedded at build time.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The event store's migrations, oldest first. Add files; never edit one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_events",
        sql: include_str!("../migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "0002_reservations",
        sql: include_str!("../migrations/0002_reservations.sql"),
    },
    Migration {
        version: 3,
        name: "0003_checkpoints",
        sql: include_str!("../migrations/0003_checkpoints.sql"),
    },
    Migration {
        version: 4,
        name: "0004_subject_keys",
        sql: include_str!("../migrations/0004_subject_keys.sql"),
    },
];

const LOCK_KEY: i64 = 0x0063_726d_5f6d_6967; // "crm_mig"

fn checksum(sql: &str) -> String {
    Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A short fingerprint of every migration, used to name test templates.
pub fn migrations_fingerprint() -> String {
    let all: String = MIGRATIONS.iter().map(|m| checksum(m.sql)).collect();
    checksum(&all)[..12].to_owned()
}

/// Applies every pending migration. Safe to call from many processes at once.
#[tracing::instrument(skip_all)]
pub async fn migrate(client: &mut Client) -> Result<usize, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_pending(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

async fn apply_pending(client: &mut Client) -> Result<usize, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ( \
               version    integer PRIMARY KEY, \
               name       text NOT NULL, \
               checksum   text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let mut applied = 0;
    for migration in MIGRATIONS {
        let current = checksum(migration.sql);
        let row = client
            .query_opt(
                "SELECT checksum FROM schema_migrations WHERE version = $1",
                &[&migration.version],
            )
            .await?;
        if let Some(row) = row {
            let stored: String = row.get(0);
            if stored != current {
                return Err(StoreError::MigrationEdited {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    applied: stored,
                    current,
                });
            }
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &current],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied += 1;
    }
    Ok(applied)
}
