"""The benchmark scripts run end to end on the CPU (tiny models) and write their JSON reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "keys"),
    [
        ("benchmark_denoiser.py", {"forward_s", "reference_net_s", "segment_50_steps_s", "parameters_main"}),
        ("benchmark_vae.py", {"encode_motion_clip_s", "decode_segment_s", "decoded_frames"}),
    ],
)
def test_benchmark_script_reports(script: str, keys: set[str], tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--device", "cpu", "--warmup", "0", "--iters", "1",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(output.read_text())
    assert json.loads(done.stdout) == report
    assert keys <= set(report) and "not representative" in report["model"]
    assert all(report[key] > 0 for key in keys)
