#!/usr/bin/env bash
# Makes sure a RabbitMQ answers on 127.0.0.1:5672: starts it, installing it from the
# distribution's packages when absent. Does nothing when KIWIMQ_URL names another AMQP
# broker (the variable the examples, tests and benchmarks read). Sourced by test.sh and
# interop.sh.

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

case "${KIWIMQ_URL:-}" in amqp*) own_broker=0 ;; *) own_broker=1 ;; esac
if [ "$own_broker" = 1 ] && ! broker_up; then
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "broker.sh: installing rabbitmq-server from the distribution's packages"
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq rabbitmq-server
  fi
  echo "broker.sh: starting rabbitmq-server"
  rabbitmq-server -detached || true
  for _ in $(seq 1 120); do broker_up && break; sleep 1; done
  broker_up || { echo "broker.sh: RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
  # Wait until the broker accepts AMQP sessions, not just TCP.
  command -v rabbitmqctl >/dev/null && rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
