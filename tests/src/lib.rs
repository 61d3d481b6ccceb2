//! End-to-end scenarios live in `e2e/`: one test binary that starts the real
//! `crm` roles on port 0 against real PostgreSQL (and NATS) and talks to them
//! over gRPC like any client would.
