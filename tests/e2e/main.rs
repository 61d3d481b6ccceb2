//! End-to-end scenarios, one module per area.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test
mod accounts;
mod activities;
mod all_role;
mod analytics;
mod campaigns;
mod commerce;
mod configuration;
mod contacts;
mod customer360;
mod demo;
mod engagement;
mod event_log;
mod leads;
mod limits;
mod opportunities;
mod projections;
mod quality;
mod records;
mod relay;
mod sales;
mod service;
mod sla;
mod support;
mod tickets;
