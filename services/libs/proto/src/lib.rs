//! The `crm.v1` gRPC contract, generated from `proto/` at build time.
//! Conversions to domain types live with the services that use them.
#![allow(clippy::all)] // generated code

pub mod v1 {
    tonic::include_proto!("crm.v1");
}

/// The encoded `FileDescriptorSet` of every `crm.v1` file, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crm_v1_descriptor");
