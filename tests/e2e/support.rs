//! `TestApp`: `crm all` on port 0 against a database of its own, with gRPC
//! clients and a tenant of its own.
use std::time::Duration;

use crm_platform::Config;
use crm_proto::v1::accounts_client::AccountsClient;
use crm_proto::v1::activities_client::ActivitiesClient;
use crm_proto::v1::campaigns_client::CampaignsClient;
use crm_proto::v1::commerce_client::CommerceClient;
use crm_proto::v1::configuration_client::ConfigurationClient;
use crm_proto::v1::contacts_client::ContactsClient;
use crm_proto::v1::leads_client::LeadsClient;
use crm_proto::v1::opportunities_client::OpportunitiesClient;
use crm_proto::v1::pipelines_client::PipelinesClient;
use crm_proto::v1::records_client::RecordsClient;
use crm_proto::v1::tickets_client::TicketsClient;
use crm_test_support::{TestDb, TestNats, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

pub struct TestApp {
    pub db: TestDb,
    pub nats: TestNats,
    pub address: std::net::SocketAddr,
    pub channel: Channel,
    pub tenant: String,
    shutdown: CancellationToken,
    running: Option<JoinHandle<Result<(), crm::RunError>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Like [`Self::spawn`], with settings changed by `configure`.
    pub async fn spawn_with(configure: impl FnOnce(&mut Config)) -> Self {
        let db = TestDb::create().await;
        let mut config = Config::from_env();
        config.pg_url = db.url();
        config.pg_pool_size = 4;
        // The relay in `crm all` publishes to a stream of this test's own.
        let nats = TestNats::shared();
        config.nats_url = nats.url.clone();
        config.relay_stream = nats.stream.clone();
        config.relay_subject_prefix = nats.subject_prefix.clone();
        configure(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { crm::run_all(&config, listener, shutdown).await }
        });
        eventually(Duration::from_secs(20), "crm all to serve", || async {
            crm::health_check(address)
                .await
                .ok()
                .filter(|serving| *serving)
        })
        .await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self {
            db,
            nats,
            address,
            channel,
            tenant: format!("t-{}", uuid::Uuid::now_v7().simple()),
            shutdown,
            running: Some(running),
        }
    }

    pub fn contacts(&self) -> ContactsClient<Channel> {
        ContactsClient::new(self.channel.clone())
    }

    pub fn pipelines(&self) -> PipelinesClient<Channel> {
        PipelinesClient::new(self.channel.clone())
    }

    pub fn opportunities(&self) -> OpportunitiesClient<Channel> {
        OpportunitiesClient::new(self.channel.clone())
    }

    pub fn activities(&self) -> ActivitiesClient<Channel> {
        ActivitiesClient::new(self.channel.clone())
    }

    pub fn records(&self) -> RecordsClient<Channel> {
        RecordsClient::new(self.channel.clone())
    }

    pub fn configuration(&self) -> ConfigurationClient<Channel> {
        ConfigurationClient::new(self.channel.clone())
    }

    pub fn commerce(&self) -> CommerceClient<Channel> {
        CommerceClient::new(self.channel.clone())
    }

    pub fn campaigns(&self) -> CampaignsClient<Channel> {
        CampaignsClient::new(self.channel.clone())
    }

    pub fn tickets(&self) -> TicketsClient<Channel> {
        TicketsClient::new(self.channel.clone())
    }

    pub fn leads(&self) -> LeadsClient<Channel> {
        LeadsClient::new(self.channel.clone())
    }

    pub fn accounts(&self) -> AccountsClient<Channel> {
        AccountsClient::new(self.channel.clone())
    }

    /// A request from this app's tenant, as user `ada`.
    pub fn request<T>(&self, message: T) -> Request<T> {
        as_caller(message, Some(&self.tenant), Some("user:ada"))
    }

    /// A request from this app's tenant as a sales manager (who may merge
    /// duplicates).
    pub fn manager<T>(&self, message: T) -> Request<T> {
        let mut request = self.request(message);
        request
            .metadata_mut()
            .insert("x-roles", "sales_manager".parse().unwrap());
        request
    }

    /// A request from this app's tenant as its ERP's service account (role
    /// `erp_sync`, which `crm.v1.Commerce` requires).
    pub fn erp<T>(&self, message: T) -> Request<T> {
        let mut request = as_caller(message, Some(&self.tenant), Some("service:erp"));
        request
            .metadata_mut()
            .insert("x-roles", "erp_sync".parse().unwrap());
        request
    }

    /// Every event row of this test's database, as (type, payload, metadata),
    /// but the data-quality process manager's `duplicate_pair` events: it
    /// appends them on its own, whenever two fixtures look alike.
    ///
    /// Each row's event type and version must have a checked-in JSON Schema
    /// (`schemas/`): personal fields are found, and encrypted, by it.
    pub async fn stored(&self) -> Vec<(String, serde_json::Value, serde_json::Value)> {
        let rows = self
            .db
            .client()
            .await
            .query(
                "SELECT event_type, payload, metadata, stream_type, schema_version FROM events \
                 WHERE stream_type <> 'duplicate_pair' ORDER BY global_position",
                &[],
            )
            .await
            .unwrap();
        let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        for row in &rows {
            let (event_type, stream_type, version): (String, String, i32) =
                (row.get(0), row.get(3), row.get(4));
            let path = schemas.join(format!("{stream_type}/{event_type}.v{version}.json"));
            assert!(
                path.exists(),
                "no schema for a stored event: {}",
                path.display()
            );
        }
        rows.iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    /// The first `count` messages the relay published on subjects matching
    /// `filter`: (subject, headers). Waits for them.
    pub async fn published(
        &self,
        filter: &str,
        count: usize,
    ) -> Vec<(String, async_nats::HeaderMap)> {
        use futures_util::StreamExt;
        let js = self.nats.jetstream().await;
        eventually(Duration::from_secs(20), "the relay's stream", || {
            let js = js.clone();
            async move { js.get_stream(&self.nats.stream).await.ok() }
        })
        .await;
        let mut messages = self.nats.ordered_messages(filter).await;
        let mut out = Vec::new();
        while out.len() < count {
            let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
                .await
                .expect("the relay to publish in time")
                .unwrap()
                .unwrap();
            out.push((
                message.subject.to_string(),
                message.headers.clone().unwrap_or_default(),
            ));
        }
        out
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            let result = tokio::time::timeout(Duration::from_secs(30), running).await;
            assert!(
                matches!(result, Ok(Ok(Ok(())))),
                "crm all did not stop cleanly"
            );
        }
    }
}

