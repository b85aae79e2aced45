"""scripts/evaluate_presets.py: its measures, and one run on the tiny model writing its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from preset_metrics import MouthRegionContrast, lipsync_r, loudness_envelope, psnr, ssim  # noqa: E402


def test_ssim_is_the_standard_one_on_luma() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    luma = lambda v: v.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    expected = np.mean([
        metrics.structural_similarity(luma(x), luma(y), data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
        for x, y in zip(b, a)
    ])
    assert ssim(b, a) == pytest.approx(expected, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert 10 < psnr(b, a) < 40


def test_lip_sync_proxy_pieces() -> None:
    rate = 16_000
    t = np.arange(2 * rate) / rate
    speech = np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
    loudness = loudness_envelope(speech, rate, 50)
    assert loudness.shape == (50,)
    assert lipsync_r(loudness * 3 + 1, loudness) == pytest.approx(1.0)
    assert lipsync_r(np.full(50, np.nan), loudness) is None and lipsync_r(np.ones(50), loudness) is None
    frames = np.zeros((3, 100, 100, 3), dtype=np.uint8)
    frames[1, 70:85, 40:60] = 255  # "teeth" in the mouth box of the second frame
    meter = MouthRegionContrast.from_face((20, 20, 80, 80), 100, 100)
    values = meter.measure(frames)
    assert values[0] == 0 and values[1] > 0


def test_the_script_runs_on_the_tiny_model_and_writes_its_table(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HALLO3_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate_presets.py"), "--presets", "fast", "--fast", "0.3:0.5",
         "--steps", "4", "--max-seconds", "1", "--no-separate-vocals", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "presets.json").read_text())
    table = (tmp_path / "presets.md").read_text()
    assert done.stdout.strip() == table.strip()
    assert "tiny random-weight model" in report["model"] and "mean nothing" in report["note"]
    (clip,) = report["clips"]
    assert clip["frames"] == 25 and "stand-in" in clip["mouth_meter"]
    exact, fast = clip["rows"]
    assert (exact["variant"], exact["identical_to_exact"], exact["ssim"], exact["denoiser_forwards"]) == (
        "exact", True, 1.0, 4)
    assert fast["preset"] == "fast" and (fast["cache_threshold"], fast["cfg_fraction"]) == (0.3, 0.5)
    assert fast["denoiser_forwards"] + fast["cached_steps"] == 4 and fast["cond_only_steps"] == 2
    assert 0 < fast["ssim"] <= 1 and fast["wall_s"] > 0
    assert len(fast["warnings"]) == 2  # fp8 and 8-bit attention fell back on the CPU
    for key in ("lipsync_r", "psnr_db", "gpu_peak_gib", "speedup"):
        assert key in exact and key in fast
    assert "| exact |" in table and "| fast |" in table and "lip-sync r" in table
