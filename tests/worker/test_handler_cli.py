"""``python handler.py`` answers --help, bad options and a missing or bad test_input.json before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_support import PROXY_VARS, REPO_ROOT

#: Log lines that only appear once the pipeline is being built.
MODEL_LOADING = ("tiny random-weight model", "built the embedded tiny model")


def run_handler(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_VARS and not k.startswith(("BUCKET_", "RUNPOD_", "HALLO3_", "AWS_"))}
    env["HALLO3_WORK_DIR"] = str(cwd.parent / "work")
    return subprocess.run([sys.executable, str(REPO_ROOT / "handler.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def test_help_answers_without_loading_the_model(folder: Path) -> None:
    done = run_handler(folder, "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--rp_serve_api", "--rp_api_port", "--rp_api_host", "--test_input", "test_input.json"):
        assert option in done.stdout
    assert not any(line in done.stdout + done.stderr for line in MODEL_LOADING)


def test_an_unknown_option_is_a_usage_error(folder: Path) -> None:
    done = run_handler(folder, "--rp-serve-api")
    assert done.returncode == 2 and "unrecognized arguments: --rp-serve-api" in done.stderr
    assert not any(line in done.stderr for line in MODEL_LOADING)


def test_a_missing_test_input_is_reported_before_the_model_loads(folder: Path) -> None:
    done = run_handler(folder)
    assert done.returncode == 1
    assert "test_input.json not found in" in done.stderr and str(folder) in done.stderr
    assert not any(line in done.stderr for line in MODEL_LOADING)
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("content, expected", [("{not json", "is not JSON"), (json.dumps({"image": "x"}),
                                                                              "must hold a job")])
def test_a_bad_test_input_is_reported_before_the_model_loads(folder: Path, content: str, expected: str) -> None:
    (folder / "test_input.json").write_text(content)
    done = run_handler(folder)
    assert done.returncode == 1 and expected in done.stderr
    assert not any(line in done.stderr for line in MODEL_LOADING)
    bad_option = run_handler(folder, "--test_input", content)
    assert bad_option.returncode == 1 and "--test_input" in bad_option.stderr and expected in bad_option.stderr
