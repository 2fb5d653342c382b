#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x (KRaft, combined broker+controller) for development, tests, CI
# and the demo. Jars come from Maven Central through the machine's Maven, cached outside the repo.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/kafka/broker.sh start|stop|status [--port N] [--data-dir DIR] [--version V]

  start    provision (first time), format KRaft storage, start the broker, wait for the port,
           print "bootstrap=HOST:PORT". Idempotent: on a running broker prints the same line.
  stop     stop the broker this script started (pid file); leaves no process behind.
  status   "running bootstrap=HOST:PORT" or "stopped bootstrap=HOST:PORT" (exit 0 / 3).

Options (each also an environment variable):
  --port N        SD_KAFKA_PORT        client port (default 19092; controller uses port+1)
  --host H        SD_KAFKA_HOST        advertised host (default 127.0.0.1)
  --data-dir DIR  SD_KAFKA_DATA_DIR    log dirs, pid file, logs (default ~/.cache/stream-detector/kafka-data-PORT)
  --version V     SD_KAFKA_VERSION     Apache Kafka version (default 4.1.1)
  --cache-dir DIR SD_KAFKA_CACHE       jar cache (default ~/.cache/stream-detector/kafka-VERSION)
  --start-timeout SD_KAFKA_START_TIMEOUT seconds to wait for the port (default 90)
Topic auto-creation is off in the generated config; create topics explicitly.
USAGE
}

die() { echo "broker.sh: $*" >&2; exit 1; }

cmd=${1:-}
[ -n "$cmd" ] || { usage >&2; exit 2; }
shift || true
PORT=${SD_KAFKA_PORT:-19092}
HOST=${SD_KAFKA_HOST:-127.0.0.1}
VERSION=${SD_KAFKA_VERSION:-4.1.1}
DATA_DIR=${SD_KAFKA_DATA_DIR:-}
CACHE=${SD_KAFKA_CACHE:-}
START_TIMEOUT=${SD_KAFKA_START_TIMEOUT:-90}
LOG4J_VERSION=2.24.3
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --data-dir) DATA_DIR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --cache-dir) CACHE=$2; shift 2 ;;
    --start-timeout) START_TIMEOUT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'." ;;
  esac
done
case "$cmd" in -h|--help|help) usage; exit 0 ;; esac
[[ "$PORT" =~ ^[0-9]+$ ]] || die "port '$PORT' is not a number."
CONTROLLER_PORT=$((PORT + 1))
BASE=${XDG_CACHE_HOME:-$HOME/.cache}/stream-detector
DATA_DIR=${DATA_DIR:-$BASE/kafka-data-$PORT}
CACHE=${CACHE:-$BASE/kafka-$VERSION}
PIDFILE=$DATA_DIR/broker.pid
LOG=$DATA_DIR/server.log
BOOT="bootstrap=$HOST:$PORT"

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
  local pom; pom=$(mktemp -d)
  cat > "$pom/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.stream-detector</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <!-- Kafka logs through SLF4J 2; pin it so Maven's nearest-wins does not pick a 1.7 API without a binding -->
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

write_config() {
  mkdir -p "$DATA_DIR/logs"
  cat > "$DATA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
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
  if pid=$(our_pid); then echo "$BOOT"; return 0; fi
  check_java
  if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
    die "port $PORT or $CONTROLLER_PORT on $HOST is already in use by another process; choose another with --port."
  fi
  provision
  write_config
  local cp="$CACHE/libs/*"
  local java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true
                   -Dlog4j2.configurationFile="$DATA_DIR/log4j2.properties")
  if [ ! -f "$DATA_DIR/logs/meta.properties" ]; then
    if ! java "${java_opts[@]}" -cp "$cp" kafka.tools.StorageTool format --standalone \
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
}

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
  status) if our_pid >/dev/null; then echo "running $BOOT"; else echo "stopped $BOOT"; exit 3; fi ;;
  *) usage >&2; exit 2 ;;
esac
