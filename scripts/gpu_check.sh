#!/usr/bin/env bash
# The one prepared GPU check (scripts/gpu_check.py): six sections in order of value (transformer
# forward, a 1-segment job, memory per offload policy, presets, compile, cold start), full size with
# random weights, within --budget-s (default 540 s: one 10-minute call). Writes gpu_check.json and
# gpu_check.md to $OUT (if set) or out/gpu_check after every section.
#
#   scripts/gpu_check.sh             # on a GPU machine
#   scripts/gpu_check.sh --dry-run   # tiny, on the CPU (what CI runs)
#
# Python: $HALLO3_PYTHON, else .venv/bin/python, else python3. On a machine without this project's
# packages, wheels placed in .whl/ (scripts/gpu_wheels.sh fetches them where pip can reach PyPI)
# are installed into a scratch folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${HALLO3_PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
# Where this Python lacks diffusers (a lent GPU machine), install the carried wheels into a folder
# of this run's own, exactly as that machine's instructions do.
if ! "$python" -c "import diffusers" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d "${TMPDIR:-/tmp}/hallo3-gpu-check-site.XXXXXX")"
    trap 'rm -rf "$site"' EXIT
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-out/gpu_check}"
"$python" scripts/gpu_check.py --out-dir "$out" "$@"
