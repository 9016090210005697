#!/usr/bin/env bash
# Local Apache Kafka (KRaft, one combined broker+controller) and Apicurio Registry
# (Confluent-compatible API) for featurestream's integration tests, assembled from
# Maven Central with Maven. No Docker, no other downloads.
#
#   scripts/kafka.sh up        download on first use (cached), start both, wait until ready
#   scripts/kafka.sh down      stop both (SIGTERM, then SIGKILL after a bound)
#   scripts/kafka.sh status    exit 0 if everything wanted is up, 1 otherwise
#   scripts/kafka.sh bounce [SECONDS]
#                              stop the broker, keep it down SECONDS [10], start it again on the
#                              same storage and wait until it is ready (an outage, for tests)
#   scripts/kafka.sh env       print the export lines the tests read:
#                                eval "$(scripts/kafka.sh env)"
#   scripts/kafka.sh tool MAIN_CLASS [ARGS...]
#                              run a Kafka CLI class with the broker's classpath, e.g.
#                              tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list
#
# Environment (defaults in brackets):
#   FEATURESTREAM_CACHE    [$HOME/.cache/featurestream]  Maven repo, jars, unpacked registry
#   FEATURESTREAM_RUN_DIR  [/tmp/featurestream-kafka]    logs, KRaft data, pid files (wiped on up)
#   KAFKA_PORT [9092]  KAFKA_CONTROLLER_PORT [9093]
#   REGISTRY_PORT [8081]  REGISTRY_MANAGEMENT_PORT [9081] (registry health/metrics)
#   KAFKA_ONLY [0]           1: no registry (up/status/env ignore it)
#   KAFKA_VERSION [4.1.2]    APICURIO_VERSION [3.3.3]
#   KAFKA_HEAP_OPTS [-Xms128m -Xmx512m]  REGISTRY_HEAP_OPTS [-Xms64m -Xmx384m]
#   KAFKA_START_TIMEOUT [120] seconds   KAFKA_STOP_TIMEOUT [30] seconds
#   FEATURESTREAM_CDS [1]    1: JVM class-data archives, kept in the cache, cut start time; 0: none
#   JAVA_HOME                Kafka's java: $JAVA_HOME/bin/java, else java on PATH (Java 17+)
#   REGISTRY_JAVA            the registry's java; Apicurio 3.3 needs Java 21+, so by default the
#                            Kafka's java if 21+, else the newest /usr/lib/jvm/*/bin/java
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POM="$SCRIPT_DIR/kafka/pom.xml"

CACHE_DIR=${FEATURESTREAM_CACHE:-$HOME/.cache/featurestream}
RUN_DIR=${FEATURESTREAM_RUN_DIR:-/tmp/featurestream-kafka}
RUN_DIR=${RUN_DIR%/}
KAFKA_VERSION=${KAFKA_VERSION:-4.1.2}
APICURIO_VERSION=${APICURIO_VERSION:-3.3.3}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
REGISTRY_PORT=${REGISTRY_PORT:-8081}
REGISTRY_MANAGEMENT_PORT=${REGISTRY_MANAGEMENT_PORT:-9081}
KAFKA_ONLY=${KAFKA_ONLY:-0}
START_TIMEOUT=${KAFKA_START_TIMEOUT:-120}
STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
REGISTRY_HEAP_OPTS=${REGISTRY_HEAP_OPTS:--Xms64m -Xmx384m}
if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then JAVA="$JAVA_HOME/bin/java"; else JAVA=java; fi

KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
REGISTRY_HOME="$CACHE_DIR/apicurio-registry-$APICURIO_VERSION"
CCOMPAT_URL="http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"

say() { printf 'kafka.sh: %s\n' "$*"; }
err() { printf 'kafka.sh: error: %s\n' "$*" >&2; }
registry_wanted() { [[ "$KAFKA_ONLY" != 1 ]]; }

# ---------------------------------------------------------------- processes

