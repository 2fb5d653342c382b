#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x (KRaft, combined broker+controller) for development, tests, CI
# and the demo. Jars come from Maven Central through the machine's Maven, cached outside the repo.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/kafka/broker.sh start|stop|status|provision [--port N] [--data-dir DIR] [--version V] [--security MODE]

  start    provision (first time), format KRaft storage, start the broker, wait for the port,
           print "bootstrap=HOST:PORT". Idempotent: on a running broker prints the same line.
  stop     stop the broker this script started (pid file); leaves no process behind.
  status   "running bootstrap=HOST:PORT" or "stopped bootstrap=HOST:PORT" (exit 0 / 3).
  provision  only fetch the jars (once) and print "libs=DIR" (deploy/docker/compose-local.sh's image
           uses it with --with-tools and its own --cache-dir).

Options (each also an environment variable):
  --port N        SD_KAFKA_PORT        client port (default 19092, 19192 with --security sasl_ssl;
                                       controller uses port+1)
  --host H        SD_KAFKA_HOST        advertised host (default 127.0.0.1)
  --data-dir DIR  SD_KAFKA_DATA_DIR    log dirs, pid file, logs (default ~/.cache/stream-detector/kafka-data-PORT)
  --version V     SD_KAFKA_VERSION     Apache Kafka version (default 4.1.1)
  --cache-dir DIR SD_KAFKA_CACHE       jar cache (default ~/.cache/stream-detector/kafka-VERSION)
  --with-tools    SD_KAFKA_TOOLS=1     also fetch kafka-tools (kafka-topics.sh and friends)
  --start-timeout SD_KAFKA_START_TIMEOUT seconds to wait for the port (default 90)
  --security MODE SD_KAFKA_SECURITY    plaintext (default) or sasl_ssl
  --flush-interval-ms N SD_KAFKA_FLUSH_INTERVAL_MS  write each partition's new data to disk (fsync)
                                       at least this often (default 1000; 0 = Kafka's default,
                                       which leaves it to the OS until a segment rolls)
  --cleaner-io-bytes-per-s N SD_KAFKA_CLEANER_IO_BYTES_PER_S  cap the log cleaner's read+write rate
                                       (compaction of the state changelog; default 8388608 = 8 MiB/s;
                                       0 = no cap, Kafka's default)
JVM (Kafka's own variables): KAFKA_HEAP_OPTS (default "-Xms2g -Xmx2g") and
KAFKA_JVM_PERFORMANCE_OPTS (default "-XX:+UseG1GC -XX:MaxGCPauseMillis=20"); the GC log is
DATA_DIR/gc.log.
Topic auto-creation is off in the generated config; create topics explicitly.

--security sasl_ssl starts a separate broker (own port and data dir, so it never disturbs the
PLAINTEXT one) whose client listener is SASL_SSL with PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512:
  - a self-signed CA and a server certificate for the host are generated once into DATA_DIR/tls
    (openssl); clients trust DATA_DIR/tls/ca.pem;
  - one client user, SD_KAFKA_SASL_USER (default "detector"), with password SD_KAFKA_SASL_PASSWORD
    (default: generated once), created for PLAIN and, at storage format, for both SCRAM mechanisms;
  - "start" also prints "client_config=DATA_DIR/client.properties": librdkafka settings
    (security.protocol, ssl.ca.location, sasl.username, sasl.password; mode 0600) for clients.
For development and tests only: the controller listener stays PLAINTEXT on the loopback.
USAGE
}

die() { echo "broker.sh: $*" >&2; exit 1; }

cmd=${1:-}
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift || true
PORT=${SD_KAFKA_PORT:-}
SECURITY=${SD_KAFKA_SECURITY:-plaintext}
HOST=${SD_KAFKA_HOST:-127.0.0.1}
VERSION=${SD_KAFKA_VERSION:-4.1.1}
DATA_DIR=${SD_KAFKA_DATA_DIR:-}
CACHE=${SD_KAFKA_CACHE:-}
START_TIMEOUT=${SD_KAFKA_START_TIMEOUT:-90}
FLUSH_INTERVAL_MS=${SD_KAFKA_FLUSH_INTERVAL_MS:-1000}
CLEANER_IO=${SD_KAFKA_CLEANER_IO_BYTES_PER_S:-8388608}
TOOLS=${SD_KAFKA_TOOLS:-0}
LOG4J_VERSION=2.24.3
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --cache-dir) CACHE=$2; shift 2 ;;
    --with-tools) TOOLS=1; shift ;;
    --start-timeout) START_TIMEOUT=$2; shift 2 ;;
    --security) SECURITY=$2; shift 2 ;;
    --flush-interval-ms) FLUSH_INTERVAL_MS=$2; shift 2 ;;
    --cleaner-io-bytes-per-s) CLEANER_IO=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'." ;;
  esac
