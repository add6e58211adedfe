#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the end-to-end
# tests against a real Apache Kafka broker and a real PostgreSQL (started, and installed
# if missing, by scripts/dev-services.sh), the Kafka ones over PLAINTEXT and, in
# tests/security_kafka.rs, over its SASL_SSL and SSL listeners.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/dev-services.sh up

# sqlx::test creates a fresh database per test on this server. The services are the
# ones dev-services.sh just started: the same variables choose the set (ports, and the
# directory with the CA and SCRAM password of the broker's secure listeners, which
# tests/common finds from RECON_SERVICES_DIR as the script does).
kafka_port="${RECON_KAFKA_PORT:-9092}"
export DATABASE_URL="${RECON_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:${RECON_PG_PORT:-5432}/postgres}"
export RECON_TEST_BROKERS="${RECON_TEST_BROKERS:-127.0.0.1:$kafka_port}"
export RECON_TEST_SASL_SSL_BROKERS="${RECON_TEST_SASL_SSL_BROKERS:-127.0.0.1:${RECON_KAFKA_SASL_SSL_PORT:-$((kafka_port + 2))}}"
export RECON_TEST_SSL_BROKERS="${RECON_TEST_SSL_BROKERS:-127.0.0.1:${RECON_KAFKA_SSL_PORT:-$((kafka_port + 3))}}"

# The workspace: the worker and its tools (tools/).
echo "== cargo fmt --all --check"
cargo fmt --all --check
echo "== cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings

if ! command -v cargo-nextest >/dev/null; then
    cargo install --locked cargo-nextest
fi
echo "== tests"
cargo nextest run --locked --workspace --profile ci

echo "== deployment files and a live /metrics scrape, checked with real tools"
# Both binaries: the check runs the worker and feeds it with recon-tools.
cargo build --locked --quiet --workspace --bins
scripts/validate-deploy.sh target/debug/recon-worker

# The chaos test restarts the shared PostgreSQL and broker, so it runs alone, last.
echo "== chaos test (kills, restarts, a frozen worker)"
cargo nextest run --locked --profile ci --run-ignored only --no-capture -E 'binary(chaos)'
