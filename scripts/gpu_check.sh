#!/usr/bin/env bash
# The one prepared GPU check (scripts/gpu_check.py): speed items, a 2-segment job, memory per offload
# policy and cold start, full size with random weights. Writes gpu_check.json and gpu_check.md to
# $OUT (if set) or out/gpu_check. Under 8 minutes on one H100/H200.
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
if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/hallo3-gpu-check-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-out/gpu_check}"
exec "$python" scripts/gpu_check.py --out-dir "$out" "$@"
