"""The benchmark scripts run end to end on the CPU (tiny models) and write their JSON reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


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


def run_gpu_check(out: Path, *args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "HALLO3_PYTHON": python}
    return subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=900, check=False, env=env)


def test_gpu_check_dry_run_writes_every_field(tmp_path: Path) -> None:
    """scripts/gpu_check.sh --dry-run: the GPU check's whole path at tiny size on the CPU."""
    done = run_gpu_check(tmp_path, "--steps", "2", "--budget-s", "3000")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["forward", "job", "policies", "presets", "compile", "cold_start"]
    assert all(entry["status"] == "ok" and entry["expected_s"] > 0 for entry in sections.values()), sections
    # Counted on the meta device, attention is included; some torch releases' flop counter has no
    # formula for the CPU's own flash-attention kernel (torch 2.13 counts 0 there), so the counted CPU
    # forward can leave it out (CUDA kernels are counted).
    assert report["flop_per_forward"] >= sections["forward"]["flop_per_forward"] > 0
    items = [row["item"] for row in sections["forward"]["rows"]]
    assert items == ["plain", "reference_kv_once", "attention", "fused_projections", "all"]
    assert all(row["forward_s"] > 0 and row["speedup"] > 0 for row in sections["forward"]["rows"])
    job = sections["job"]
    assert job["segments"] == 1 and job["frames"] == 46 and len(job["vae_decode_s_per_segment"]) == 1
    assert {"audio", "text", "reference", "segment_0"} <= set(job["stages_s"]) and job["step_s"] > 0
    assert job["speedups_attached"]["fused_attentions"] > 0 and job["denoiser_forwards"] == 2
    policies = sections["policies"]["policies"]
    assert set(policies) == {"off", "partial", "full"}
    assert policies["full"]["estimate_gib"] <= 20  # the full policy's estimate target
    assert all(p["peak_memory_gib"] is None for p in policies.values())  # no allocator statistics on the CPU
    presets = sections["presets"]["presets"]
    assert list(presets) == ["exact", "balanced", "fast"] and presets["exact"]["denoiser_forwards"] == 2
    assert presets["fast"]["denoiser_forwards"] <= presets["exact"]["denoiser_forwards"]
    assert any("fell back" in warning for warning in presets["balanced"]["warnings"])  # no fp8 kernels on the CPU
    compiled = sections["compile"]
    assert compiled["compiled"] and compiled["compile_s"] > 0 and compiled["compiled_forward_s"] > 0
    assert sections["cold_start"]["load_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| fused_projections |" in table and "| full |" in table and "Regional compile" in table


def test_gpu_check_within_a_small_budget_reports_the_first_section_and_names_the_skipped(tmp_path: Path) -> None:
    done = run_gpu_check(tmp_path, "--steps", "2", "--budget-s", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert sections["forward"]["status"] == "ok" and sections["forward"]["rows"]
    skipped = [name for name, entry in sections.items() if entry["status"] == "skipped"]
    assert "job" in skipped and "policies" in skipped and "presets" in skipped
    assert all("of the budget left" in sections[name]["reason"] for name in skipped)
    table = (tmp_path / "gpu_check.md").read_text()
    assert all("Skipped: expected" in part for part in table.split("### ")[2:5])


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path: Path) -> None:
    """One section's error is kept in the report; the run goes on and exits 1."""
    import gpu_check

    class Args:
        dry_run, steps, budget_s, out_dir = True, 2, 3000.0, tmp_path

    check = gpu_check.Check(Args(), tmp_path)

    def broken() -> dict:
        raise RuntimeError("no C compiler")

    check.section("forward", lambda: {"rows": []})
    check.section("compile", broken)
    check.section("cold_start", check.cold_start)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["compile"]["status"] == "failed" and "no C compiler" in saved["compile"]["error"]
    assert saved["cold_start"]["status"] == "ok" and saved["cold_start"]["load_s"] > 0
    assert "Failed after" in (tmp_path / "gpu_check.md").read_text()


MEDIA_PACKAGES = ("av", "librosa", "soundfile", "audio_separator", "onnx", "runpod", "insightface", "mediapipe")
IMPORT_PROBE = """
import json, sys, tempfile
from pathlib import Path
sys.path[:0] = [sys.argv[1] + "/scripts", sys.argv[1] + "/src"]
banned = json.loads(sys.argv[2])
# What the third-party libraries the check uses load by themselves where installed (transformers
# imports librosa and soundfile when it finds them; the GPU machines have neither).
import cv2, diffusers, PIL.Image, safetensors.torch, torch
from transformers import T5EncoderModel, T5Tokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Model
baseline = {m for m in banned if m in sys.modules}
import gpu_check
after_import = {m for m in banned if m in sys.modules} - baseline
with tempfile.TemporaryDirectory() as tmp:
    pipeline = gpu_check.build("off", torch.device("cpu"), torch.float32, True, Path(tmp))
    gpu_check.run_job(pipeline, Path(tmp), segments=1, steps=2)
after_job = {m for m in banned if m in sys.modules} - baseline
print(json.dumps({"after_import": sorted(after_import), "after_job": sorted(after_job)}))
"""


def test_gpu_check_imports_and_runs_a_job_without_the_media_packages() -> None:
    """What travels to a GPU machine: the check, and a tiny job through it, load none of these packages."""
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(ROOT), json.dumps(MEDIA_PACKAGES)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {"after_import": [], "after_job": []}
