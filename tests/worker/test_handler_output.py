"""The encoded result: codecs, duration, audio, seeds, progress, inline limits."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import av
import numpy as np
import pytest
from worker_support import b64, jpeg_bytes, probe_mp4

from hallo3_worker.conditioning.decode import decode_audio
from hallo3_worker.errors import ErrorCode
from hallo3_worker.interface import DecodedAudio
from hallo3_worker.worker.media import encode_segment, mux_segments
from fake_pipeline import WARNING as PLACEHOLDER_WARNING
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker.runtime import TINY_MODEL_WARNING

FRAME_S = 1 / 25


def video_bytes(result: dict[str, Any]) -> bytes:
    assert "error" not in result, result
    assert result["video_type"] == "base64"
    return base64.b64decode(result["video"])


@pytest.fixture(scope="module")
def speech_duration(speech_wav: bytes) -> float:
    with av.open(io.BytesIO(speech_wav)) as container:
        stream = container.streams.audio[0]
        return float(stream.duration * stream.time_base)


def test_mp4_codecs_duration_and_layout(run_job, face_jpg: bytes, speech_wav: bytes, speech_duration: float) -> None:
    result = run_job({"image": b64(face_jpg), "audio": b64(speech_wav), "seed": 3})
    data = video_bytes(result)
    info = probe_mp4(data)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["fps"] == 25 and result["fps"] == 25
    assert (info["width"], info["height"]) == (result["width"], result["height"]) == (480, 480)
    expected_frames = math.ceil(speech_duration * 25 - 1e-9)
    assert len(info["frames"]) == result["frames"] == expected_frames
    # The video covers the audio, and is never longer than the audio plus one frame.
    assert speech_duration <= info["video_duration_s"] + 1e-6 <= speech_duration + FRAME_S + 1e-6
    assert info["duration_s"] == pytest.approx(speech_duration, abs=FRAME_S)
    assert result["duration_s"] == pytest.approx(speech_duration, abs=FRAME_S)
    # All of the audio is there, and nothing more.
    assert info["audio_duration_s"] == pytest.approx(speech_duration, abs=0.005)
    assert result["has_audio"] is True and result["size_bytes"] == len(data)
    assert result["gpu_peak_memory_gib"] is None  # this pipeline reports no device memory
    # +faststart: the index (moov) comes before the media data (mdat).
    assert data[4:8] == b"ftyp" and 0 < data.find(b"moov") < data.find(b"mdat")


def test_the_measured_peak_memory_is_reported(make_runner, settings, face_jpg: bytes, speech_wav: bytes) -> None:
    runner = make_runner(settings, NoiseTalkingHeadPipeline(settings, peak_memory_bytes=int(35.5 * 2**30) + 12345))
    result = runner({"image": b64(face_jpg), "audio": b64(speech_wav)})
    assert result["gpu_peak_memory_gib"] == 35.5


def test_the_original_audio_is_muxed(run_job, face_jpg: bytes, speech_wav: bytes, tmp_path) -> None:
    data = video_bytes(run_job({"image": b64(face_jpg), "audio": b64(speech_wav)}))
    (tmp_path / "out.mp4").write_bytes(data)
    (tmp_path / "in.wav").write_bytes(speech_wav)
    muxed = decode_audio(tmp_path / "out.mp4").mono()
    source = decode_audio(tmp_path / "in.wav").mono()
    n = min(muxed.size, source.size)
    assert n > 0.95 * source.size
    correlation = float(np.corrcoef(muxed[:n], source[:n])[0, 1])
    assert correlation > 0.95, correlation


def test_audio_at_a_rate_aac_lacks_is_resampled_for_the_mux(tmp_path) -> None:
    rate = 37_800  # not an AAC rate
    t = np.arange(rate) / rate
    stereo = np.stack([np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 500 * t)]).astype(np.float32) * 0.4
    frames = np.zeros((25, 64, 64, 3), np.uint8)
    segment = encode_segment(frames, 25, tmp_path / "segment.mp4")
    video = mux_segments([segment], 25, DecodedAudio(stereo, rate), tmp_path / "out.mp4")
    assert video.has_audio and video.frames == 25
    muxed = decode_audio(tmp_path / "out.mp4")
    assert (muxed.sample_rate, muxed.channels) == (48_000, 2)
    assert abs(muxed.duration_s - 1.0) < 0.05
    expected = np.sin(2 * np.pi * 300 * np.arange(48_000) / 48_000) * 0.4
    lag = int(np.argmax(np.correlate(muxed.samples[0, 2048:6144], expected[:1024], "valid")))  # AAC priming delay
    assert np.corrcoef(muxed.samples[0, 2048 + lag : 2048 + lag + 40_000], expected[:40_000])[0, 1] > 0.99


def _dirty_the_heap(seed: int) -> None:
    """Leave freed C-heap blocks full of arbitrary bytes, as a job's inference does."""
    import ctypes
    import random

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    rnd, blocks = random.Random(seed), []
    for _ in range(3000):
        size = rnd.choice([64, 1024, 16384, 200_000, 1 << 20])
        block = libc.malloc(size)
        libc.memset(block, rnd.randrange(256), size)
        blocks.append(block)
    for block in blocks:
        libc.free(block)


