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


def test_gpu_check_dry_run_writes_every_field(tmp_path: Path) -> None:
    """scripts/gpu_check.sh --dry-run: the GPU check's whole path at tiny size on the CPU."""
    import os

    env = {**os.environ, "OUT": str(tmp_path), "HALLO3_PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--steps", "2"],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == {"device", "torch", "model", "dtype", "speed_items", "cold_start", "job",
                           "speedups_attached", "presets", "policies", "wall_s"}
    presets = report["presets"]
    assert list(presets) == ["exact", "balanced", "fast"] and presets["exact"]["denoiser_forwards"] == 2
    assert presets["fast"]["denoiser_forwards"] <= presets["exact"]["denoiser_forwards"]
    assert any("fell back" in warning for warning in presets["balanced"]["warnings"])  # no fp8 kernels on the CPU
    items = [row["item"] for row in report["speed_items"]["rows"]]
    assert items == ["plain", "reference_kv_once", "attention", "fused_projections", "compile_blocks", "all"]
    assert all(row["forward_s"] > 0 and row["speedup"] > 0 for row in report["speed_items"]["rows"])
    assert report["speed_items"]["compile_s"] > 0 and report["speed_items"]["flop_per_forward"] > 0
    job = report["job"]
    assert job["segments"] == 2 and job["frames"] == 2 * 47 - 1 and len(job["vae_decode_s_per_segment"]) == 2
    assert {"audio", "text", "reference", "segment_0", "segment_1"} <= set(job["stages_s"]) and job["step_s"] > 0
    assert set(report["policies"]) == {"off", "partial", "full"}
    assert report["policies"]["full"]["estimate_gib"] <= 20  # the full policy's estimate target
    assert all(p["peak_memory_gib"] is None for p in report["policies"].values())  # no allocator statistics on the CPU
    assert report["cold_start"]["load_s"] > 0 and report["speedups_attached"]["fused_attentions"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| compile_blocks |" in table and "| full |" in table
