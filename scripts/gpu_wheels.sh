#!/usr/bin/env bash
# Fetch into .whl/ the wheels (CPython 3.12, x86-64 Linux) that a GPU machine with PyTorch but
# without this project's other packages needs for scripts/gpu_check.sh. Run where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { grep -iE "^$1==" requirements.txt | head -1; }
for name in diffusers av soundfile librosa audio-separator; do
    spec="$(pin "$name")"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "${spec:-$name}"
done
# soundfile's own dependency (the image has numpy, transformers, safetensors, opencv, onnxruntime, sentencepiece).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl cffi pycparser
ls .whl
