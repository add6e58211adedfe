#!/usr/bin/env bash
# Local services for recon-worker: PostgreSQL on 127.0.0.1:5432 and Apache Kafka 4.1
# (KRaft, one combined broker+controller node) on 127.0.0.1:9092 (PLAINTEXT), with two
# secure listeners beside it: SASL_SSL (SCRAM-SHA-512 over TLS) on 9094 and SSL on
# 9095. Idempotent: `up` installs and starts only what is missing, so it is safe to run
# before every demo or test run; a second `up` returns at once.
#
#   scripts/dev-services.sh up|down|status|restart-broker [--hard]
#
# Kafka runs from its Maven Central artifacts, not a downloaded tarball: the jars named
# by scripts/kafka/pom.xml are copied once per machine into a cache directory with
# `mvn dependency:copy-dependencies`, the storage is formatted with
# `kafka.tools.StorageTool`, and the broker is `java kafka.Kafka server.properties`.
# A JDK, Maven and PostgreSQL are installed from Debian's packages where missing.
#
# `up` starts a stopped broker on empty storage (topics are the tests' own, made anew
# each run); `restart-broker` stops it with SIGTERM (a controlled shutdown) and starts
# it again on the same storage; `restart-broker --hard` SIGKILLs it first (the chaos
# test's crash).
#
# Secure listeners (the TLS/SASL tests, tests/security_kafka.rs): a cold `up` makes a
# new CA, two broker certificates signed by it and a password for the SCRAM-SHA-512
# user `recon`, all in $KAFKA_DIR/security/ (printed by `up` and `status`); the user is
# written into the storage when it is formatted (`StorageTool format --add-scram`), so
# it exists before the listener serves. The SASL_SSL listener's certificate names
# `localhost` and `127.0.0.1`; the SSL listener's names only the address 127.0.0.1, so
# a client that connects to it as `localhost` meets a real hostname mismatch. The
# controller and inter-broker listeners stay PLAINTEXT; there is no authorizer (any
# authenticated user may do anything). A restart keeps the storage, so it keeps the
# certificates and the password too.
#
# PostgreSQL also accepts TLS with a server certificate for localhost and 127.0.0.1
# signed by a CA made for it, both generated (openssl) whenever `up` starts the cluster
# or finds it without them, into $STATE_DIR/pg-tls: `ca.crt` is what a client verifies
# the server with (`sslmode=verify-full&sslrootcert=.../ca.crt`), `untrusted-ca.crt`
# an unrelated CA the server's certificate does not chain to (what a client holding the
# wrong CA bundle sees). Connections without TLS are still accepted.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE_DIR="${RECON_SERVICES_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/recon-worker}"
CACHE_DIR="${RECON_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recon-worker}"
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/kafka/pom.xml")
KAFKA_LIBS="$CACHE_DIR/kafka-$KAFKA_VERSION/libs"
KAFKA_DIR="$STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_CONF="$KAFKA_DIR/server.properties"
KAFKA_LOG="$KAFKA_DIR/broker.log"
KAFKA_PID="$KAFKA_DIR/broker.pid"
KAFKA_HEAP="${RECON_KAFKA_HEAP:--Xms512m -Xmx512m}"
PG_HOST=127.0.0.1
# A second set of services beside the first (say, to run the chaos test while other
# tests use the first) needs its own RECON_SERVICES_DIR, ports and cluster name.
PG_PORT="${RECON_PG_PORT:-5432}"
PG_CLUSTER="${RECON_PG_CLUSTER:-main}"
BROKER_PORT="${RECON_KAFKA_PORT:-9092}"
CONTROLLER_PORT=$((BROKER_PORT + 1))
SASL_SSL_PORT="${RECON_KAFKA_SASL_SSL_PORT:-$((BROKER_PORT + 2))}"
SSL_PORT="${RECON_KAFKA_SSL_PORT:-$((BROKER_PORT + 3))}"
SECURITY_DIR="$KAFKA_DIR/security"
SCRAM_USER=recon