# Pids of the live JVMs of one service of this run dir. Every JVM started here carries
# -Dfeaturestream.service=NAME:RUN_DIR, so they are found even when the pid files are gone.
service_pids() { # $1 = kafka | registry
  # pure bash on purpose: a grep over /proc would find its own argument list
  local tag f arg args
  tag=$(service_tag "$1")
  for f in /proc/[0-9]*/cmdline; do
    mapfile -d '' -t args 2>/dev/null <"$f" || continue
    for arg in "${args[@]}"; do
      if [[ "$arg" == "$tag" ]]; then f=${f#/proc/}; echo "${f%/cmdline}"; break; fi
    done
  done
}
service_tag() { printf -- '-Dfeaturestream.service=%s:%s' "$1" "$RUN_DIR"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

kafka_up() { [[ -n "$(service_pids kafka)" ]] && port_open "$KAFKA_PORT"; }

registry_up() {
  [[ -n "$(service_pids registry)" ]] &&
    [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$CCOMPAT_URL/subjects" || true)" == 200 ]]
}

# Start "$@" as a daemon: own session, stdin from /dev/null, output to a log, and no other
# inherited descriptor (a caller's pipe or our lock would otherwise stay open as long as the JVM
# runs). Its pid (the JVM's, via exec) goes to $RUN_DIR/NAME.pid.
start_detached() { # $1 = name, $2 = log file, $3 = working dir, rest = command
  local name=$1 log=$2 dir=$3; shift 3
  (
    cd "$dir" || exit 1
    for fd in "/proc/$BASHPID/fd/"*; do
      fd=${fd##*/}
      if (( fd > 2 )); then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
    # shellcheck disable=SC2016  # expanded by the inner bash
    exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pid" "$@" </dev/null >"$log" 2>&1
  ) &
  for _ in $(seq 50); do [[ -s "$RUN_DIR/$name.pid" ]] && return 0; sleep 0.1; done
  err "$name did not start"; tail_log "$name" "$log"; exit 1
}

stop_all() {
  stop_services registry kafka
  rm -f "$RUN_DIR/kafka.pid" "$RUN_DIR/registry.pid"
  say "stopped"
}

stop_services() { # names: SIGTERM, then SIGKILL after STOP_TIMEOUT
  local pids=() name pid waited=0
  for name in "$@"; do
    for pid in $(service_pids "$name"); do
      say "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    done
  done
  [[ ${#pids[@]} -eq 0 ]] && return 0
  while :; do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [[ ${#alive[@]} -eq 0 ]] && break
    if (( waited >= STOP_TIMEOUT * 10 )); then
      say "still running after ${STOP_TIMEOUT}s, sending SIGKILL to ${alive[*]}"
      kill -KILL "${alive[@]}" 2>/dev/null || true
      for _ in $(seq 50); do
        kill -0 "${alive[@]}" 2>/dev/null || break
        sleep 0.1
      done
      break
    fi
    sleep 0.1; waited=$((waited + 1))
  done
}

# ---------------------------------------------------------------- assembly

mvn_run() { # $1 = log file, rest = goals/args
  local log=$1; shift
  if ! command -v mvn >/dev/null; then err "mvn not found (install Maven)"; exit 1; fi
  if ! mvn -B -f "$POM" -Dmaven.repo.local="$CACHE_DIR/m2" -Dfs.cache="$CACHE_DIR" \
      -Dkafka.version="$KAFKA_VERSION" -Dapicurio.version="$APICURIO_VERSION" "$@" >"$log" 2>&1; then
    err "maven failed; last lines of $log:"
    tail -n 30 "$log" >&2
    exit 1
  fi
}

# Major version of a java binary, from its release file, else by asking it.
java_major() {
  local bin home v=""
  bin=$(command -v "$1" 2>/dev/null) || { echo 0; return; }
  home=$(dirname "$(dirname "$(readlink -f "$bin")")")
  [[ -f "$home/release" ]] && v=$(sed -n 's/^JAVA_VERSION="\([0-9]*\).*/\1/p' "$home/release")
  [[ -n "$v" ]] || v=$("$bin" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
  echo "${v:-0}"
}

# A name for one exact JVM build, so a class-data archive is never reused by another one.
java_id() {
  local bin home v=""
  bin=$(readlink -f "$(command -v "$1")")
  home=$(dirname "$(dirname "$bin")")
  [[ -f "$home/release" ]] && v=$(sed -n 's/^JAVA_RUNTIME_VERSION="\(.*\)"/\1/p' "$home/release")
  [[ -n "$v" ]] || v=$("$bin" -version 2>&1 | head -n 1)
  printf '%s' "$v" | tr -c 'A-Za-z0-9.+-' '_'
}

# JVM options for an application class-data archive (AppCDS), which cuts JVM start time by a
# third or more. It is written when the JVM exits (so after the first `down`) and reused after.
cds_opts() { # $1 = java binary, $2 = archive path without extension
  [[ "${FEATURESTREAM_CDS:-1}" == 1 ]] || return 0
  local jsa; jsa="$2-$(java_id "$1").jsa"
  mkdir -p "$(dirname "$jsa")"
  if (( $(java_major "$1") >= 19 )); then
    echo "-XX:+AutoCreateSharedArchive -XX:SharedArchiveFile=$jsa"
  elif [[ -s "$jsa" ]]; then
    echo "-XX:SharedArchiveFile=$jsa"
  else
    echo "-XX:ArchiveClassesAtExit=$jsa"
  fi
}

# The registry's java: REGISTRY_JAVA, else the first Java 21+ found (Apicurio 3.3 is built for 21).
find_registry_java() {
  if [[ -n "${REGISTRY_JAVA:-}" ]]; then
    (( $(java_major "$REGISTRY_JAVA") >= 21 )) || return 1
    echo "$REGISTRY_JAVA"; return
  fi
  if (( $(java_major "$JAVA") >= 21 )); then echo "$JAVA"; return; fi
  local j m best="" best_m=0
  for j in /usr/lib/jvm/*/bin/java; do
    [[ -x "$j" ]] || continue
    m=$(java_major "$j")
    if (( m >= 21 && m > best_m )); then best=$j; best_m=$m; fi
  done
  [[ -n "$best" ]] && echo "$best"
}

registry_jar() { find "$REGISTRY_HOME" -maxdepth 3 -name quarkus-run.jar -print -quit 2>/dev/null; }

ensure_kafka() {
  if [[ -f "$KAFKA_HOME/.complete" ]]; then
    say "kafka $KAFKA_VERSION jars cached in $KAFKA_LIBS"
    return
  fi
  say "downloading kafka $KAFKA_VERSION and its runtime jars with Maven (first run only)..."
  rm -rf "$KAFKA_LIBS"
  mvn_run "$RUN_DIR/mvn-kafka.log" dependency:copy-dependencies@kafka-libs
  [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] || { err "kafka_2.13 jar missing in $KAFKA_LIBS"; exit 1; }
  touch "$KAFKA_HOME/.complete"
  say "kafka jars ready: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars, $(du -sh "$KAFKA_LIBS" | cut -f1)"
}

ensure_registry() {
  if [[ -f "$REGISTRY_HOME/.complete" && -n "$(registry_jar)" ]]; then
    say "apicurio registry $APICURIO_VERSION cached in $REGISTRY_HOME"
    return
  fi
  say "downloading apicurio registry $APICURIO_VERSION with Maven (first run only, ~180 MB)..."
  rm -rf "$REGISTRY_HOME"
  mvn_run "$RUN_DIR/mvn-registry.log" dependency:unpack@apicurio-registry
  [[ -n "$(registry_jar)" ]] || { err "quarkus-run.jar not found under $REGISTRY_HOME"; exit 1; }
  touch "$REGISTRY_HOME/.complete"
  say "apicurio registry ready: $(du -sh "$REGISTRY_HOME" | cut -f1)"
}

# ---------------------------------------------------------------- configuration

write_kafka_config() {
  local data="$RUN_DIR/kraft-data"
  mkdir -p "$data" "$RUN_DIR/logs"
  cat >"$RUN_DIR/server.properties" <<EOF
# one combined broker+controller on loopback, written by scripts/kafka.sh
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
# tests create their topics through the admin API; a missing input topic is an error
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# small footprint: the dedupe buffer is heap (default 128 MiB)
log.cleaner.dedupe.buffer.size=8388608
log.cleaner.threads=1
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
EOF
  cat >"$RUN_DIR/log4j2.properties" <<'EOF'
# broker logging, written by scripts/kafka.sh
name = featurestream-kafka
status = warn
# Kafka logs its own shutdown from a JVM shutdown hook: keep log4j alive until the very end
shutdownHook = disable
appender.server.type = File
appender.server.name = server
appender.server.fileName = ${sys:kafka.logs.dir}/server.log
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = server
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
  write_tools_log_config
}

write_tools_log_config() {
  mkdir -p "$RUN_DIR"
  cat >"$RUN_DIR/tools-log4j2.properties" <<'EOF'
# CLI tools: warnings and errors to stderr, written by scripts/kafka.sh
name = featurestream-kafka-tools
status = warn
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = stderr
EOF
}

# A KRaft cluster id as `kafka.tools.StorageTool random-uuid` prints it (a random UUID in
# unpadded URL-safe base64, never starting with '-'), without paying ~2 s for a JVM.
new_cluster_id() {
  local hex id
  while :; do
    hex=$(tr -d '-' </proc/sys/kernel/random/uuid)
    # shellcheck disable=SC2059,SC2001
    id=$(printf "$(sed 's/../\\x&/g' <<<"$hex")" | base64 | tr '+/' '-_' | tr -d '=')
    [[ ${#id} -eq 22 && "$id" != -* ]] && { echo "$id"; return; }
  done
}

tool_java() { # run a main class on the kafka classpath with the quiet log config
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$RUN_DIR/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$@"
}

# ---------------------------------------------------------------- waiting

tail_log() { # $1 = label, $2 = file
  printf -- '---- last lines of %s (%s) ----\n' "$1" "$2" >&2
  tail -n 40 "$2" >&2 2>/dev/null || echo "(no log)" >&2
  printf -- '----\n' >&2
}

wait_ready() {
  local deadline=$((SECONDS + START_TIMEOUT)) k_ok=0 r_ok=1
  registry_wanted && r_ok=0
  while :; do
    if (( !k_ok )); then
      if [[ -z "$(service_pids kafka)" ]]; then
        err "kafka exited during start"; tail_log kafka "$RUN_DIR/logs/server.log"; tail_log "kafka stdout" "$RUN_DIR/kafka.out"
        stop_all >/dev/null; exit 1
      fi
      if grep -q 'Kafka Server started' "$RUN_DIR/logs/server.log" 2>/dev/null && port_open "$KAFKA_PORT"; then
        k_ok=1; say "kafka is up on 127.0.0.1:$KAFKA_PORT ($((SECONDS - T0))s)"
      fi
    fi
    if (( !r_ok )); then
      if [[ -z "$(service_pids registry)" ]]; then
        err "registry exited during start"; tail_log registry "$RUN_DIR/registry.log"
        stop_all >/dev/null; exit 1
      fi
      if registry_up; then
        r_ok=1; say "registry is up on $CCOMPAT_URL ($((SECONDS - T0))s)"
      fi
    fi
    (( k_ok && r_ok )) && return 0
    if (( SECONDS >= deadline )); then
      err "not ready after ${START_TIMEOUT}s"
      (( k_ok )) || { tail_log kafka "$RUN_DIR/logs/server.log"; tail_log "kafka stdout" "$RUN_DIR/kafka.out"; }
      (( r_ok )) || tail_log registry "$RUN_DIR/registry.log"
      stop_all >/dev/null; exit 1
    fi
    sleep 0.5
  done
}

# ---------------------------------------------------------------- commands

lock() {
  mkdir -p "$(dirname "$RUN_DIR")"
  exec 9>"$RUN_DIR.lock"
  flock -w 300 9 || { err "another kafka.sh holds $RUN_DIR.lock"; exit 1; }
}

cmd_up() {
  T0=$SECONDS
  lock
  if kafka_up && { ! registry_wanted || registry_up; }; then
    say "already up (kafka 127.0.0.1:$KAFKA_PORT$(registry_wanted && echo ", registry $CCOMPAT_URL"))"
    return 0
  fi
  if [[ -n "$(service_pids kafka)$(service_pids registry)" ]]; then
    say "partly up: restarting from scratch"
    stop_all
  fi
  local port
  for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" $(registry_wanted && echo "$REGISTRY_PORT $REGISTRY_MANAGEMENT_PORT"); do
    if port_open "$port"; then err "port $port on 127.0.0.1 is already in use by another process"; exit 1; fi
  done
  if (( $(java_major "$JAVA") < 17 )); then err "kafka needs Java 17+ ($JAVA is not; set JAVA_HOME)"; exit 1; fi
  local registry_java=""
  if registry_wanted; then
    registry_java=$(find_registry_java) || {
      if [[ -n "${REGISTRY_JAVA:-}" ]]; then
        err "apicurio registry $APICURIO_VERSION needs Java 21+; REGISTRY_JAVA=$REGISTRY_JAVA is not"
      else
        err "apicurio registry $APICURIO_VERSION needs Java 21+ and none was found; set REGISTRY_JAVA=/path/to/bin/java (or KAFKA_ONLY=1)"
      fi
      exit 1
    }
  fi

  # wipe the run dir, but only one this script made (FEATURESTREAM_RUN_DIR could point anywhere)
  if [[ -d "$RUN_DIR" && -n "$(ls -A "$RUN_DIR")" && ! -f "$RUN_DIR/.featurestream-kafka" ]] &&
     ! grep -qs 'written by scripts/kafka.sh' "$RUN_DIR/server.properties"; then
    err "$RUN_DIR is not empty and was not made by kafka.sh; refusing to wipe it (set FEATURESTREAM_RUN_DIR)"
    exit 1
  fi
  rm -rf "$RUN_DIR"
  mkdir -p "$RUN_DIR" "$CACHE_DIR"
  touch "$RUN_DIR/.featurestream-kafka"
  ensure_kafka
  registry_wanted && ensure_registry

  # The registry needs nothing from Kafka and is the slower of the two: start it first, so it
  # boots while the KRaft storage is formatted.
  if registry_wanted; then
    local jar; jar=$(registry_jar)
    mkdir -p "$RUN_DIR/registry"
    say "starting apicurio registry $APICURIO_VERSION on java $(java_major "$registry_java") (log: $RUN_DIR/registry.log)"
    # shellcheck disable=SC2086,SC2046  # option lists are word lists
    start_detached registry "$RUN_DIR/registry.log" "$RUN_DIR/registry" \
      "$registry_java" $REGISTRY_HEAP_OPTS -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
      $(cds_opts "$registry_java" "$REGISTRY_HOME/cds/registry") \
      "$(service_tag registry)" \
      -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
      -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$REGISTRY_MANAGEMENT_PORT" \
      -jar "$jar"
  fi

  write_kafka_config
  local cluster_id
  cluster_id=$(new_cluster_id)
  say "formatting KRaft storage (cluster id $cluster_id)"
  # shellcheck disable=SC2046
  if ! tool_java $(cds_opts "$JAVA" "$KAFKA_HOME/cds/storage-tool") \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$RUN_DIR/server.properties" \
      >"$RUN_DIR/format.log" 2>&1; then
    err "storage format failed"; tail_log format "$RUN_DIR/format.log"; stop_all >/dev/null; exit 1
  fi

  start_kafka
  say "waiting for readiness (timeout ${START_TIMEOUT}s)..."
  wait_ready
  say "up in $((SECONDS - T0))s; for tests: eval \"\$(scripts/kafka.sh env)\""
}

start_kafka() {
  say "starting kafka $KAFKA_VERSION (log: $RUN_DIR/logs/server.log)"
  # shellcheck disable=SC2086,SC2046
  start_detached kafka "$RUN_DIR/kafka.out" "$RUN_DIR" \
    "$JAVA" $KAFKA_HEAP_OPTS -XX:+UseSerialGC -Djava.awt.headless=true \
    $(cds_opts "$JAVA" "$KAFKA_HOME/cds/kafka") \
    "$(service_tag kafka)" \
    -Dkafka.logs.dir="$RUN_DIR/logs" -Dlog4j2.configurationFile="$RUN_DIR/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$RUN_DIR/server.properties"
}

cmd_bounce() {
  local pause=${1:-10} starts deadline
  [[ "$pause" =~ ^[0-9]+$ ]] || { err "usage: kafka.sh bounce [SECONDS]"; exit 2; }
  T0=$SECONDS
  lock
  kafka_up || { err "kafka is not running: nothing to bounce"; exit 1; }
  starts=$(grep -c 'Kafka Server started' "$RUN_DIR/logs/server.log" 2>/dev/null || true)
  say "stopping kafka for ${pause}s (its storage is kept)"
  stop_services kafka
  rm -f "$RUN_DIR/kafka.pid"
  sleep "$pause"
  start_kafka
  deadline=$((SECONDS + START_TIMEOUT))
  until (( $(grep -c 'Kafka Server started' "$RUN_DIR/logs/server.log" 2>/dev/null || true) > starts )) &&
      port_open "$KAFKA_PORT"; do
    if [[ -z "$(service_pids kafka)" ]]; then
      err "kafka exited during restart"; tail_log kafka "$RUN_DIR/logs/server.log"; exit 1
    fi
    (( SECONDS < deadline )) || { err "kafka not ready ${START_TIMEOUT}s after restart"; exit 1; }
    sleep 0.2
  done
  say "kafka is back on 127.0.0.1:$KAFKA_PORT after $((SECONDS - T0))s"
}

cmd_down() {
  lock
  if [[ -z "$(service_pids kafka)$(service_pids registry)" ]]; then
    say "nothing running"
    rm -f "$RUN_DIR/kafka.pid" "$RUN_DIR/registry.pid"
    return 0
  fi
  stop_all
}

cmd_status() {
  local rc=0 pid
  if kafka_up; then
    pid=$(service_pids kafka | head -n 1)
    say "kafka: up (pid $pid, 127.0.0.1:$KAFKA_PORT)"
  else
    say "kafka: down"; rc=1
  fi
  if registry_wanted; then
    if registry_up; then
      pid=$(service_pids registry | head -n 1)
      say "registry: up (pid $pid, $CCOMPAT_URL)"
    else
      say "registry: down"; rc=1
    fi
  else
    say "registry: skipped (KAFKA_ONLY=1)"
  fi
  return $rc
}

cmd_env() {
  echo "export FEATURESTREAM_KAFKA=127.0.0.1:$KAFKA_PORT"
  if registry_wanted; then
    echo "export FEATURESTREAM_SCHEMA_REGISTRY=$CCOMPAT_URL"
  fi
}

cmd_tool() {
  [[ $# -ge 1 ]] || { err "usage: kafka.sh tool MAIN_CLASS [ARGS...]"; exit 2; }
  [[ -f "$KAFKA_HOME/.complete" ]] || { err "kafka jars not cached yet: run 'scripts/kafka.sh up' first"; exit 1; }
  [[ -f "$RUN_DIR/tools-log4j2.properties" ]] || write_tools_log_config
  tool_java "$@"
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  bounce) shift; cmd_bounce "$@" ;;
  env) cmd_env ;;
  tool) shift; cmd_tool "$@" ;;
  -h|--help|help) usage ;;
  *) usage >&2; exit 2 ;;
esac
