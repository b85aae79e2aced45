#!/usr/bin/env bash
# Fetch into .whl/ the wheels (CPython 3.12, x86-64 Linux) that a lent GPU machine lacks for
# scripts/gpu_check.sh: diffusers (pinned in requirements.txt) and importlib_metadata, which
# diffusers imports. Everything else the check imports is on that machine (scripts/device_stack.txt).
# Run where pip reaches PyPI. Writes scripts/gpu_wheels.lock (name, size, sha256 of each wheel) and
# prints what travels: the tracked files plus these wheels, against the 56 MiB budget.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
pin() {  # the requirement as pinned in requirements.txt, else the bare name
    local line
    line="$(grep -ihE "^$1==" requirements.txt || true)"
    echo "${line:-$1}"
}
rm -rf .whl && mkdir -p .whl
for spec in "$(pin diffusers)" "$(pin importlib_metadata)"; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec"
done
{
    echo "# wheel  bytes  sha256 (written by scripts/gpu_wheels.sh; tests/test_travel.py sums the bytes)"
    for wheel in .whl/*.whl; do
        printf '%s %s %s\n' "$(basename "$wheel")" "$(stat -c %s "$wheel")" "$(sha256sum "$wheel" | cut -d' ' -f1)"
    done
} > scripts/gpu_wheels.lock
"$python" scripts/travel_size.py