log() { printf '[services] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
    log "installing Debian's $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }

PG_TLS_DIR="$STATE_DIR/pg-tls"

# The version of the cluster this script manages, if it exists.
pg_cluster_version() {
    command -v pg_lsclusters >/dev/null || return 0
    pg_lsclusters -h | awk -v c="$PG_CLUSTER" '$2 == c { print $1; exit }'
}

# Whether a TLS connection verified against our CA succeeds (libpq: verify-full checks
# the chain and that 127.0.0.1 is among the certificate's names).
pg_tls_works() {
    [ -f "$PG_TLS_DIR/ca.crt" ] || return 1
    psql -X -q -t -c 'SELECT 1' \
        "host=$PG_HOST port=$PG_PORT user=postgres dbname=postgres sslmode=verify-full sslrootcert=$PG_TLS_DIR/ca.crt" \
        >/dev/null 2>&1
}

# A CA, a server certificate it signs (SAN localhost, 127.0.0.1) and an unrelated CA,
# made anew; the server's pair is installed into the cluster's configuration directory
# (readable by the postgres user only) and named by conf.d/recon-tls.conf. The CAs'
# keys are not kept: nothing else is ever signed with them.
pg_tls_setup() {
    local version=$1
    local conf="/etc/postgresql/$version/$PG_CLUSTER"
    command -v openssl >/dev/null || apt_install openssl
    # Beside the state it feeds, not in /tmp: it holds the CAs' keys until the end.
    local work="$STATE_DIR/pg-tls.work"
    rm -rf "$work"
    mkdir -m 0700 "$work"
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    # openssl chats on stderr; shown only when it fails.
    ossl() { openssl "$@" 2>"$work/openssl.err" || { cat "$work/openssl.err" >&2; return 1; }; }
    ossl req -x509 "${ec[@]}" -days 30 -subj "/CN=recon-worker dev CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$work/ca.key" -out "$work/ca.crt"
    ossl req "${ec[@]}" -subj "/CN=localhost" \
        -keyout "$work/server.key" -out "$work/server.csr"
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$work/server.ext"
    ossl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
        -CAcreateserial -days 30 -extfile "$work/server.ext" -out "$work/server.crt"
    ossl req -x509 "${ec[@]}" -days 30 -subj "/CN=recon-worker untrusted CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -keyout "$work/untrusted-ca.key" -out "$work/untrusted-ca.crt"
    as_root install -d -o postgres -g postgres -m 0700 "$conf/recon-tls"
    as_root install -o postgres -g postgres -m 0644 "$work/server.crt" "$conf/recon-tls/server.crt"
    as_root install -o postgres -g postgres -m 0600 "$work/server.key" "$conf/recon-tls/server.key"
    as_root install -d -o postgres -g postgres -m 0755 "$conf/conf.d"
    printf '%s\n' "# Written by scripts/dev-services.sh: TLS with a certificate its CA ($PG_TLS_DIR/ca.crt) signs." \
        "ssl = on" "ssl_cert_file = '$conf/recon-tls/server.crt'" "ssl_key_file = '$conf/recon-tls/server.key'" \
        | as_root tee "$conf/conf.d/recon-tls.conf" >/dev/null
    mkdir -p "$PG_TLS_DIR"
    install -m 0644 "$work/ca.crt" "$PG_TLS_DIR/ca.crt"
    install -m 0644 "$work/untrusted-ca.crt" "$PG_TLS_DIR/untrusted-ca.crt"
    rm -rf "$work"
    log "PostgreSQL TLS: CA $PG_TLS_DIR/ca.crt, server certificate for localhost and 127.0.0.1"
}

postgres_up() {
    if command -v pg_isready >/dev/null && pg_ready; then
        log "PostgreSQL already running on $PG_HOST:$PG_PORT"
        if pg_tls_works; then
            return
        fi
        # Started before this script set TLS up (or by something else): the settings
        # take effect on a reload, which keeps every open connection.
        local version
        version=$(pg_cluster_version)
        if [ -z "$version" ]; then
            log "PostgreSQL on port $PG_PORT is not cluster $PG_CLUSTER: TLS not set up (tests needing it will fail)"
            return
        fi
        pg_tls_setup "$version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" reload
        for _ in $(seq 20); do pg_tls_works && return; sleep 0.25; done
        log "PostgreSQL did not accept TLS verified against $PG_TLS_DIR/ca.crt after a reload"
        exit 1
    fi
    command -v pg_ctlcluster >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
        || apt_install postgresql
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    [ -n "$version" ] || version=$(ls /usr/lib/postgresql | sort -V | tail -1)
    if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$PG_CLUSTER"; then
        as_root pg_createcluster -p "$PG_PORT" "$version" "$PG_CLUSTER" >/dev/null
    fi
    # The cluster's own version: an existing cluster may be older than the newest installed.
    version=$(pg_cluster_version)
    local conf="/etc/postgresql/$version/$PG_CLUSTER"
    # Local development only: trust connections from this machine, as the CI image does.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$conf/pg_hba.conf"; then
        as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$conf/pg_hba.conf"
    fi
    pg_tls_setup "$version"
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$PG_CLUSTER" start || true
    for _ in $(seq 120); do pg_ready && break; sleep 0.5; done
    pg_ready || { log "PostgreSQL did not become ready"; exit 1; }
    pg_tls_works || { log "PostgreSQL does not accept TLS verified against $PG_TLS_DIR/ca.crt"; exit 1; }
}

kafka_install() {
    [ -f "$KAFKA_LIBS/.complete" ] && return
    command -v java >/dev/null || apt_install default-jre-headless
    command -v mvn >/dev/null || apt_install maven
    log "fetching Apache Kafka $KAFKA_VERSION from Maven Central (once per machine)"
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$KAFKA_LIBS"
    mvn -q -B -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$CACHE_DIR/kafka-fetch.log" 2>&1 \
        || { tail -30 "$CACHE_DIR/kafka-fetch.log" >&2; exit 1; }
    touch "$KAFKA_LIBS/.complete"
}

# A bounded heap and short GC pauses keep the broker small and steady beside the worker.
# shellcheck disable=SC2206
KAFKA_JAVA=(java $KAFKA_HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -cp "$KAFKA_LIBS/*")

# Kafka's own command-line tools (ConfigCommand), with a small heap; their log lines
# go to stderr at WARN, not into the broker's log.
KAFKA_TOOL=(java -Xmx256m -Djava.awt.headless=true -Dlog4j2.level=WARN -cp "$KAFKA_LIBS/*")

# A new CA, the two broker certificates it signs and the SCRAM user's password
# (cold start only: the storage the user is formatted into is new as well).
kafka_security_make() {
    command -v openssl >/dev/null || apt_install openssl
    rm -rf "$SECURITY_DIR"
    mkdir -p "$SECURITY_DIR"
    chmod 700 "$SECURITY_DIR"
    local d="$SECURITY_DIR" days=30
    (
        cd "$d"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days "$days" \
            -subj "/CN=recon-worker test CA $(date -u +%Y%m%dT%H%M%SZ)" \
            -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
        # sign NAME SAN: a broker key and certificate signed by the CA, in the PEM
        # keystore layout Kafka reads (unencrypted PKCS#8 key, then the chain).
        sign() {
            openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$3"
            printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$2" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
                -days "$days" -extfile "$1.ext" -out "$1.crt"
            cat "$1.key" "$1.crt" ca.pem >"$1.pem"
            rm -f "$1.csr" "$1.ext"
        }
        sign broker "DNS:localhost,IP:127.0.0.1" localhost
        # No DNS name at all, and a subject that is not a host name either: OpenSSL
        # falls back to the subject CN when a certificate has no DNS name.
        sign broker-ip-only "IP:127.0.0.1" "recon-worker test broker, IP address only"
        openssl rand -hex 24 | tr -d '\n' >"$SCRAM_USER.password"
        # For Kafka's Java tools (and the readiness check below) over SASL_SSL.
        cat >client.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$SCRAM_USER" password="$(cat "$SCRAM_USER.password")";
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.pem
ssl.endpoint.identification.algorithm=https
PROPS
        chmod 644 ca.pem
    ) >"$KAFKA_DIR/security.log" 2>&1 || { cat "$KAFKA_DIR/security.log" >&2; exit 1; }
}

kafka_configure() {
    mkdir -p "$KAFKA_DATA"
    # Rewritten on every start, so a changed setting takes effect with `restart-broker`.
    cat >"$KAFKA_CONF" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$BROKER_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT,SSL://127.0.0.1:$SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$BROKER_PORT,SASL_SSL://127.0.0.1:$SASL_SSL_PORT,SSL://127.0.0.1:$SSL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
# SASL_SSL: SCRAM-SHA-512 over TLS, the certificate for localhost and 127.0.0.1.
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$SECURITY_DIR/broker.pem
# SSL: TLS only, the certificate for the address 127.0.0.1 only (see the header).
listener.name.ssl.ssl.keystore.type=PEM
listener.name.ssl.ssl.keystore.location=$SECURITY_DIR/broker-ip-only.pem
ssl.client.auth=none
log.dirs=$KAFKA_DATA
# One node: every internal topic has one replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Topics are created by the tests, the demo and the load generator with the partition
# count they need; a typo in a topic name must not silently create a 1-partition topic.
auto.create.topics.enable=false
# Tests start and stop many groups: no 3 s wait for late joiners, short sessions allowed.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
# The next-generation protocol (KIP-848): shorter sessions than its 45 s default, so a
# killed member's partitions move within a test's patience.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=1000
# After a SIGKILL the restarted node finds its own old registration with the
# controller and waits for it to expire before it serves (9 s by default): a crashed
# broker is back about 6 s sooner.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
num.network.threads=2
num.io.threads=4
EOF
    cat >"$KAFKA_DIR/log4j2.properties" <<EOF
appender.file.type=File
appender.file.name=file
appender.file.fileName=$KAFKA_LOG
appender.file.append=true
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.request.name=kafka.request.logger
logger.request.level=WARN
logger.state.name=state.change.logger
logger.state.level=WARN
EOF
    if [ "${1:-}" = fresh ]; then
        # A cold `up` starts from empty storage, like the compose file's broker: every
        # test, demo and benchmark creates topics of its own, and a log directory that
        # kept them all (thousands of partitions after a few suite runs) slowed every
        # start and every restart of the broker.
        rm -rf "$KAFKA_DATA"
        mkdir -p "$KAFKA_DATA"
    fi
    if [ ! -f "$KAFKA_DATA/meta.properties" ]; then
        log "formatting Kafka storage in $KAFKA_DATA"
        local cluster_id
        cluster_id=$("${KAFKA_JAVA[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)
        # The SCRAM user goes into the new storage's first metadata records, so it
        # exists before the SASL_SSL listener accepts anyone.
        "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format --config "$KAFKA_CONF" --cluster-id "$cluster_id" \
            --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$(cat "$SECURITY_DIR/$SCRAM_USER.password")]" \
            --ignore-formatted >>"$KAFKA_DIR/format.log" 2>&1 \
            || { tail -20 "$KAFKA_DIR/format.log" >&2; exit 1; }
    fi
}

# The secure listener works end to end: Kafka's own admin client logs in as the SCRAM
# user over SASL_SSL, trusting only the generated CA, with host name verification.
kafka_security_check() {
    local out
    if ! out=$("${KAFKA_TOOL[@]}" kafka.admin.ConfigCommand --bootstrap-server "127.0.0.1:$SASL_SSL_PORT" \
        --command-config "$SECURITY_DIR/client.properties" \
        --describe --entity-type users --entity-name "$SCRAM_USER" 2>&1) \
        || ! grep -q 'SCRAM-SHA-512' <<<"$out"; then
        log "the SASL_SSL listener on 127.0.0.1:$SASL_SSL_PORT refused the SCRAM user: $out"
        exit 1
    fi
    log "SASL_SSL listener checked: user $SCRAM_USER logs in over TLS"
}

broker_pid() {
    [ -f "$KAFKA_PID" ] && kill -0 "$(cat "$KAFKA_PID")" 2>/dev/null && cat "$KAFKA_PID"
}

# broker_up [fresh]: `fresh` (a cold start) empties the storage first; a restart keeps it.
broker_up() {
    if port_open "$BROKER_PORT"; then
        if port_open "$SASL_SSL_PORT" && port_open "$SSL_PORT" || [ "${1:-}" != fresh ]; then
            log "broker already listening on 127.0.0.1:$BROKER_PORT"
            return
        fi
        # Started by an older version of this script, without the secure listeners:
        # a cold start gives it them (its storage is the tests' throwaway topics).
        broker_pid >/dev/null || {
            log "something listens on 127.0.0.1:$BROKER_PORT but not on $SASL_SSL_PORT/$SSL_PORT, and it is not this script's broker"
            exit 1
        }
        log "broker has no secure listeners yet; restarting it"
        broker_down TERM
    fi
    kafka_install
    if [ "${1:-}" = fresh ]; then
        kafka_security_make
    elif [ ! -f "$SECURITY_DIR/broker.pem" ]; then
        log "no TLS material in $SECURITY_DIR: run \`$0 down\` then \`$0 up\` (a cold start makes it)"
        exit 1
    fi
    kafka_configure "${1:-}"
    log "starting Apache Kafka $KAFKA_VERSION (data: $KAFKA_DATA)"
    local mark
    mark=$(wc -l <"$KAFKA_LOG" 2>/dev/null || echo 0)
    # setsid: the broker gets its own session, so it outlives whoever started it (a test
    # runner cleans up its tests' process groups).
    (exec setsid nohup "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_CONF" \
        >>"$KAFKA_DIR/stdout.log" 2>&1 </dev/null) &
    echo $! >"$KAFKA_PID"
    # Ready means the broker says so (its log line after the metadata is loaded and the
    # listeners accept), not that a port is open.
    for _ in $(seq 240); do
        if tail -n +"$((mark + 1))" "$KAFKA_LOG" 2>/dev/null | grep -q 'Kafka Server started'; then
            if port_open "$BROKER_PORT" && port_open "$SASL_SSL_PORT" && port_open "$SSL_PORT"; then
                # A cold start made new certificates and a new user: check them once.
                [ "${1:-}" = fresh ] && kafka_security_check
                log "Kafka ready"
                return 0
            fi
        fi
        broker_pid >/dev/null || break
        sleep 0.25
    done
    log "Kafka did not become ready"
    tail -30 "$KAFKA_LOG" "$KAFKA_DIR/stdout.log" >&2 || true
    exit 1
}

broker_down() {
    local pid signal=${1:-TERM}
    if pid=$(broker_pid); then
        kill -"$signal" "$pid"
        # Wait for the process itself, not just its port: a new broker must not open the
        # log directories while the old one still holds their lock.
        for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            log "broker did not stop in 30s; killing it"
            kill -9 "$pid" 2>/dev/null || true
            for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        fi
        log "broker stopped ($signal)"
    fi
    rm -f "$KAFKA_PID"
}

status() {
    if pg_ready; then echo "postgresql: up ($PG_HOST:$PG_PORT)"; else echo "postgresql: down"; fi
    if port_open "$BROKER_PORT"; then echo "kafka: up (127.0.0.1:$BROKER_PORT)"; else echo "kafka: down"; fi
    if port_open "$SASL_SSL_PORT"; then
        echo "kafka SASL_SSL: up (127.0.0.1:$SASL_SSL_PORT, SCRAM-SHA-512, user $SCRAM_USER)"
        echo "kafka SSL: $(port_open "$SSL_PORT" && echo up || echo down) (127.0.0.1:$SSL_PORT, certificate for the address 127.0.0.1 only)"
        echo "kafka CA file: $SECURITY_DIR/ca.pem"
        echo "kafka password file: $SECURITY_DIR/$SCRAM_USER.password"
    else
        echo "kafka SASL_SSL: down"
    fi
}

mkdir -p "$STATE_DIR" "$CACHE_DIR"
case "${1:-up}" in
    up) postgres_up; broker_up fresh; status ;;
    down) broker_down TERM; status ;;
    restart-broker)
        if [ "${2:-}" = --hard ]; then broker_down KILL; else broker_down TERM; fi
        broker_up ;;
    status) status ;;
    *) echo "usage: $0 up|down|status|restart-broker [--hard]" >&2; exit 2 ;;
esac
