#!/usr/bin/env bash
# The test suite. Unit tests use fakeredis; end-to-end tests need a real Redis server:
# REDBATCH_TEST_REDIS_URL if set, else the tests start redis-server on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash ops/setup.sh | tail -n 1)"
if [ -z "${REDBATCH_TEST_REDIS_URL:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server not found: install it (e.g. apt-get install redis-server) or set REDBATCH_TEST_REDIS_URL" >&2
        exit 1
    fi
fi
export OMP_WAIT_POLICY=PASSIVE
exec "$VENV/bin/python" -m pytest -q "$@"
