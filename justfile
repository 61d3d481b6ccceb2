# The front door: every command a developer or CI runs.
set shell := ["bash", "-euo", "pipefail", "-c"]

data := env_var_or_default("CRM_DATA_DIR", justfile_directory() / ".data")
grpc_addr := env_var_or_default("CRM__GRPC__ADDR", "127.0.0.1:50051")

# List the recipes.
default:
    @just --list

# Start PostgreSQL and NATS (if nothing answers), migrate, run `crm all` in the background, seed the demo tenant.
up: infra
    cargo build --release -p crm
    ./target/release/crm migrate
    bash infra/crm-up.sh
    ./target/release/crm demo seed

# Follow a tenant's events as a plain NATS + CloudEvents SDK subscriber would (Python example).
consume TENANT="demo":
    "$(bash examples/python-consumer/setup.sh)" examples/python-consumer/consume.py --subject 'crm.v1.{{TENANT}}.>'

# Load the demo tenant through the gRPC API (safe to repeat).
demo:
    ./target/release/crm demo seed

# Stop crm, NATS and PostgreSQL (only the ones this project started).
down:
    bash infra/down.sh

# Start only PostgreSQL and NATS.
infra:
    bash infra/up.sh

# Follow the logs of the background `crm all`.
logs:
    tail -f {{data}}/crm.log

# Every test, unit to end-to-end, against real PostgreSQL and NATS.
test: infra
    bash examples/python-consumer/setup.sh >/dev/null
    if cargo nextest --version >/dev/null 2>&1; then \
        cargo nextest run --workspace --no-fail-fast; \
    else \
        cargo test --workspace --no-fail-fast; \
    fi

# One release benchmark, e.g. `just bench append`.
bench NAME: infra
    cargo bench -p crm-benches --bench {{NAME}}

# Regenerate the JSON Schemas of event payloads under schemas/ (CI checks they are current).
schemas:
    cargo run -q -p crm -- schemas write

# Format the code.
fmt:
    cargo fmt --all

# Format check, clippy with warnings as errors, and the domain's dependency rule.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings
    bash infra/check-domain-deps.sh
