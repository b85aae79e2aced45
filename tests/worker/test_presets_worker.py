"""Speed presets through the worker on the embedded tiny model: counts, warnings, a valid MP4."""

from __future__ import annotations

import base64
import math

import pytest
from worker_support import b64, probe_mp4

from hallo3_worker.tiny import build_tiny_pipeline

STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


def test_fast_with_the_endpoint_defaults_runs_fewer_forwards_and_returns_the_whole_video(
    make_runner, settings, tiny, face_jpg: bytes, short_wav: bytes
) -> None:
    run = make_runner(settings, tiny)
    job = {"image": b64(face_jpg), "audio": b64(short_wav), "seed": 9, "steps": STEPS, "separate_vocals": False}
    exact = run(job)
    fast = run({**job, "preset": "fast"})
    for result in (exact, fast):
        assert "error" not in result, result
        info = probe_mp4(base64.b64decode(result["video"]))
        assert len(info["frames"]) == result["frames"] == 25  # 1.0 s at 25 fps, one segment
        assert info["audio_codec"] == "aac" and result["has_audio"] is True

    assert exact["preset"] == "exact" and "cache_threshold" not in exact
    assert (exact["denoiser_forwards"], exact["cached_steps"], exact["cond_only_steps"]) == (STEPS, 0, 0)
    assert not any("fell back" in w for w in exact["warnings"])

    assert fast["preset"] == "fast"
    assert fast["cache_threshold"] == settings.fast_cache_threshold
    assert fast["cfg_fraction"] == settings.fast_cfg_fraction
    assert fast["denoiser_forwards"] < exact["denoiser_forwards"]
    assert fast["cached_steps"] > 0 and fast["denoiser_forwards"] + fast["cached_steps"] == STEPS
    assert fast["cond_only_steps"] == STEPS - math.ceil(settings.fast_cfg_fraction * STEPS)
    fell_back = [w for w in fast["warnings"] if "fell back" in w]
    assert len(fell_back) == 2
    assert "fp8 linear layers" in fell_back[0] and "8-bit attention (SageAttention)" in fell_back[1]


def test_balanced_completes_and_names_what_fell_back(make_runner, settings, tiny, face_jpg: bytes,
                                                     short_wav: bytes) -> None:
    result = make_runner(settings, tiny)(
        {"image": b64(face_jpg), "audio": b64(short_wav), "seed": 9, "steps": 2, "separate_vocals": False,
         "preset": "balanced"})
    assert "error" not in result, result
    assert result["preset"] == "balanced" and result["denoiser_forwards"] == 2 and result["cached_steps"] == 0
    fell_back = [w for w in result["warnings"] if "fell back" in w]
    assert [": ".join(w.split(": ")[:2]) for w in fell_back] == [
        "Preset 'balanced': fp8 linear layers fell back to the exact float32 layers",
        "Preset 'balanced': 8-bit attention (SageAttention) fell back to the exact 'sdpa' attention",
    ]


def test_a_preset_the_endpoint_disabled_is_refused_before_any_work(make_runner, make_settings, tiny,
                                                                  face_jpg: bytes, short_wav: bytes) -> None:
    result = make_runner(make_settings(presets=("exact",)), tiny)(
        {"image": b64(face_jpg), "audio": b64(short_wav), "preset": "fast"})
    assert result["error_code"] == "INVALID_INPUT" and "not enabled" in result["error"]
