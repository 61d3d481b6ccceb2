//! `TestDb`: one throwaway database per test.
use std::str::FromStr;

use tokio_postgres::{Config, NoTls};

/// The server the tests use: `CRM__PG__URL` (the same variable the binary
/// reads), else the project-local server that `just up` / `just test` start.
pub fn admin_config() -> Config {
    let url = std::env::var("CRM__PG__URL")
        .unwrap_or_else(|_| "postgres://crm@127.0.0.1:55432/crm".to_owned());
    Config::from_str(&url)
        .unwrap_or_else(|e| panic!("CRM__PG__URL {url:?} is not a valid URL: {e}"))
}

/// A database of its own for one test, migrated, dropped when the value is.
pub struct TestDb {
    pub name: String,
    config: Config,
}

const TEMPLATE_LOCK: i64 = 0x0063_726d_5f74_706c; // "crm_tpl"

async fn connect(config: &Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|e| {
        panic!("cannot reach PostgreSQL for tests ({e}); run `just up` or set CRM__PG__URL")
    });
    tokio::spawn(connection);
    client
}

impl TestDb {
    /// Creates `t_<uuid>` from the template, building the template first if
    /// this set of migrations has none yet.
    pub async fn create() -> Self {
        let admin = admin_config();
        let client = connect(&admin).await;
        let template = format!("crm_tpl_{}", crm_event_store::migrations_fingerprint());
        ensure_template(&admin, &client, &template).await;
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let mut config = admin.clone();
        config.dbname(&name);
        Self { name, config }
    }

    /// Connection settings for this database.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// This database as a URL, for code configured by `CRM__PG__URL`.
    pub fn url(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("crm");
        let password = self
            .config
            .get_password()
            .map(|p| format!(":{}", String::from_utf8_lossy(p)))
            .unwrap_or_default();
        format!("postgres://{user}{password}@{host}:{port}/{}", self.name)
    }

    /// A plain client on this database, for assertions in raw SQL.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await
    }

    /// Returns once some backend on this database matches `condition`, a
    /// SQL condition on `pg_stat_activity` (e.g. `wait_event_type = 'Lock'`):
    /// for tests that must act while a transaction holds or waits.
    pub async fn until_a_backend(&self, condition: &str) {
        let client = self.client().await;
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND ({condition})"
        );
        crate::eventually(std::time::Duration::from_secs(10), condition, || async {
            let n: i64 = client.query_one(&sql, &[]).await.ok()?.get(0);
            (n > 0).then_some(())
        })
        .await;
    }
}

async fn ensure_template(admin: &Config, client: &tokio_postgres::Client, template: &str) {
    if template_exists(client, template).await {
        return;
    }
    // Many test processes start at once: one builds, the others wait.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("take template lock");
    if !template_exists(client, template).await {
        let building = format!("{template}_building");
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .expect("drop stale template database");
        client
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await
            .expect("create template database");
        let mut config = admin.clone();
        config.dbname(&building);
        {
            let (mut migrating, connection) =
                config.connect(NoTls).await.expect("connect to template");
            let driver = tokio::spawn(connection);
            crm_event_store::migrate(&mut migrating)
                .await
                .expect("migrate template");
            drop(migrating);
            let _ = driver.await;
        }
        client
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
            .expect("publish template database");
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("release template lock");
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::env::var_os("CRM_TEST_KEEP_DB").is_some() {
            eprintln!("keeping test database {}", self.name);
            return;
        }
        let name = self.name.clone();
        // Drop runs outside async context rules: use a runtime of our own on a
        // plain thread, which works whether or not a runtime is running here.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            runtime.block_on(async move {
                let client = connect(&admin_config()).await;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("could not drop test database {}: {error}", self.name);
        }
    }
}

async fn template_exists(client: &tokio_postgres::Client, name: &str) -> bool {
    client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("query pg_database")
        .is_some()
}
