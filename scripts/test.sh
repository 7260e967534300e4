#!/usr/bin/env bash
# The project's test command: makes sure a RabbitMQ answers on 127.0.0.1:5672 (starting it,
# and installing it from the distribution's packages when absent) and that aiida-core 2.9.4
# is in target/aiida-venv (for the ZeroMQ tests), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/broker.sh
# The ZeroMQ tests run against AiiDA's own broker, from aiida-core in a venv of their own.
scripts/aiida-venv.sh

# Passing tests' output is shown: the fault tests print their figures (sent, completed,
# lost, duplicated).
[ $# -gt 0 ] || set -- -- --show-output
cargo test --all-features "$@"
