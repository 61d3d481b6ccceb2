//! gRPC bootstrap: the server every role that answers calls shares, with
//! health, reflection (of every crm.v1 service) and a span per request.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::RunError;
use crate::command::{
    AccountsService, ActivitiesService, CampaignsService, CommandHandler, CommerceService,
    ConfigurationService, ContactsService, LeadsService, MAX_REQUEST_BYTES, OpportunitiesService,
    PipelinesService, RecordsService, TicketsService,
};
use crate::query::{EventLogService, ProjectionsAdminService, SalesService, ServiceQueriesService};
use crm_proto::v1::accounts_server::AccountsServer;
use crm_proto::v1::activities_server::ActivitiesServer;
use crm_proto::v1::campaigns_server::CampaignsServer;
use crm_proto::v1::commerce_server::CommerceServer;
use crm_proto::v1::configuration_server::ConfigurationServer;
use crm_proto::v1::contacts_server::ContactsServer;
use crm_proto::v1::event_log_server::EventLogServer;
use crm_proto::v1::leads_server::LeadsServer;
use crm_proto::v1::opportunities_server::OpportunitiesServer;
use crm_proto::v1::pipelines_server::PipelinesServer;
use crm_proto::v1::projections_admin_server::ProjectionsAdminServer;
use crm_proto::v1::records_server::RecordsServer;
use crm_proto::v1::sales_queries_server::SalesQueriesServer;
use crm_proto::v1::service_queries_server::ServiceQueriesServer;
use crm_proto::v1::tickets_server::TicketsServer;

/// The gRPC services one process answers, by role.
pub(crate) struct Services {
    pub commands: Option<CommandHandler>,
    pub event_log: Option<EventLogService>,
    pub sales: Option<SalesService>,
    pub service: Option<ServiceQueriesService>,
    pub analytics: Option<crate::query::AnalyticsService>,
    pub customer360: Option<crate::query::Customer360Service>,
    pub quality: Option<crate::query::DataQualityService>,
    pub admin: Option<ProjectionsAdminService>,
}

/// Serves on `listener` until `intake` is cancelled: then reports NOT_SERVING,
/// stops accepting, and lets in-flight calls finish.
pub(crate) async fn serve(
    listener: TcpListener,
    intake: CancellationToken,
    services: Services,
) -> Result<(), RunError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crm_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let commands = services.commands;
    macro_rules! command_service {
        ($server:ident, $service:ident) => {
            commands.clone().map(|commands| {
                $server::new($service::new(commands)).max_decoding_message_size(MAX_REQUEST_BYTES)
            })
        };
    }
    let contacts = command_service!(ContactsServer, ContactsService);
    let accounts = command_service!(AccountsServer, AccountsService);
    let leads = command_service!(LeadsServer, LeadsService);
    let pipelines = command_service!(PipelinesServer, PipelinesService);
    let opportunities = command_service!(OpportunitiesServer, OpportunitiesService);
    let tickets = command_service!(TicketsServer, TicketsService);
    let activities = command_service!(ActivitiesServer, ActivitiesService);
    let campaigns = command_service!(CampaignsServer, CampaignsService);
    let commerce = command_service!(CommerceServer, CommerceService);
    let configuration = command_service!(ConfigurationServer, ConfigurationService);
    let records = command_service!(RecordsServer, RecordsService);
    let event_log = services.event_log.map(EventLogServer::new);
    // Query requests are small; DataQuality also takes a command
    // (DismissDuplicate): every service gets the commands' request limit.
    let limit = crate::command::MAX_REQUEST_BYTES;
    let sales = services
        .sales
        .map(|s| SalesQueriesServer::new(s).max_decoding_message_size(limit));
    let service = services
        .service
        .map(|s| ServiceQueriesServer::new(s).max_decoding_message_size(limit));
    let analytics = services.analytics.map(|s| {
        crm_proto::v1::analytics_queries_server::AnalyticsQueriesServer::new(s)
            .max_decoding_message_size(limit)
    });
    let admin = services
        .admin
        .map(|s| ProjectionsAdminServer::new(s).max_decoding_message_size(limit));
    let quality = services.quality.map(|s| {
        crm_proto::v1::data_quality_server::DataQualityServer::new(s)
            .max_decoding_message_size(limit)
    });
    let customer360 = services.customer360.map(|s| {
        crm_proto::v1::customer360_server::Customer360Server::new(s)
            .max_decoding_message_size(limit)
    });
    let address = listener.local_addr().ok();
    // Small unary replies must not wait for Nagle's algorithm.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    tracing::info!(?address, "gRPC serving");
    Server::builder()
        .timeout(Duration::from_secs(60))
        .trace_fn(|request| tracing::info_span!("grpc_request", method = %request.uri().path()))
        .add_service(health)
        .add_service(reflection)
        .add_optional_service(contacts)
        .add_optional_service(accounts)
        .add_optional_service(leads)
        .add_optional_service(pipelines)
        .add_optional_service(opportunities)
        .add_optional_service(tickets)
        .add_optional_service(activities)
        .add_optional_service(campaigns)
        .add_optional_service(commerce)
        .add_optional_service(configuration)
        .add_optional_service(records)
        .add_optional_service(event_log)
        .add_optional_service(sales)
        .add_optional_service(service)
        .add_optional_service(analytics)
        .add_optional_service(admin)
        .add_optional_service(quality)
        .add_optional_service(customer360)
        .serve_with_incoming_shutdown(incoming, async move {
            intake.cancelled().await;
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!("gRPC intake closed; draining in-flight calls");
        })
        .await?;
    Ok(())
}

/// Asks the server at `address` for its overall health; true when SERVING.
pub async fn health_check(address: SocketAddr) -> Result<bool, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| status.to_string())?;
    Ok(reply.into_inner().status() == WireStatus::Serving)
}