pub fn as_caller<T>(message: T, tenant: Option<&str>, actor: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(tenant) = tenant {
        request
            .metadata_mut()
            .insert("x-tenant-id", tenant.parse().unwrap());
    }
    if let Some(actor) = actor {
        request
            .metadata_mut()
            .insert("x-actor-id", actor.parse().unwrap());
    }
    request
}

/// The fields a status's `BadRequest` names, in order.
#[track_caller]
pub fn bad_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// The `ErrorInfo` reason and metadata of a status.
pub fn error_info(status: &Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status.get_details_error_info().expect("ErrorInfo details");
    (info.reason, info.metadata)
}

/// A clock a test sets by hand, for the scheduler.
pub struct TestClock(pub std::sync::Mutex<jiff::Timestamp>);

impl crm::scheduler::Clock for TestClock {
    fn now(&self) -> jiff::Timestamp {
        *self.0.lock().unwrap()
    }
}

impl TestClock {
    pub fn set(&self, text: &str) {
        *self.0.lock().unwrap() = text.parse().unwrap();
    }
}

/// A scheduler on `app`'s database driven by `clock` (its commands too),
/// and the event store it appends through (shut it down at the end).
pub async fn test_scheduler(
    app: &TestApp,
    clock: std::sync::Arc<TestClock>,
) -> (crm::scheduler::Scheduler, crm_event_store::EventStore) {
    use crm::scheduler::Clock;
    let store = crm_event_store::EventStore::connect(
        app.db.config(),
        crm_event_store::StoreOptions::default(),
    )
    .await
    .unwrap();
    let pool = deadpool_postgres::Pool::builder(deadpool_postgres::Manager::new(
        app.db.config().clone(),
        tokio_postgres::NoTls,
    ))
    .max_size(2)
    .build()
    .unwrap();
    let handler_clock = clock.clone();
    let scheduler = crm::scheduler::Scheduler::new(
        crm::command::CommandHandler::new(store.clone(), b"test-reservation-key-of-32-bytes!")
            .with_clock(std::sync::Arc::new(move || handler_clock.now())),
        pool,
        clock,
        Duration::from_secs(3600),
    );
    (scheduler, store)
}

