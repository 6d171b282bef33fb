#!/usr/bin/env bash
# Set up fnmesh on a fresh Debian 12 / Ubuntu 24.04 machine: the Debian packages
# the mesh and its tests need, a virtual environment in .venv, and the project.
# As root it installs the packages itself; otherwise it uses sudo, or tells you
# the one command to run.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(mosquitto mosquitto-clients openssl mdns-scan iproute2 iptables python3-venv python3-dev)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "fnmesh setup: installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "fnmesh setup: please run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
echo "fnmesh setup: ready (.venv/bin/fnmesh)"
