#!/usr/bin/env bash
# A real 3-node RabbitMQ cluster on this machine, for the cluster fault test and for trying
# kiwimq's failover by hand. Private nodes with their own names, ports and directories: the
# shared broker on 5672 is never touched.
#
#   scripts/cluster.sh start    # nodes kiwimq-cluster-{1,2,3}@localhost on AMQP ports
#                               # 5681-5683, clustered; prints their URIs
#   scripts/cluster.sh status   # the cluster as node 1 sees it
#   scripts/cluster.sh stop     # stops the nodes and deletes their directories
#   scripts/cluster.sh uris     # the three URIs, comma-separated
#
# KIWIMQ_CLUSTER_PORT sets the first AMQP port (default 5681), KIWIMQ_CLUSTER_DIR the
# directory (default /tmp/kiwimq-cluster). Needs root: the nodes run as the rabbitmq user,
# as the distribution's package sets up, and so share its Erlang cookie.
set -euo pipefail

base_port=${KIWIMQ_CLUSTER_PORT:-5681}
root=${KIWIMQ_CLUSTER_DIR:-/tmp/kiwimq-cluster}
nodes=(1 2 3)

name() { echo "kiwimq-cluster-$1@localhost"; }
port() { echo $((base_port + $1 - 1)); }
ctl() { local n=$1; shift; rabbitmqctl -q -n "$(name "$n")" "$@"; }
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$(port "$1")") 2>/dev/null; }
uris() {
  local list=()
  for n in "${nodes[@]}"; do list+=("amqp://guest:guest@127.0.0.1:$(port "$n")/%2f"); done
  (IFS=,; echo "${list[*]}")
}

start_node() {
  local n=$1 dir="$root/node$1"
  mkdir -p "$dir/mnesia" "$dir/log"
  echo "[]." > "$dir/enabled_plugins"
  cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$(port "$n")
loopback_users = none
EOF
  echo "[]." > "$dir/advanced.config"
  chown -R rabbitmq:rabbitmq "$dir"
  RABBITMQ_NODENAME="$(name "$n")" \
  RABBITMQ_NODE_PORT="$(port "$n")" \
  RABBITMQ_DIST_PORT="$((base_port + 20000 + n))" \
  RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
  RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
  RABBITMQ_MNESIA_BASE="$dir/mnesia" \
  RABBITMQ_LOG_BASE="$dir/log" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    rabbitmq-server > "$dir/server.out" 2>&1 &
}

wait_for() {
  local n=$1
  for _ in $(seq 1 120); do answers "$n" && return 0; sleep 0.5; done
  echo "cluster.sh: node $n did not come up; see $root/node$n/server.out" >&2
  exit 1
}

case "${1:-}" in
  start)
    if answers 1 && answers 2 && answers 3; then uris; exit 0; fi
    command -v rabbitmq-server >/dev/null || { echo "cluster.sh: rabbitmq-server is not installed (scripts/broker.sh installs it)" >&2; exit 1; }
    for n in "${nodes[@]}"; do answers "$n" || start_node "$n"; done
    for n in "${nodes[@]}"; do wait_for "$n"; ctl "$n" await_startup; done
    for n in 2 3; do
      if ! ctl "$n" cluster_status --formatter json | grep -q "$(name 1)"; then
        # Joining logs errors about the node being down meanwhile: expected, kept out.
        for step in stop_app "join_cluster $(name 1)" start_app; do
          # shellcheck disable=SC2086
          ctl "$n" $step > "$root/node$n/join.out" 2>&1 \
            || { cat "$root/node$n/join.out" >&2; exit 1; }
        done
      fi
    done
    for n in "${nodes[@]}"; do wait_for "$n"; done
    uris
    ;;
  stop)
    for n in "${nodes[@]}"; do ctl "$n" stop >/dev/null 2>&1 || true; done
    rm -rf "$root"
    ;;
  status)
    ctl 1 cluster_status
    ;;
  uris)
    uris
    ;;
  *)
    echo "usage: $0 start|stop|status|uris" >&2
    exit 2
    ;;
esac
