#!/usr/bin/env bash
# Set everything up, then run the demo in a throw-away home folder and exit.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m fnmesh.coordinator.demo "$@"
