#!/usr/bin/env bash
# Local services for recon-worker: PostgreSQL on 127.0.0.1:5432 and the Kafka-API
# broker tansu on 127.0.0.1:9092. Idempotent: `up` installs and starts only what is
# missing, so it is safe to run before every demo or test run.
#
#   scripts/dev-services.sh up|down|status|restart-broker
#
# tansu is the test broker on machines without Apache Kafka (see README, "Test
# broker"). It runs with its sqlite storage engine: the memory:// engine returns
# records from later batches when a consumer seeks into the middle of a batch.
set -euo pipefail

STATE_DIR="${RECON_SERVICES_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/recon-worker}"
BROKER_DB="$STATE_DIR/tansu.db"
BROKER_LOG="$STATE_DIR/tansu.log"
BROKER_PID="$STATE_DIR/tansu.pid"
PG_HOST=127.0.0.1
PG_PORT=5432
BROKER_PORT=9092
TANSU_VERSION=0.6.0

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 what=$2 tries=${3:-60}
    for _ in $(seq "$tries"); do
        port_open "$port" && return 0
        sleep 0.5
    done
    log "$what did not open 127.0.0.1:$port"
    return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }

postgres_up() {
    if command -v pg_isready >/dev/null && pg_ready; then
        log "PostgreSQL already running on $PG_HOST:$PG_PORT"
        return
    fi
    if ! command -v pg_ctlcluster >/dev/null; then
        log "installing Debian's postgresql"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if ! pg_lsclusters -h | awk '{print $2}' | grep -qx main; then
        as_root pg_createcluster "$version" main >/dev/null
    fi
    local conf="/etc/postgresql/$version/main"
    # Local development only: trust connections from this machine, as the CI image does.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$conf/pg_hba.conf"
    fi
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 60); do pg_ready && break; sleep 0.5; done
    pg_ready || { log "PostgreSQL did not become ready"; exit 1; }
}

tansu_install() {
    command -v tansu >/dev/null && return
    [ -x "$HOME/.cargo/bin/tansu" ] && { export PATH="$HOME/.cargo/bin:$PATH"; return; }
    log "installing tansu $TANSU_VERSION from crates.io (about 13 minutes, once per machine)"
    cargo install --locked "tansu@$TANSU_VERSION" --features libsql,postgres,dynostore >"$STATE_DIR/tansu-install.log" 2>&1 \
        || { tail -30 "$STATE_DIR/tansu-install.log" >&2; exit 1; }
    export PATH="$HOME/.cargo/bin:$PATH"
}

broker_up() {
    if port_open "$BROKER_PORT"; then
        log "broker already listening on 127.0.0.1:$BROKER_PORT"
        return
    fi
    tansu_install
    log "starting tansu (sqlite storage: $BROKER_DB)"
    # tansu reads the sqlite path relative to its working directory.
    # setsid: the broker gets its own session, so it outlives whoever started it (a
    # test runner cleans up its tests' process groups).
    (cd "$STATE_DIR" && exec setsid nohup tansu broker \
        --storage-engine "sqlite://$(basename "$BROKER_DB")" \
        --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
        >>"$BROKER_LOG" 2>&1 </dev/null) &
    echo $! >"$BROKER_PID"
    wait_port "$BROKER_PORT" tansu || { tail -20 "$BROKER_LOG" >&2; exit 1; }
}

broker_down() {
    if [ -f "$BROKER_PID" ] && kill -0 "$(cat "$BROKER_PID")" 2>/dev/null; then
        local pid
        pid=$(cat "$BROKER_PID")
        kill "$pid"
        # Wait for the process itself, not just its port: a new broker must not open
        # the sqlite file while the old one still holds it.
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            log "broker did not stop in 10s; killing it"
            kill -9 "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        log "broker stopped"
    fi
    rm -f "$BROKER_PID"
}

status() {
    if pg_ready; then echo "postgresql: up ($PG_HOST:$PG_PORT)"; else echo "postgresql: down"; fi
    if port_open "$BROKER_PORT"; then echo "broker: up (127.0.0.1:$BROKER_PORT)"; else echo "broker: down"; fi
}

mkdir -p "$STATE_DIR"
case "${1:-up}" in
    up) postgres_up; broker_up; status ;;
    down) broker_down; status ;;
    restart-broker) broker_down; broker_up ;;
    status) status ;;
    *) echo "usage: $0 up|down|status|restart-broker" >&2; exit 2 ;;
esac
