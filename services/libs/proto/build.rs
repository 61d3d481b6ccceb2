//! Compiles `proto/crm/v1/*.proto` with protox (pure Rust: no system protoc)
//! and writes the descriptor set that gRPC reflection serves.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "crm/v1/common.proto",
        "crm/v1/contacts.proto",
        "crm/v1/accounts.proto",
        "crm/v1/leads.proto",
        "crm/v1/opportunities.proto",
        "crm/v1/tickets.proto",
        "crm/v1/activities.proto",
        "crm/v1/campaigns.proto",
        "crm/v1/commerce.proto",
        "crm/v1/configuration.proto",
        "crm/v1/records.proto",
        "crm/v1/event_log.proto",
        "crm/v1/sales.proto",
        "crm/v1/service.proto",
        "crm/v1/analytics.proto",
        "crm/v1/projections_admin.proto",
        "crm/v1/customer360.proto",
        "crm/v1/quality.proto",
    ];
    let root = "../../../proto";
    for file in files {
        println!("cargo:rerun-if-changed={root}/{file}");
    }
    let descriptors = protox::compile(files, [root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("crm_v1_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
