#!/usr/bin/env bash
# One GPU lease in one command (issue 22; bench/README.md gives the device call). Installs the carried wheels
# (.whl/, listed in bench/device_wheels.txt) when there are any, then runs bench/gpu_lease.py, which writes every
# finished row to $OUT/results.jsonl and $OUT/results.md at once. Extra arguments go to it, so
#   OUT=dir bench/gpu_lease.sh --tiny --device cpu --budget-s 90
# runs the same thing on a CPU. Everything it writes is under $OUT (lease.log: the whole output).
set -uo pipefail
: "${OUT:?set OUT to the folder the results go to}"
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python  # a checkout with its venv (CPU)
else PYTHON=python3  # the device machine: its image's python holds torch
fi
# The checkout's own venv has the pinned packages already (and another Python than the wheels' cp312).
if [ "$PYTHON" != .venv/bin/python ] && compgen -G ".whl/*.whl" >/dev/null; then
  # --no-deps: the wheel list is complete by test (tests/test_gpu_lease.py); the machine has the rest.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tee "$OUT/lease.log" || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -m bench.gpu_lease --out "$OUT" "$@" 2>&1 | tee -a "$OUT/lease.log"
