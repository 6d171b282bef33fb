#!/usr/bin/env bash
# Set everything up, then run the demo in a throw-away home folder and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
.venv/bin/fnmesh up --home "$home" --agents 3 --demo "$@"
