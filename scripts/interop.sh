#!/usr/bin/env bash
# The cross-language suite: kiwimq against the real kiwiPy (kiwipy[rmq]==0.9.0) on the
# local RabbitMQ, for the YAML, JSON and MessagePack codecs, both directions. Makes the
# Python virtual environment it needs under target/ (git-ignored), builds the Rust peer,
# and prints `N passed, M failed`; fails on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/broker.sh

venv="${KIWIMQ_INTEROP_VENV:-target/interop-venv}"
if ! "$venv/bin/python" -c 'import kiwipy, msgpack, sys; sys.exit(kiwipy.__version__ != "0.9.0")' 2>/dev/null; then
  echo "interop.sh: making the Python environment in $venv"
  if ! python3 -m venv "$venv"; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q "kiwipy[rmq]==0.9.0" msgpack
fi

cargo build -q --example interop_peer
"$venv/bin/python" interop/suite.py target/debug/examples/interop_peer
