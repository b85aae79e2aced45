"""An inline result is fitted to the inline limit before any GPU work: capped bitrate, or OUTPUT_TOO_LARGE at once.

The pipeline is the fast noise double (tests/worker/fake_pipeline.py): what is under test is the
worker's planning and the real x264 encode, not the model. Its block noise compresses worse than a
face, so the cap really binds.
"""

from __future__ import annotations

import base64
import io
import math

import av
import pytest
import requests
from worker_support import b64, jpeg_bytes, voice_like, wav_bytes

from hallo3_worker.errors import ErrorCode
from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker import budget

#: A limit small enough that a 5 s clip would fall below the floor (up to 3 s still fit).
SMALL_INLINE_LIMIT = 400_000


class CountingPipeline(NoiseTalkingHeadPipeline):
    """Counts model work: prepared jobs and denoised segments."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.prepared = self.denoised_segments = 0

    def prepare(self, request):  # type: ignore[no-untyped-def]
        self.prepared += 1
        return super().prepare(request)

    def generate(self, job, progress=None, cancel=None, on_frames=None, resume=None):  # type: ignore[no-untyped-def]
        def counted(done):  # type: ignore[no-untyped-def]
            self.denoised_segments += 1
            on_frames(done)

        return super().generate(job, progress, cancel, counted, resume)


def video_packets(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def x264_settings(mp4: bytes) -> str:
    """The options x264 writes into the stream (SEI) of the first segment."""
    start = mp4.index(b"x264 - core")
    return mp4[start:mp4.index(b"\x00", start)].decode("ascii", "replace")


@pytest.fixture(scope="module")
def landscape_jpg() -> bytes:
    return jpeg_bytes(960, 640)  # a 720x480 video


@pytest.fixture(scope="module")
def minute_wav() -> bytes:
    return wav_bytes(voice_like(59.5))


def test_a_minute_without_a_bucket_is_capped_to_fit_inline_and_stays_deterministic(
        make_runner, make_settings, landscape_jpg: bytes, minute_wav: bytes) -> None:
    settings = make_settings(max_duration_s=60.0)
    run_job = make_runner(settings)
    job = {"image": b64(landscape_jpg), "audio": b64(minute_wav), "seed": 23}
    first = run_job(job)
    assert first["video_type"] == "base64", first.get("error")
    assert (first["width"], first["height"], first["frames"]) == (720, 480, 1488)
    assert len(first["video"]) <= settings.inline_output_max_bytes
    plan = budget.plan_output(59.5, 1, inline=True, settings=settings)
    assert settings.inline_min_kbps * 1000 < plan.maxrate_bps < budget.FULL_QUALITY_BPS
    warning = [w for w in first["warnings"] if "bitrate was capped" in w]
    assert warning and f"{plan.maxrate_bps // 1000} kbit/s" in warning[0] and "s3Config" in warning[0]
    mp4 = base64.b64decode(first["video"])
    sei = x264_settings(mp4)
    assert f"vbv_maxrate={plan.maxrate_bps // 1000} " in sei and "crf=18.0" in sei
    assert video_packets(mp4) == 1488

    second = run_job(job)
    assert second["video"] == first["video"]  # same seed, same bytes


@pytest.mark.parametrize(("limit", "seconds", "longest"), [(SMALL_INLINE_LIMIT, 5.0, 3.0), (9_000_000, 100.0, 92.4)],
                         ids=["small-limit", "default-limit"])
def test_audio_past_the_floor_fails_before_any_segment(make_runner, make_settings, progress, face_jpg: bytes,
                                                       limit: int, seconds: float, longest: float) -> None:
    settings = make_settings(inline_output_max_bytes=limit, max_duration_s=120.0, on_platform=True)
    pipeline = CountingPipeline(settings)
    result = make_runner(settings, pipeline)({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(seconds)))})
    assert set(result) == {"error", "error_code"}, result
    assert result["error_code"] == ErrorCode.OUTPUT_TOO_LARGE.value
    assert budget.max_inline_duration_s(1, settings) == longest
    assert "300 kbit/s" in result["error"] and "s3Config" in result["error"] and f"at most {longest:g} s" in result["error"]
    assert (pipeline.prepared, pipeline.denoised_segments) == (0, 0)
    assert [p["stage"] for _, p in progress.calls] == ["fetch"]  # no prepare, no denoise


def test_a_clip_under_the_floor_length_still_fits(make_runner, make_settings, face_jpg: bytes) -> None:
    settings = make_settings(inline_output_max_bytes=SMALL_INLINE_LIMIT)
    result = make_runner(settings)({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(1.0)))})
    assert result["video_type"] == "base64" and len(result["video"]) <= SMALL_INLINE_LIMIT
    assert any("bitrate was capped" in w for w in result["warnings"])


def test_the_same_job_with_a_bucket_is_not_capped(make_runner, make_settings, face_jpg: bytes, moto_endpoint: str,
                                                  bucket: str) -> None:
    settings = make_settings(inline_output_max_bytes=SMALL_INLINE_LIMIT)
    pipeline = CountingPipeline(settings)
    config = {"accessId": "moto", "accessSecret": "moto", "bucketName": bucket, "endpointUrl": moto_endpoint}
    result = make_runner(settings, pipeline)({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(5.0)))},
                                             s3Config=config)
    assert result["video_type"] == "url", result
    assert not any("capped" in w for w in result["warnings"])
    response = requests.get(result["video"], timeout=30, proxies={"http": "", "https": ""})
    response.raise_for_status()
    sei = x264_settings(response.content)
    assert "rc=crf" in sei and "crf=18.0" in sei and "vbv_maxrate" not in sei
    assert len(response.content) > SMALL_INLINE_LIMIT  # more than could ever have come back inline
    assert pipeline.denoised_segments == math.ceil(125 / 47)


@pytest.mark.parametrize("channels", [1, 2])
def test_the_worst_case_fits_inline_for_every_length_up_to_the_longest(channels: int) -> None:
    settings = Settings()
    longest = budget.max_inline_duration_s(channels, settings)
    for tenths in range(5, int(longest * 10) + 1, 7):
        plan = budget.plan_output(tenths / 10, channels, inline=True, settings=settings)
        if plan.maxrate_bps is None:  # short clips: a cap would not bind
            continue
        assert plan.maxrate_bps >= settings.inline_min_kbps * 1000
        assert math.ceil(plan.mp4_bytes * 4 / 3) <= settings.inline_output_max_bytes * budget.INLINE_MARGIN + 4
    with pytest.raises(Exception, match="kbit/s"):
        budget.plan_output(longest + 1, channels, inline=True, settings=settings)
    assert budget.plan_output(longest + 1, channels, inline=False, settings=settings).maxrate_bps is None


def test_the_plan_uses_the_pipeline_segment_length() -> None:
    from hallo3_worker.conditioning.audio import FPS, NEW_FRAMES_PER_SEGMENT

    assert (budget.FPS, budget.NEW_FRAMES_PER_SEGMENT) == (FPS, NEW_FRAMES_PER_SEGMENT)


def test_documented_inline_lengths() -> None:
    """docs/api.md states these numbers for the default settings; keep them in step with the plan."""
    defaults = Settings()
    assert (budget.max_inline_duration_s(1, defaults), budget.max_inline_duration_s(2, defaults)) == (92.4, 81.6)
    caps = {(channels, seconds): budget.plan_output(seconds, channels, inline=True, settings=defaults).maxrate_bps // 1000
            for channels in (1, 2) for seconds in (10, 30, 60, 75)}
    assert caps == {(1, 10): 3665, (1, 30): 1174, (1, 60): 528, (1, 75): 398,
                    (2, 10): 3611, (2, 30): 1119, (2, 60): 472, (2, 75): 343}
    assert budget.plan_output(4.4, 2, inline=True, settings=defaults).maxrate_bps is None  # "up to ~4.5 s"
    assert budget.plan_output(4.6, 1, inline=True, settings=defaults).maxrate_bps is not None
