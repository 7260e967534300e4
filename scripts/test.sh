#!/usr/bin/env bash
# The project's test command: makes sure a RabbitMQ answers on 127.0.0.1:5672 (starting it,
# and installing it from the distribution's packages when absent), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if [ -z "${KIWIMQ_AMQP_URL:-}" ] && ! broker_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "test.sh: installing rabbitmq-server from the distribution's packages"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq rabbitmq-server
  fi
  echo "test.sh: starting rabbitmq-server"
  rabbitmq-server -detached || true
  for _ in $(seq 1 120); do broker_up && break; sleep 1; done
  broker_up || { echo "test.sh: RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  # Wait until the broker accepts AMQP sessions, not just TCP.
  command -v rabbitmqctl >/dev/null && rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

# Passing tests' output is shown: the fault tests print their figures (sent, completed,
# lost, duplicated).
[ $# -gt 0 ] || set -- -- --show-output
cargo test --all-features "$@"
