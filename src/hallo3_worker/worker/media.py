"""Media checks on the CPU (Pillow, PyAV) and the single H.264 + AAC encode of the result.

* :func:`inspect_image` / :func:`inspect_audio` decode the user's files and raise ``InputError``
  for anything the pipeline cannot use (undecodable, too small/large, too short/long, silent).
* :func:`load_audio_mono` gives mono float samples at a chosen rate (for pipelines).
* :func:`encode_mp4` writes frames plus the ORIGINAL audio as one MP4 (H.264 yuv420p + AAC,
  ``+faststart``), trimming the audio to the video's length.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
from PIL import Image, UnidentifiedImageError

from hallo3_worker.conditioning.audio import rms_dbfs
from hallo3_worker.errors import ErrorCode, InputError

logger = logging.getLogger(__name__)

ANALYSIS_RATE = 16_000  # Hz; the rate speech models (wav2vec2) use
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
_AUDIO_EXTENSIONS = {"wav": ".wav", "mp3": ".mp3", "ogg": ".ogg", "flac": ".flac", "mov": ".m4a", "matroska": ".webm",
                     "aac": ".aac", "aiff": ".aiff", "w64": ".w64"}
_IMAGE_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str  # Pillow's format name, e.g. "JPEG"
    mode: str  # Pillow's mode before conversion, e.g. "RGBA"

    @property
    def extension(self) -> str:
        return _IMAGE_EXTENSIONS.get(self.format, ".img")


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    duration_s: float  # decoded length, at most ``decode_limit_s`` (see inspect_audio)
    complete: bool  # False when decoding stopped at the limit (the file is longer)
    sample_rate: int  # of the source stream
    channels: int
    codec: str
    container: str  # PyAV/FFmpeg format name, e.g. "wav" or "mov,mp4,m4a,3gp,3g2,mj2"
    rms_dbfs: float  # over the decoded part, mono mix

    @property
    def extension(self) -> str:
        return _AUDIO_EXTENSIONS.get(self.container.split(",")[0], ".audio")


@dataclasses.dataclass(frozen=True)
class EncodedVideo:
    path: Path
    width: int
    height: int
    fps: int
    frames: int
    duration_s: float  # frames / fps
    has_audio: bool
    size_bytes: int


# ----------------------------------------------------------------------------------------- image


def inspect_image(path: Path, *, min_side: int, max_pixels: int) -> ImageInfo:
    """Fully decode the image at ``path`` and check its size; raise ``InputError``."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InputError(
                    ErrorCode.MEDIA_TOO_LARGE,
                    f"The image is {width}x{height}; at most {max_pixels:,} pixels are accepted.",
                )
            image.load()
            info = ImageInfo(width, height, image.format or "", image.mode)
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(ErrorCode.MEDIA_TOO_LARGE, "The image has too many pixels.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            ErrorCode.IMAGE_UNDECODABLE, "The image could not be decoded; send a JPEG, PNG or WebP picture."
        ) from None
    if min(width, height) < min_side:
        raise InputError(
            ErrorCode.IMAGE_TOO_SMALL,
            f"The image is {width}x{height}; both sides must be at least {min_side} pixels.",
        )
    return info


def load_rgb(path: Path) -> np.ndarray:
    """The image as RGB uint8, shape (height, width, 3); alpha is composited on white."""
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return np.asarray(image.convert("RGB"))


# ----------------------------------------------------------------------------------------- audio


@dataclasses.dataclass(frozen=True)
class _Decoded:
    samples: np.ndarray  # mono float32, shape (n,)
    complete: bool  # whether the whole stream was decoded
    sample_rate: int  # of the source stream
    channels: int
    codec: str
    container: str


def _decode_mono(path: Path, rate: int, limit_s: float | None) -> _Decoded:
    """Decode the first audio stream to mono float32 at ``rate``; stop after ``limit_s`` seconds.

    PyAV errors propagate to the caller.
    """
    limit = None if limit_s is None else int(math.ceil(limit_s * rate))
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks: list[np.ndarray] = []
    total = 0
    complete = True
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio file has no audio stream.")
        stream = container.streams.audio[0]
        context = stream.codec_context
        source = (int(context.sample_rate or 0), int(context.channels or 0), context.name, container.format.name)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                chunks.append(chunk)
                total += chunk.size
            if limit is not None and total > limit:
                complete = False
                break
        if complete:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if limit is not None and samples.size > limit:
        samples = samples[:limit]
    return _Decoded(samples.astype(np.float32, copy=False), complete, *source)


def load_audio_mono(path: Path, rate: int = ANALYSIS_RATE, limit_s: float | None = None) -> np.ndarray:
    """Mono float32 samples in [-1, 1] at ``rate`` Hz, shape (n,); at most ``limit_s`` seconds."""
    try:
        return _decode_mono(path, rate, limit_s).samples
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError):
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio could not be decoded.") from None


