# syntax=docker/dockerfile:1
#
# recon-worker image: a release build on the Rust Debian image, copied into
# debian:bookworm-slim and run as an unprivileged user. It carries the worker (the
# entrypoint) and recon-tools (topic creation, the load generator), which
# docker-compose.yml runs from the same image.
#
#   docker build -t recon-worker .
#   docker run --rm -e DATABASE_URL=... -e RECON_KAFKA_BROKERS=... recon-worker run
#   docker run --rm --entrypoint recon-tools -e ... recon-worker loadgen --scenarios 500

FROM rust:1.95-bookworm AS builder

# rdkafka builds the bundled librdkafka and tikv-jemalloc-sys builds jemalloc, both
# with make (rdkafka also links OpenSSL and zlib).
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        g++ make perl pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependency layer: build every dependency against stub sources, so that changing
# only the sources does not rebuild librdkafka and the rest of Cargo.lock. The
# workspace has two packages: the worker (root) and its tools (tools/).
COPY Cargo.toml Cargo.lock ./
COPY tools/Cargo.toml ./tools/
RUN mkdir -p src tools/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > tools/src/main.rs \
    && touch tools/src/lib.rs \
    && cargo build --release --locked --bin recon-worker --bin recon-tools \
    && rm -rf src tools/src

# The real sources. `migrations/` is embedded into the binary by sqlx::migrate!.
COPY src ./src
COPY tools/src ./tools/src
COPY migrations ./migrations
# Make sure cargo sees the real sources as newer than the stub build.
RUN touch src/main.rs src/lib.rs tools/src/main.rs tools/src/lib.rs \
    && cargo build --release --locked --bin recon-worker --bin recon-tools \
    && cp target/release/recon-worker target/release/recon-tools /usr/local/bin/

FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 recon \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin recon

COPY --from=builder /usr/local/bin/recon-worker /usr/local/bin/recon-tools /usr/local/bin/

USER 10001:10001
ENV RECON_METRICS_ADDR=0.0.0.0:9898
EXPOSE 9898

ENTRYPOINT ["/usr/local/bin/recon-worker"]
CMD ["run"]
