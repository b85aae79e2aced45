#!/usr/bin/env bash
# CPU rehearsal of a lent GPU machine, before any GPU time is spent: its Python stack
# (scripts/device_stack.txt, in a Python 3.12 venv built once and then reused), the carried wheels
# installed exactly as that machine installs them (pip --no-index --no-deps --target DIR, then
# PYTHONPATH=DIR), then what will run there: scripts/gpu_check.sh --dry-run, and the golden tests.
#
#   scripts/device_rehearsal.sh      # a few minutes once the venv exists (building it: ~5-10 min)
#
# Settings: HALLO3_REHEARSAL_DIR (default .rehearsal in the repo, ignored by git) holds the venv
# and the report; HALLO3_REHEARSAL_PYTHON names a Python 3.12 (else python3.12 on the PATH, pyenv's
# newest 3.12, or uv's). Fetches the wheels with scripts/gpu_wheels.sh when .whl/ has none.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${HALLO3_REHEARSAL_DIR:-$PWD/.rehearsal}"
mkdir -p "$dir"

find_python() {
    local candidate
    for candidate in "${HALLO3_REHEARSAL_PYTHON:-}" python3.12; do
        if [[ -n "$candidate" ]] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null; then
            echo "$candidate"; return
        fi
    done
    if command -v pyenv > /dev/null; then
        local version
        version="$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1 || true)"
        if [[ -n "$version" ]]; then echo "$(pyenv root)/versions/$version/bin/python3.12"; return; fi
    fi
    if command -v uv > /dev/null && uv python find 3.12 > /dev/null 2>&1; then uv python find 3.12; return; fi
    echo "no Python 3.12 found: set HALLO3_REHEARSAL_PYTHON (pyenv install 3.12 or uv python install 3.12 give one)" >&2
    exit 2
}

venv="$dir/venv"
stamp="$venv/.stack-$(sha256sum scripts/device_stack.txt | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
    python="$(find_python)"
    echo "building the rehearsal venv with $("$python" --version) from scripts/device_stack.txt"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q -r scripts/device_stack.txt
    touch "$stamp"
fi
if ! compgen -G ".whl/*.whl" > /dev/null; then
    scripts/gpu_wheels.sh
fi
site="$dir/site"
rm -rf "$site"
"$venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site"
echo "rehearsal stack:"
"$venv/bin/python" - << 'PY'
import importlib.metadata as md, platform
names = ["torch", "transformers", "tokenizers", "numpy", "safetensors", "huggingface_hub", "onnxruntime",
         "opencv-python-headless", "diffusers", "importlib_metadata"]
print(f"  Python {platform.python_version()}; " + ", ".join(f"{n} {md.version(n)}" for n in names))
for missing in ("av", "librosa", "soundfile", "audio_separator", "runpod", "insightface", "mediapipe"):
    try:
        __import__(missing)
    except ImportError:
        continue
    raise SystemExit(f"{missing} is importable here, but not on the GPU machine: rebuild the venv")
PY
started=$SECONDS
OUT="$dir/out" HALLO3_PYTHON="$venv/bin/python" scripts/gpu_check.sh --dry-run --steps 2
echo "gpu_check.sh --dry-run passed in $((SECONDS - started)) s; report in $dir/out"
started=$SECONDS
PYTHONPATH="$site:$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/models/test_golden_denoiser.py tests/models/test_vae.py tests/test_golden_pipeline.py \
    tests/conditioning/test_audio_features.py tests/conditioning/test_image.py tests/test_tiny_face.py \
    tests/conditioning/test_tiny_assets.py tests/test_sampling.py tests/test_travel.py \
    tests/test_scripts.py::test_gpu_check_imports_and_runs_a_job_without_the_media_packages \
    tests/test_scripts.py::test_a_failing_section_is_recorded_and_the_next_one_runs
echo "golden tests on the GPU machine's stack passed in $((SECONDS - started)) s"
