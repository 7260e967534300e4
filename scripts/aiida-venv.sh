#!/usr/bin/env bash
# The Python environment the ZeroMQ tests need: aiida-core 2.9.4 (its ZeroMQ broker and
# client, with pyzmq), in target/aiida-venv (git-ignored) or KIWIMQ_AIIDA_VENV. Made once;
# later runs only check it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${KIWIMQ_AIIDA_VENV:-target/aiida-venv}"
if "$venv/bin/python" -c 'import aiida, zmq, sys; sys.exit(aiida.__version__ != "2.9.4")' 2>/dev/null; then
  exit 0
fi
echo "aiida-venv.sh: making the Python environment in $venv (aiida-core 2.9.4)"
if ! python3 -m venv "$venv"; then
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq python3-venv
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q "aiida-core==2.9.4"