def inspect_audio(path: Path, *, decode_limit_s: float, min_duration_s: float, silence_dbfs: float) -> AudioInfo:
    """Decode at most ``decode_limit_s`` seconds of the audio and check it; raise ``InputError``.

    Length limits that depend on the request (the server maximum, the job's ``max_duration_s``)
    are left to the caller, which sees ``complete=False`` when the file is longer than the limit.
    """
    try:
        decoded = _decode_mono(path, ANALYSIS_RATE, decode_limit_s)
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError):
        raise InputError(
            ErrorCode.AUDIO_UNDECODABLE, "The audio could not be decoded; send WAV, MP3, FLAC, OGG or M4A speech."
        ) from None
    samples = decoded.samples
    duration = samples.size / ANALYSIS_RATE
    if duration == 0:
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio file contains no samples.")
    if duration < min_duration_s:
        raise InputError(
            ErrorCode.AUDIO_TOO_SHORT, f"The audio is {duration:.2f} s long; at least {min_duration_s:g} s is needed."
        )
    level = rms_dbfs(samples)
    if level <= silence_dbfs:
        shown = "digital silence" if math.isinf(level) else f"{level:.0f} dBFS"
        raise InputError(ErrorCode.AUDIO_SILENT, f"The audio is silent ({shown}); send audio with speech in it.")
    return AudioInfo(duration, decoded.complete, decoded.sample_rate, decoded.channels, decoded.codec,
                     decoded.container, level)


def trim_warning(seconds: float) -> str:
    """The warning a job gets when its audio is cut to ``max_duration_s``."""
    return f"The audio was cut to its first {seconds:g} s (max_duration_s)."


# ----------------------------------------------------------------------------------------- encode


def _even(frames: np.ndarray) -> np.ndarray:
    """Crop (N, H, W, 3) frames to even H and W, which yuv420p needs."""
    height, width = frames.shape[1] & ~1, frames.shape[2] & ~1
    return frames[:, :height, :width]


def read_audio_for_mux(audio_path: Path, max_seconds: float) -> tuple[np.ndarray, int, str] | None:
    """Decode the first audio stream of ``audio_path`` for AAC encoding, cut to ``max_seconds``.

    Returns (planar float32 samples of shape (channels, n), sample rate, layout name), or None
    when the file has no audio. The rate is kept when AAC supports it, else 48 kHz.
    """
    with av.open(str(audio_path), metadata_errors="ignore") as source:
        if not source.streams.audio:
            return None
        in_stream = source.streams.audio[0]
        in_rate = int(in_stream.codec_context.sample_rate or 48000)
        rate = in_rate if in_rate in _AAC_RATES else 48000
        layout = "mono" if (in_stream.codec_context.channels or 1) == 1 else "stereo"
        budget = int(round(max_seconds * rate))  # samples allowed into the output
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks: list[np.ndarray] = []
        total = 0
        for frame in source.decode(in_stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
                total += out.samples
            if total >= budget:
                break
        else:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks:
        return None
    samples = np.concatenate(chunks, axis=1)[:, :budget]
    return np.ascontiguousarray(samples, dtype=np.float32), rate, layout


class _AudioTrack:
    """Feeds planar samples to an AAC stream in 1024-sample frames, up to a given time."""

    FRAME = 1024  # AAC frame size in samples

    def __init__(self, container: av.container.OutputContainer, samples: np.ndarray, rate: int, layout: str) -> None:
        self.container = container
        self.samples = samples  # (channels, n) float32
        self.rate = rate
        self.layout = layout
        self.stream = container.add_stream("aac", rate=rate, layout=layout)
        self.stream.bit_rate = 128_000 if layout == "mono" else 192_000
        self.position = 0  # samples already encoded

    def feed_until(self, seconds: float) -> None:
        end = self.samples.shape[1] if math.isinf(seconds) else min(self.samples.shape[1], round(seconds * self.rate))
        while self.position < end:
            stop = min(self.position + self.FRAME, self.samples.shape[1])
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(self.samples[:, self.position : stop]), format="fltp", layout=self.layout
            )
            frame.sample_rate = self.rate
            frame.pts = self.position
            frame.time_base = Fraction(1, self.rate)
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
            self.position = stop

    def finish(self) -> None:
        self.feed_until(math.inf)
        for packet in self.stream.encode(None):
            self.container.mux(packet)


def encode_mp4(
    frames: np.ndarray,
    fps: int,
    audio_path: Path | None,
    out_path: Path,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> EncodedVideo:
    """Encode RGB uint8 frames (N, H, W, 3) at ``fps`` plus the audio of ``audio_path`` into ``out_path``.

    The audio is cut to the video's length (N / fps); the video is never padded or cut.
    """
    frames = _even(frames)
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    duration = count / fps
    audio = read_audio_for_mux(audio_path, duration) if audio_path is not None else None
    with av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf), "preset": preset}
        track = _AudioTrack(container, *audio) if audio is not None else None
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
            frame.pts = index
            for packet in video.encode(frame):
                container.mux(packet)
            if track is not None:  # keep audio and video interleaved in time
                track.feed_until((index + 1) / fps)
        for packet in video.encode(None):
            container.mux(packet)
        if track is not None:
            track.finish()
    return EncodedVideo(out_path, width, height, fps, count, duration, track is not None, out_path.stat().st_size)
