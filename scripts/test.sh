#!/usr/bin/env bash
# The project's test command: makes sure a RabbitMQ answers on 127.0.0.1:5672 (starting it,
# and installing it from the distribution's packages when absent) and that aiida-core 2.9.4
# is in target/aiida-venv (for the ZeroMQ tests), a C++ compiler for libzmq, and Chromium
# with its WebDriver (for the dashboard's browser test), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/broker.sh
# The ZeroMQ tests run against AiiDA's own broker, from aiida-core in a venv of their own.
scripts/aiida-venv.sh
# The `zeromq` feature builds libzmq from its vendored C++ source; the dashboard's browser
# test drives Debian's headless Chromium through chromedriver.
missing=()
command -v g++ >/dev/null 2>&1 || missing+=(g++)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo "test.sh: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}"
fi

# Passing tests' output is shown: the fault tests print their figures (sent, completed,
# lost, duplicated).
[ $# -gt 0 ] || set -- -- --show-output
cargo test --all-features "$@"
