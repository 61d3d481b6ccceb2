//! `crm all` starts, serves health and reflection, and shuts down gracefully.
use std::time::Duration;

use crm_platform::Config;
use crm_test_support::{TestDb, TestNats, eventually};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn crm_all_serves_health_and_reflection_then_drains_on_shutdown() {
    let db = TestDb::create().await;
    let nats = TestNats::shared();
    let mut config = Config::from_env();
    config.pg_url = db.url();
    config.pg_pool_size = 4;
    config.relay_stream = nats.stream.clone();
    config.relay_subject_prefix = nats.subject_prefix.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { crm::run_all(&config, listener, shutdown).await }
    });

    eventually(
        Duration::from_secs(20),
        "crm all to report SERVING",
        || async {
            crm::health_check(address)
                .await
                .ok()
                .filter(|serving| *serving)
        },
    )
    .await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
    drop(replies);
    drop(reflection);

    // The migrations ran against this test's own database.
    let applied: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(applied >= 1);

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("crm all did not stop within 30s")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        crm::health_check(address).await.is_err(),
        "still answering after shutdown"
    );
}

#[tokio::test]
async fn crm_all_refuses_a_bad_configuration_naming_the_key() {
    let mut config = Config::from_env();
    config.pg_url = "definitely not a url".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = crm::run_all(&config, listener, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("CRM__PG__URL"), "{error}");
}

#[tokio::test]
async fn crm_command_alone_serves_commands() {
    let db = TestDb::create().await;
    let mut config = Config::from_env();
    config.pg_url = db.url();
    config.pg_pool_size = 4;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (config, shutdown) = (config.clone(), shutdown.clone());
        async move { crm::run_command(&config, listener, shutdown).await }
    });
    eventually(
        Duration::from_secs(20),
        "crm command to report SERVING",
        || async {
            crm::health_check(address)
                .await
                .ok()
                .filter(|serving| *serving)
        },
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut contacts = crm_proto::v1::contacts_client::ContactsClient::new(channel);
    let request = crm_proto::v1::CreateContactRequest {
        name: Some(crm_proto::v1::PersonName {
            given: "Ada".into(),
            family: String::new(),
        }),
        ..Default::default()
    };
    let reply = contacts
        .create_contact(crate::support::as_caller(
            request,
            Some("acme"),
            Some("user:ada"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.stream_version, 1);
    shutdown.cancel();
    assert!(running.await.unwrap().is_ok());
}
