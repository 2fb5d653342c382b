#!/usr/bin/env bash
# Every KAFKA_* variable (except the JVM ones) becomes a server property, as in the official image:
# KAFKA_LOG_DIRS=/x -> log.dirs=/x. Formats the KRaft storage on first start, then runs the broker in the
# foreground so that the container's stop signal reaches it.
set -euo pipefail
conf=/opt/kafka/config/server.properties
: > "$conf"
while IFS='=' read -r name value; do
  case "$name" in
    KAFKA_HEAP_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_OPTS|KAFKA_LOG4J_OPTS) continue ;;
    KAFKA_*) key="${name#KAFKA_}"; key="${key,,}"; echo "${key//_/.}=$value" >> "$conf" ;;
  esac
done < <(env)
cat > /opt/kafka/config/log4j2.properties <<'L4J'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = WARN
L4J
read -r -a heap <<< "${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"
java_opts=("${heap[@]}" -Djava.awt.headless=true -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties)
logs=$(sed -n 's/^log\.dirs=//p' "$conf")
if [[ ! -f "${logs:-/var/lib/kafka/data}/meta.properties" ]]; then
  id="${CLUSTER_ID:-$(java -cp '/opt/kafka/libs/*' kafka.tools.StorageTool random-uuid | tail -1)}"
  java "${java_opts[@]}" -cp '/opt/kafka/libs/*' kafka.tools.StorageTool format -t "$id" -c "$conf"
fi
exec java "${java_opts[@]}" -cp '/opt/kafka/libs/*' kafka.Kafka "$conf"