def _moving_frames(count: int, seed: int = 0) -> np.ndarray:
    """A textured picture sliding one pixel per frame: (count, 240, 320, 3) uint8."""
    texture = np.random.default_rng(seed).integers(0, 256, (60, 80 + count // 4 + 1, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((4, 4, 1), np.uint8))  # (240, >= 320 + count, 3), blocky like a picture
    return np.stack([texture[:, i : i + 320] for i in range(count)])


def test_the_encode_does_not_depend_on_what_the_heap_held(tmp_path) -> None:
    """x264's macroblock-tree rate control reads memory it never wrote; with it on, these encodes differ."""
    frames = _moving_frames(40)
    digests = set()
    for attempt in range(4):
        if attempt:
            _dirty_the_heap(attempt)
        encode_segment(frames, 25, tmp_path / "segment.mp4")
        digests.add((tmp_path / "segment.mp4").read_bytes())
    assert len(digests) == 1


def test_segments_are_joined_without_a_second_encode(tmp_path) -> None:
    frames = _moving_frames(60)
    parts = [encode_segment(frames[:47], 25, tmp_path / "a.mp4"), encode_segment(frames[47:], 25, tmp_path / "b.mp4",
                                                                                  first_frame=47)]
    each = [probe_mp4(part.read_bytes())["frames"] for part in parts]  # every segment plays on its own
    assert [len(f) for f in each] == [47, 13]
    rate = 16_000
    speech = DecodedAudio((0.3 * np.sin(2 * np.pi * 200 * np.arange(3 * rate) / rate))[None].astype(np.float32), rate)
    video = mux_segments(parts, 25, speech, tmp_path / "joined.mp4")
    joined = probe_mp4((tmp_path / "joined.mp4").read_bytes())
    assert (video.frames, video.width, video.height, video.has_audio) == (60, 320, 240, True)
    assert np.array_equal(np.stack(joined["frames"]), np.concatenate([np.stack(f) for f in each]))  # same pictures
    assert abs(decode_audio(tmp_path / "joined.mp4").duration_s - 60 / 25) < 0.05  # audio cut to the video


def test_landscape_output_is_720x480(run_job, short_wav: bytes) -> None:
    result = run_job({"image": b64(jpeg_bytes(640, 400)), "audio": b64(short_wav)})
    info = probe_mp4(video_bytes(result))
    assert (info["width"], info["height"]) == (result["width"], result["height"]) == (720, 480)


def test_seed_is_echoed_and_reproducible(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    inputs = {"image": b64(face_jpg), "audio": b64(short_wav)}
    first = run_job({**inputs, "seed": 1234})
    again = run_job({**inputs, "seed": 1234})
    other = run_job({**inputs, "seed": 1235})
    assert first["seed"] == again["seed"] == 1234 and other["seed"] == 1235
    frames_first = probe_mp4(video_bytes(first))["frames"]
    frames_again = probe_mp4(video_bytes(again))["frames"]
    frames_other = probe_mp4(video_bytes(other))["frames"]
    assert all(np.array_equal(a, b) for a, b in zip(frames_first, frames_again, strict=True))
    assert not np.array_equal(frames_first[0], frames_other[0])


def test_random_seed_is_echoed_and_replays(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    inputs = {"image": b64(face_jpg), "audio": b64(short_wav)}
    random_run = run_job(inputs)
    assert isinstance(random_run["seed"], int) and 0 <= random_run["seed"] < 2**32
    replay = run_job({**inputs, "seed": random_run["seed"]})
    assert np.array_equal(probe_mp4(video_bytes(random_run))["frames"][5], probe_mp4(video_bytes(replay))["frames"][5])


def test_result_fields_timings_and_warnings(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    result = run_job({"image": b64(face_jpg), "audio": b64(short_wav), "seed": 9})
    assert {"video", "video_type", "seed", "width", "height", "fps", "frames", "duration_s", "timings",
            "warnings"} <= set(result)
    assert {"fetch", "validate", "prepare", "generate", "encode", "mux", "deliver", "total"} <= set(result["timings"])
    assert all(isinstance(v, float) and v >= 0 for v in result["timings"].values())
    assert TINY_MODEL_WARNING in result["warnings"] and PLACEHOLDER_WARNING in result["warnings"]


def test_output_too_large_without_a_bucket(make_runner, make_settings, face_jpg: bytes, short_wav: bytes) -> None:
    run_job = make_runner(make_settings(inline_output_max_bytes=10_000))
    for mode in ("auto", "base64"):
        result = run_job({"image": b64(face_jpg), "audio": b64(short_wav), "output": {"mode": mode}})
        assert result["error_code"] == ErrorCode.OUTPUT_TOO_LARGE.value
        assert "s3Config" in result["error"] and "MB" in result["error"]


def test_inline_limit_is_on_the_base64_size(make_runner, make_settings, face_jpg: bytes, short_wav: bytes,
                                            tmp_path) -> None:
    """The last check before an inline answer (the bitrate cap normally keeps videos well under it)."""
    from hallo3_worker.errors import UserFacingError
    from hallo3_worker.worker.delivery import deliver
    from hallo3_worker.worker.schema import parse_job

    video = tmp_path / "video.mp4"
    video.write_bytes(video_bytes(make_runner(make_settings())({"image": b64(face_jpg), "audio": b64(short_wav)})))
    base64_size = 4 * math.ceil(video.stat().st_size / 3)
    exact = make_settings(inline_output_max_bytes=base64_size)
    spec = parse_job({"id": "limit", "input": {"image": "x", "audio": "y"}}, exact)
    assert deliver(video, spec, exact).video == b64(video.read_bytes())
    with pytest.raises(UserFacingError) as below:
        deliver(video, spec, make_settings(inline_output_max_bytes=base64_size - 1))
    assert below.value.code is ErrorCode.OUTPUT_TOO_LARGE


def test_progress_is_posted_per_segment_on_the_platform(make_runner, make_settings, progress, face_jpg: bytes,
                                                        speech_wav: bytes) -> None:
    run_job = make_runner(make_settings(on_platform=True))
    result = run_job({"image": b64(face_jpg), "audio": b64(speech_wav)})
    assert result["frames"] > 47  # two 47-frame segments
    payloads = [payload for _, payload in progress.calls]
    assert all(job["id"] == "test-job-1" for job, _ in progress.calls)
    stages = [p["stage"] for p in payloads]
    assert stages[:2] == ["fetch", "prepare"] and stages[-2:] == ["encode", "deliver"]
    denoise = [p for p in payloads if p["stage"] == "denoise"]
    assert [(p["segment"], p["num_segments"]) for p in denoise] == [(1, 2), (2, 2)]
    fractions = [p["progress"] for p in payloads]
    assert fractions == sorted(fractions) and all(0 <= f <= 1 for f in fractions)


def test_no_progress_posts_off_the_platform(run_job, progress, face_jpg: bytes, short_wav: bytes) -> None:
    assert "error" not in run_job({"image": b64(face_jpg), "audio": b64(short_wav)})
    assert progress.calls == []


def test_a_failing_progress_post_does_not_fail_the_job(make_runner, make_settings, face_jpg: bytes,
                                                       short_wav: bytes) -> None:
    from fake_pipeline import NoiseTalkingHeadPipeline
    from hallo3_worker.worker.service import Worker

    settings = make_settings(on_platform=True)

    def broken(job: Any, payload: Any) -> None:
        raise ConnectionError("progress endpoint down")

    worker = Worker(settings, NoiseTalkingHeadPipeline(settings), progress_sender=broken)
    result = worker.run({"id": "p", "input": {"image": b64(face_jpg), "audio": b64(short_wav)}})
    assert "error" not in result