done
case "$cmd" in -h|--help|help) usage; exit 0 ;; esac
case "$SECURITY" in
  plaintext) PORT=${PORT:-19092} ;;
  sasl_ssl) PORT=${PORT:-19192} ;;
  *) die "unknown security mode '$SECURITY'; use plaintext or sasl_ssl." ;;
esac
[[ "$PORT" =~ ^[0-9]+$ ]] || die "port '$PORT' is not a number."
[[ "$FLUSH_INTERVAL_MS" =~ ^[0-9]+$ ]] || die "flush interval '$FLUSH_INTERVAL_MS' is not a whole number of milliseconds."
[[ "$CLEANER_IO" =~ ^[0-9]+$ ]] || die "cleaner I/O cap '$CLEANER_IO' is not a whole number of bytes per second."
CONTROLLER_PORT=$((PORT + 1))
BASE=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector
DATA_DIR=${DATA_DIR:-$BASE/kafka-data-$PORT}
CACHE=${CACHE:-$BASE/kafka-$VERSION}
PIDFILE=$DATA_DIR/broker.pid
LOG=$DATA_DIR/server.log
BOOT="bootstrap=$HOST:$PORT"
TLS_DIR=$DATA_DIR/tls
SASL_USER=${SD_KAFKA_SASL_USER:-detector}
[[ "$SASL_USER" =~ ^[A-Za-z0-9._-]+$ ]] || die "SASL user '$SASL_USER' may use only letters, digits, '.', '_' and '-'."

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
our_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid; pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && grep -q "kafka.Kafka" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

check_java() {
  command -v java >/dev/null || die "no Java found on PATH; install a JDK 17 or newer."
  local v; v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [ -n "$v" ] && [ "$v" -ge 17 ] || die "Java ${v:-unknown} found, but Apache Kafka $VERSION needs Java 17 or newer."
}

provision() {
  [ -f "$CACHE/.complete" ] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is not installed; it is needed once to fetch the Kafka jars."
  mkdir -p "$CACHE"
  local pom tools=""; pom=$(mktemp -d)
  [ "$TOOLS" = 1 ] && tools="    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$VERSION</version></dependency>"
  cat > "$pom/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream-detector</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
$tools    <!-- Kafka logs through SLF4J 2; pin it so Maven's nearest-wins does not pick a 1.7 API without a binding -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  echo "broker.sh: fetching Apache Kafka $VERSION jars from Maven Central into $CACHE (once)..." >&2
  if ! mvn -q -B -f "$pom/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$CACHE/libs" > "$pom/mvn.log" 2>&1; then
    tail -n 15 "$pom/mvn.log" >&2
    rm -rf "$pom"
    die "could not fetch Apache Kafka $VERSION from Maven Central (is the repository reachable and the version right?)."
  fi
  rm -rf "$pom"
  touch "$CACHE/.complete"
}

listener_config() {
  if [ "$SECURITY" = plaintext ]; then
    cat <<LISTEN
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
LISTEN
    return
  fi
  local admin_pw user_pw
  admin_pw=$(cat "$TLS_DIR/admin.password"); user_pw=$(cat "$TLS_DIR/user.password")
  cat <<LISTEN
listeners=SASL_SSL://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=SASL_SSL://$HOST:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$admin_pw" user_admin="$admin_pw" user_$SASL_USER="$user_pw";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/server.p12
ssl.keystore.password=$(cat "$TLS_DIR/keystore.password")
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
ssl.client.auth=none
ssl.endpoint.identification.algorithm=https
LISTEN
}

