//! `just bench commands`: CreateContact over gRPC against `crm all` (started in
//! this process on a loopback port), next to plain tokio-postgres INSERTs into
//! a scratch table of the events table's shape, in the same run.
use std::time::{Duration, Instant};

use crm_benches::{
    Latencies, Rate, create_raw_table, phase_duration, progress, raw_inserts, report,
};
use crm_platform::Config;
use crm_proto::v1::contacts_client::ContactsClient;
use crm_proto::v1::{
    ContactPreferences, CreateContactRequest, EmailAddress, PersonName, PhoneNumber,
};
use crm_test_support::TestDb;
use tokio_util::sync::CancellationToken;
use tonic::Request;
use tonic::transport::Channel;

fn create_contact(phase: usize, caller: usize, n: u64) -> Request<CreateContactRequest> {
    let mut request = Request::new(CreateContactRequest {
        options: None,
        contact_id: String::new(),
        name: Some(PersonName {
            given: "Ada".into(),
            family: format!("Lovelace-{caller}-{n}"),
        }),
        emails: vec![EmailAddress {
            address: format!("ada.{phase}.{caller}.{n}@example.com"),
            primary: true,
        }],
        phones: vec![PhoneNumber {
            // A phone of its own: contacts sharing one are duplicate
            // suspects of each other (DOMAIN.md §5.5), and every create would
            // set off a duplicate-pair command per earlier contact.
            number: format!(
                "+861{:02}{:02}{:06}",
                phase % 100,
                caller % 100,
                n % 1_000_000
            ),
            kind: "mobile".into(),
        }],
        title: "Analyst".into(),
        preferences: Some(ContactPreferences {
            channel: "email".into(),
            language: "en-GB".into(),
            time_zone: "Europe/London".into(),
            do_not_contact: false,
        }),
    });
    request
        .metadata_mut()
        .insert("x-tenant-id", "bench".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("x-actor-id", "user:bench".parse().expect("ascii"));
    request
}

/// `callers` tasks sending CreateContact back to back over `channels`.
async fn commands(channels: &[Channel], callers: usize) -> (f64, Latencies) {
    let deadline = Instant::now() + phase_duration();
    let rate = Rate::start();
    let mut workers = Vec::new();
    for caller in 0..callers {
        let mut client = ContactsClient::new(channels[caller % channels.len()].clone());
        workers.push(tokio::spawn(async move {
            let (mut n, mut latencies) = (0u64, Latencies::default());
            while Instant::now() < deadline {
                let started = Instant::now();
                client
                    .create_contact(create_contact(callers, caller, n))
                    .await
                    .expect("create contact");
                latencies.record(started.elapsed());
                n += 1;
            }
            (n, latencies)
        }));
    }
    let (mut total, mut latencies) = (0, Latencies::default());
    for worker in workers {
        let (n, worker_latencies) = worker.await.expect("worker");
        total += n;
        latencies.extend(worker_latencies);
    }
    (rate.per_second(total), latencies)
}

#[tokio::main]
async fn main() {
    let db = TestDb::create().await;
    create_raw_table(&db).await;
    let nats = crm_test_support::TestNats::shared();
    let mut config = Config::from_env();
    config.pg_url = db.url();
    config.nats_url = nats.url.clone();
    config.relay_stream = nats.stream.clone();
    config.relay_subject_prefix = nats.subject_prefix.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn({
        let shutdown = shutdown.clone();
        // `crm all`, as issue 5 asks: the relay and the projectors run too.
        async move { crm::run_all(&config, listener, shutdown).await }
    });
    let started = Instant::now();
    while !matches!(crm::health_check(address).await, Ok(true)) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "crm all did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(
            tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect"),
        );
    }
    progress(&format!(
        "database {}, crm all on {address}, {:?} per phase",
        db.name,
        phase_duration()
    ));

    {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channels[0].clone());
        let mut latencies = Latencies::default();
        for _ in 0..2000 {
            let started = Instant::now();
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .expect("health");
            latencies.record(started.elapsed());
        }
        progress(&format!(
            "grpc health round trip p50 {:.3} ms",
            latencies.percentile_ms(50.0)
        ));
    }
    progress("raw: one INSERT per transaction, 1 task");
    let (_, mut raw_1_latency) = raw_inserts(&db, 1, 1).await;
    progress("raw: one INSERT per transaction, 32 tasks");
    let (raw_32, _) = raw_inserts(&db, 32, 1).await;
    progress("commands: CreateContact, 1 caller");
    let (ours_1, mut ours_1_latency) = commands(&channels, 1).await;
    progress("commands: CreateContact, 32 callers");
    let (ours_32, _) = commands(&channels, 32).await;

    shutdown.cancel();
    let _ = server.await;

    let raw_1 = 1000.0 / raw_1_latency.percentile_ms(50.0);
    report("commands_32", ours_32, "commands/s", raw_32);
    report("commands_1", ours_1, "commands/s", raw_1);
    report(
        "commands_p50_latency_1",
        ours_1_latency.percentile_ms(50.0),
        "ms",
        raw_1_latency.percentile_ms(50.0),
    );
    report(
        "commands_p99_latency_1",
        ours_1_latency.percentile_ms(99.0),
        "ms",
        raw_1_latency.percentile_ms(99.0),
    );
}
