#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the end-to-end
# tests against a real Apache Kafka broker and a real PostgreSQL (started, and installed
# if missing, by scripts/dev-services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/dev-services.sh up

# sqlx::test creates a fresh database per test on this server.
export DATABASE_URL="${RECON_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export RECON_TEST_BROKERS="${RECON_TEST_BROKERS:-127.0.0.1:9092}"

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