/// Waits until every projection and process manager has applied the whole
/// log (and the log stopped growing: process managers append too); returns
/// the head.
pub async fn settled(app: &TestApp) -> u64 {
    let db = app.db.client().await;
    eventually(
        Duration::from_secs(30),
        "every projection at the head",
        || async {
            let head: i64 = db
                .query_one("SELECT COALESCE(max(global_position), 0) FROM events", &[])
                .await
                .ok()?
                .get(0);
            let behind: i64 = db
                .query_one(
                    "SELECT count(*) FROM projections WHERE position < $1",
                    &[&head],
                )
                .await
                .ok()?
                .get(0);
            if behind > 0 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let again: i64 = db
                .query_one("SELECT COALESCE(max(global_position), 0) FROM events", &[])
                .await
                .ok()?
                .get(0);
            (again == head).then_some(head as u64)
        },
    )
    .await
}

/// Command options placing the command at `text` (RFC 3339) in business time.
pub fn at(text: &str) -> Option<crm_proto::v1::CommandOptions> {
    Some(crm_proto::v1::CommandOptions {
        occurred_at: text.into(),
        ..Default::default()
    })
}

/// An amount in CNY minor units.
pub fn cny(amount_minor: i64) -> Option<crm_proto::v1::Money> {
    Some(crm_proto::v1::Money {
        amount_minor,
        currency: "CNY".into(),
    })
}

/// Every item of a paged query, in order: `page(token)` answers one page's
/// items and the next page's token (empty after the last page).
pub async fn all_pages<T, F, Fut>(mut page: F) -> Vec<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = (Vec<T>, String)>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (mut got, next) = page(token).await;
        items.append(&mut got);
        if next.is_empty() {
            return items;
        }
        token = next;
    }
}

/// Tenant settings in `time_zone` reporting in `currency`, with the
/// defaults a test does not care about (fiscal year from January, duplicate
/// threshold 80, stale after 30/14/90 days); override fields as needed.
pub fn tenant_settings(
    time_zone: &str,
    currency: &str,
) -> crm_proto::v1::PublishTenantSettingsRequest {
    crm_proto::v1::PublishTenantSettingsRequest {
        time_zone: time_zone.into(),
        fiscal_year_start_month: 1,
        reporting_currency: currency.into(),
        duplicate_threshold: 80,
        stale_days_lead: 30,
        stale_days_deal: 14,
        stale_days_customer: 90,
        ..Default::default()
    }
}

/// An amount in EUR minor units.
pub fn eur(amount_minor: i64) -> Option<crm_proto::v1::Money> {
    Some(crm_proto::v1::Money {
        amount_minor,
        currency: "EUR".into(),
    })
}

/// Moves `projection`'s status row back to position 0, as after losing its
/// checkpoint: it applies the whole log again on its next batch.
pub async fn reset_position(app: &TestApp, projection: &str) {
    app.db
        .client()
        .await
        .execute(
            "UPDATE projections SET position = 0 WHERE name = $1",
            &[&projection],
        )
        .await
        .unwrap();
}

