"""Helpers shared by the worker tests: test media, MP4 probing, loopback servers.

Kept apart from ``conftest.py`` under a name no other test folder uses, so ``from worker_support
import ...`` always finds this file.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
ASSETS = REPO_ROOT / "tests" / "assets"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def voice_like(seconds: float, rate: int = 16_000, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: harmonics of 140 Hz under a 4 Hz syllable envelope."""
    t = np.arange(int(round(seconds * rate))) / rate
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.25 * tone * envelope + noise).astype(np.float32)


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def probe_mp4(data: bytes) -> dict[str, Any]:
    """Container facts of an MP4 held in memory, read with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        info = {
            "format": container.format.name,
            "duration_s": container.duration / 1e6 if container.duration else None,
            "video_codec": video.codec_context.name,
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "fps": float(video.average_rate) if video.average_rate else None,
            "frames": frames,
            "video_duration_s": float(video.duration * video.time_base) if video.duration else None,
            "audio_codec": audio.codec_context.name if audio else None,
            "audio_duration_s": float(audio.duration * audio.time_base) if audio and audio.duration else None,
            "audio_rate": audio.codec_context.sample_rate if audio else None,
        }
    return info


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited early with code {proc.returncode}")
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process this test suite started, by its PID, with bounded waits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def serve_worker_api(tmp: Path, **extra_env: str):
    """``handler.py --rp_serve_api`` (tiny model) on 127.0.0.1:<free port>; yields (base URL, work dir, log file).

    The server sees none of the machine's proxy, bucket, Runpod, Hallo3 or AWS settings, only ``extra_env``.
    """
    import pytest

    work_dir, log = tmp / "work", tmp / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_VARS and not k.startswith(("BUCKET_", "RUNPOD_", "HALLO3_", "AWS_"))}
    env.update({"HALLO3_WORK_DIR": str(work_dir), "HALLO3_VIDEO_PRESET": "ultrafast", "NO_PROXY": "127.0.0.1",
                "UVICORN_LOG_LEVEL": "warning", **extra_env})
    command = [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
               "--rp_api_port", str(port)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, 90, proc)
        except (TimeoutError, RuntimeError):
            pytest.fail("the worker's API server did not start:\n" + log.read_text(errors="replace")[-3000:])
        yield f"http://127.0.0.1:{port}", work_dir, log
    finally:
        stop_process(proc)
