#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv with the worker, dev, bulk, image and gateway extras.
# torch: the CPU build by default (REDBATCH_TORCH_SPEC overrides, e.g. for a CUDA machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${REDBATCH_VENV:-.venv}"
TORCH_SPEC="${REDBATCH_TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q -e ".[worker,dev,bulk,image,gateway]"
# promtool (tests/test_metrics.py checks ops/monitoring with it where present): apt-get install prometheus
# xgrammar for structured output (the `structured` extra). On a CPU machine without triton, install it
# without its dependencies (triton is only its CUDA kernel) plus the one it really needs besides ours.
if ! "$VENV/bin/python" -c "import xgrammar" >/dev/null 2>&1; then
    if "$VENV/bin/python" -c "import triton" >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install -q -e ".[structured]"
    else
        "$VENV/bin/python" -m pip install -q --no-deps "xgrammar>=0.2.9,<0.3" "apache-tvm-ffi>=0.1.11"
    fi
fi
echo "$VENV"