/// Waits until `projection` has applied `position`.
pub async fn reached(app: &TestApp, projection: &str, position: u64) {
    let db = app.db.client().await;
    eventually(Duration::from_secs(20), projection, || async {
        db.query_opt(
            "SELECT 1 FROM projections WHERE name = $1 AND position >= $2",
            &[&projection, &(position as i64)],
        )
        .await
        .ok()
        .flatten()
    })
    .await;
}

/// A question ticket nobody cares about, to make projectors take a batch;
/// its position. It appends two events: its requester's contact and the
/// ticket.
pub async fn nudge(app: &TestApp) -> u64 {
    app.tickets()
        .open_ticket(app.request(crm_proto::v1::OpenTicketRequest {
            requester_id: person(app, "Ticket", "Requester").await,
            channel: "chat".into(),
            r#type: "question".into(),
            subject: "Unrelated".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .global_position
}

/// The first column of every row `sql` (no parameters) returns, in order.
pub async fn first_column<T>(client: &tokio_postgres::Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A company account named `name` of this app's tenant; its id.
pub async fn company(app: &TestApp, name: &str) -> String {
    let request = crm_proto::v1::CreateAccountRequest {
        kind: crm_proto::v1::AccountKind::Company.into(),
        name: name.into(),
        ..Default::default()
    };
    app.accounts()
        .create_account(app.request(request))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// A contact named `given family`, without emails; its id.
pub async fn person(app: &TestApp, given: &str, family: &str) -> String {
    let request = crm_proto::v1::CreateContactRequest {
        name: Some(crm_proto::v1::PersonName {
            given: given.into(),
            family: family.into(),
        }),
        ..Default::default()
    };
    app.contacts()
        .create_contact(app.request(request))
        .await
        .unwrap()
        .into_inner()
        .stream_id
}

/// Archives (`true`) or restores record `id` of type `kind`, reason
/// `on_hold`.
pub async fn set_archived(app: &TestApp, kind: &str, id: &str, archived: bool) {
    use crm_proto::v1::{ArchiveRecordRequest, Reason, RecordRef, RestoreRecordRequest};
    let record = Some(RecordRef {
        r#type: kind.into(),
        id: id.into(),
    });
    let reason = Some(Reason {
        code: "on_hold".into(),
        text: String::new(),
    });
    if archived {
        let request = ArchiveRecordRequest {
            options: None,
            record,
            reason,
        };
        app.records()
            .archive_record(app.request(request))
            .await
            .unwrap();
    } else {
        let request = RestoreRecordRequest {
            options: None,
            record,
            reason,
        };
        app.records()
            .restore_record(app.request(request))
            .await
            .unwrap();
    }
}

/// The snapshot of stream `id` once one is saved (saves run in the
/// background): its version and its state as JSON text.
pub async fn snapshot_of(app: &TestApp, id: &str) -> (i64, String) {
    let client = app.db.client().await;
    eventually(Duration::from_secs(10), "a snapshot", || async {
        client
            .query_opt(
                "SELECT version, state::text FROM snapshots WHERE stream_id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap()
            .map(|row| (row.get(0), row.get(1)))
    })
    .await
}

/// The log's lock held from a connection of the test's own: appends wait
/// (each command has read what it decides on, and waits at its append)
/// until [`LogHold::release`].
pub struct LogHold(tokio_postgres::Client);

impl LogHold {
    /// Takes the lock once the process managers are done with what came
    /// before (none of their appends then waits in the test's place).
    pub async fn take(app: &TestApp) -> Self {
        settled(app).await;
        let client = app.db.client().await;
        client
            .batch_execute("BEGIN; SELECT position FROM log_head WHERE id = 1 FOR UPDATE")
            .await
            .unwrap();
        Self(client)
    }

    /// Returns once an append waits for the lock.
    pub async fn until_an_append_waits(&self, app: &TestApp) {
        app.db
            .until_a_backend("wait_event_type = 'Lock' AND query LIKE '%log_head%'")
            .await;
    }

    /// Gives commands sent after the first waiting append time to read
    /// what they decide on and queue their appends, then lets the log go.
    pub async fn release(self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.batch_execute("ROLLBACK").await.unwrap();
    }
}