# SASL_SSL mode: CA + server certificate (SAN = the advertised host) and the passwords, made once.
make_security() {
  [ "$SECURITY" = sasl_ssl ] || return 0
  command -v openssl >/dev/null || die "openssl is needed to generate the broker's TLS certificates."
  mkdir -p "$TLS_DIR"; chmod 700 "$TLS_DIR"
  local pw
  for f in admin keystore; do
    [ -s "$TLS_DIR/$f.password" ] || (umask 077; openssl rand -hex 16 > "$TLS_DIR/$f.password")
  done
  if [ -s "$TLS_DIR/user.password" ]; then
    if [ -n "${SD_KAFKA_SASL_PASSWORD:-}" ] && [ "$SD_KAFKA_SASL_PASSWORD" != "$(cat "$TLS_DIR/user.password")" ]; then
      die "the broker in $DATA_DIR was set up with another SD_KAFKA_SASL_PASSWORD; use that one or remove $DATA_DIR."
    fi
    [ "$(cat "$TLS_DIR/user.name")" = "$SASL_USER" ] ||
      die "the broker in $DATA_DIR was set up for SASL user '$(cat "$TLS_DIR/user.name")', not '$SASL_USER'; remove $DATA_DIR to change it."
  else
    (umask 077; printf '%s' "${SD_KAFKA_SASL_PASSWORD:-$(openssl rand -hex 12)}" > "$TLS_DIR/user.password")
    printf '%s' "$SASL_USER" > "$TLS_DIR/user.name"
  fi
  if [ ! -s "$TLS_DIR/server.p12" ]; then
    local san="DNS:localhost"
    if [[ "$HOST" =~ ^[0-9.]+$ ]]; then san="IP:$HOST,$san"; else san="DNS:$HOST,$san"; fi
    if ! {
      openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=stream-detector dev CA" \
        -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" &&
      openssl req -newkey rsa:2048 -nodes -subj "/CN=$HOST" -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" &&
      printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$TLS_DIR/server.ext" &&
      openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" -CAcreateserial \
        -days 825 -extfile "$TLS_DIR/server.ext" -out "$TLS_DIR/server.pem" &&
      openssl pkcs12 -export -in "$TLS_DIR/server.pem" -inkey "$TLS_DIR/server.key" -certfile "$TLS_DIR/ca.pem" \
        -name broker -out "$TLS_DIR/server.p12" -passout "file:$TLS_DIR/keystore.password"
    } > "$TLS_DIR/openssl.log" 2>&1; then
      tail -n 5 "$TLS_DIR/openssl.log" >&2
      rm -f "$TLS_DIR/server.p12"
      die "generating the broker's TLS certificates in $TLS_DIR failed."
    fi
    chmod 600 "$TLS_DIR"/*.key "$TLS_DIR/server.p12"
  fi
  pw=$(cat "$TLS_DIR/user.password")
  (umask 077; cat > "$DATA_DIR/client.properties" <<CLIENT
bootstrap.servers=$HOST:$PORT
security.protocol=SASL_SSL
ssl.ca.location=$TLS_DIR/ca.pem
sasl.mechanism=SCRAM-SHA-256
sasl.username=$SASL_USER
sasl.password=$pw
CLIENT
  )
}

# StorageTool arguments that create the SCRAM credentials in the metadata at format time.
scram_args() {
  [ "$SECURITY" = sasl_ssl ] || return 0
  local pw; pw=$(cat "$TLS_DIR/user.password")
  for mech in SCRAM-SHA-256 SCRAM-SHA-512; do
    printf '%s\n' --add-scram "$mech=[name=$SASL_USER,password=$pw]"
    printf '%s\n' --add-scram "$mech=[name=admin,password=$(cat "$TLS_DIR/admin.password")]"
  done
}

# Kafka by default fsyncs a partition only when its segment rolls: at tens of MB/s a 256 MB segment
# per partition, all partitions of an evenly loaded topic within a few ms of each other. On one
# disk that is a gigabyte written at once, and the topic's appends stall for 1-2 s
# (docs/performance.md, "Phase 5"). Flushing every second keeps each fsync small.
flush_config() {
  [ "$FLUSH_INTERVAL_MS" -gt 0 ] || return 0
  printf 'log.flush.scheduler.interval.ms=%s\nlog.flush.interval.ms=%s\n' "$FLUSH_INTERVAL_MS" "$FLUSH_INTERVAL_MS"
}

# The log cleaner compacts the state changelog in bursts: when a partition's segment rolls it
# rewrites the whole dirty part at once, on the cores the clients share. Uncapped, that was ~6 s
# of 120-290 ms medians on 2 cores; at 8 MiB/s the same work takes about a minute and the
# latency probe's p99 went from 109-112 to 85-91 ms (docs/performance.md, "After phase 6").
cleaner_config() {
  [ "$CLEANER_IO" -gt 0 ] || return 0
  echo "log.cleaner.io.max.bytes.per.second=$CLEANER_IO"
}

write_config() {
  mkdir -p "$DATA_DIR/logs"
  cat > "$DATA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
$(listener_config)
log.dirs=$DATA_DIR/logs
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
group.initial.rebalance.delay.ms=0
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
log.retention.hours=24
log.segment.bytes=268435456
$(flush_config)
$(cleaner_config)
message.max.bytes=10485760
PROPS
  cat > "$DATA_DIR/log4j2.properties" <<L4J
status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOG
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
L4J
}

start() {
  if pid=$(our_pid); then echo "$BOOT"; client_line; return 0; fi
  check_java
  if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
    die "port $PORT or $CONTROLLER_PORT on $HOST is already in use by another process; choose another with --port."
  fi
  provision
  mkdir -p "$DATA_DIR"
  make_security
  write_config
  local cp="$CACHE/libs/*"
  # JVM settings through Kafka's own variables. The defaults: with -Xmx1g and G1's defaults this
  # broker's old generation (~300 MB live) sat above G1's marking threshold, so under load it ran
  # a concurrent cycle every ~11 s (pauses of 12-34 ms plus marking threads on the clients' cores),
  # and those were the slowest seconds of the latency probe (docs/performance.md, "Phase 6"). A
  # fixed 2 GB heap keeps it far below the threshold; the 20 ms pause goal is Kafka's own default.
  # GC log as Kafka's own scripts keep one: a broker pause shows up as latency in every client.
  local heap perf
  read -r -a heap <<< "${KAFKA_HEAP_OPTS:--Xms2g -Xmx2g}"
  read -r -a perf <<< "${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20}"
  local java_opts=("${heap[@]}" "${perf[@]}" -Djava.awt.headless=true
                   "-Xlog:gc*:file=$DATA_DIR/gc.log:time,uptime,level,tags:filecount=4,filesize=20M"
                   -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties")
  if [ ! -f "$DATA_DIR/logs/meta.properties" ]; then
    local extra=()
    mapfile -t extra < <(scram_args)
    if ! java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone "${extra[@]}" \
          -t "$(java -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)" \
          -c "$DATA_DIR/server.properties" > "$DATA_DIR/format.log" 2>&1; then
      tail -n 10 "$DATA_DIR/format.log" >&2
      die "formatting KRaft storage in $DATA_DIR/logs failed."
    fi
  fi
  : > "$LOG"
  nohup java "${java_opts[@]}" -cp "$cp" kafka.Kafka "$DATA_DIR/server.properties" \
    > "$DATA_DIR/stdout.log" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  local pid=$! waited=0
  while ! port_open "$PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$DATA_DIR/stdout.log" "$LOG" >&2 2>/dev/null || true
      rm -f "$PIDFILE"
      die "the broker exited during start-up (log above, full log in $DATA_DIR)."
    fi
    [ "$waited" -ge $((START_TIMEOUT * 4)) ] && { kill "$pid" 2>/dev/null || true; rm -f "$PIDFILE"
      die "the broker did not open port $PORT within ${START_TIMEOUT}s (log: $LOG)."; }
    sleep 0.25; waited=$((waited + 1))
  done
  echo "$BOOT"
  client_line
}

client_line() { [ "$SECURITY" = plaintext ] || echo "client_config=$DATA_DIR/client.properties"; }

stop() {
  local pid
  if ! pid=$(our_pid); then rm -f "$PIDFILE"; echo "stopped $BOOT"; return 0; fi
  kill "$pid"
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "stopped $BOOT"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  provision) provision; echo "libs=$CACHE/libs" ;;
  status) if our_pid >/dev/null; then echo "running $BOOT"; else echo "stopped $BOOT"; exit 3; fi ;;
  *) usage >&2; exit 2 ;;
esac
