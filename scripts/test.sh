#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the end-to-end
# tests against a real Kafka-protocol broker and a real PostgreSQL (started, and
# installed if missing, by scripts/dev-services.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/dev-services.sh up

# sqlx::test creates a fresh database per test on this server.
export DATABASE_URL="${RECON_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export RECON_TEST_BROKERS="${RECON_TEST_BROKERS:-127.0.0.1:9092}"

echo "== cargo fmt --check"
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

echo "== tests"
if command -v cargo-nextest >/dev/null; then
    cargo nextest run --locked --no-fail-fast --profile ci
else
    cargo test --locked --no-fail-fast
fi
