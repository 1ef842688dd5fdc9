#!/usr/bin/env bash
# The demo: an embedded Redis when none answers, a worker on the tiny model, a burst of streamed chats.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash ops/setup.sh | tail -n 1)"
export OMP_WAIT_POLICY=PASSIVE
exec "$VENV/bin/redbatch" demo "$@"
