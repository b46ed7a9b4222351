#!/usr/bin/env bash
# The GPU suite in one command (see benchmarks/gpu_suite.py for the steps and outputs).
#
#   benchmarks/gpu_suite.sh --prepare     # once, on a machine with a package index and the offline packages:
#                                         # builds benchmarks/gpu_carry/ (wheels, datasets, text caches, LLM config)
#   benchmarks/gpu_suite.sh --smoke       # every step on tiny settings, any device, minutes
#   benchmarks/gpu_suite.sh [--results DIR] [--deadline S]   # the run: <= 8 minutes on one H200
#
# On a machine without RecBole (a GPU image with torch, transformers and peft but no network), the
# carried wheels are installed into a private folder first, without dependencies and without an index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [ "${1:-}" != "--prepare" ]; then
    if [ ! -f benchmarks/gpu_carry/manifest.json ]; then
        echo "benchmarks/gpu_carry/ is missing: run benchmarks/gpu_suite.sh --prepare first (on a machine with the offline packages)." >&2
        exit 2
    fi
    read -r -a WHEELS <<< "$("$PYTHON" benchmarks/gpu_suite.py --wheels-to-install)"
    if [ "${#WHEELS[@]}" -gt 0 ]; then
        SITE="${GPU_SUITE_SITE:-${TMPDIR:-/tmp}/gpu_suite_site}"
        echo "[gpu_suite.sh] installing ${#WHEELS[@]} carried wheels into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}"
        export PYTHONPATH="$SITE:$PYTHONPATH"
    fi
fi
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
