#!/usr/bin/env bash
# The project's test command: makes sure a RabbitMQ answers on 127.0.0.1:5672 (starting it,
# and installing it from the distribution's packages when absent) and that aiida-core 2.9.4
# is in target/aiida-venv (for the ZeroMQ tests) and a C++ compiler for libzmq, then runs
# every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/broker.sh
# The ZeroMQ tests run against AiiDA's own broker, from aiida-core in a venv of their own.
scripts/aiida-venv.sh
# The `zeromq` feature builds libzmq from its vendored C++ source.
if ! command -v g++ >/dev/null 2>&1; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq g++
fi

# Passing tests' output is shown: the fault tests print their figures (sent, completed,
# lost, duplicated).
[ $# -gt 0 ] || set -- -- --show-output
cargo test --all-features "$@"
