"""The one decode-and-validate path for the user's portrait and speech.

The worker calls :func:`decode_inputs` right after fetching the files, before any GPU work, and
hands the result to the pipeline inside the :class:`~hallo3_worker.interface.GenerationRequest`;
``prepare`` and the MP4 mux use it as it is, so each file is decoded once per job. Every check that
can fail on the user's media (decodable, size, length, silence, channel layout) happens here, and
fails with an :class:`~hallo3_worker.errors.InputError` carrying a stable code.

Image (:func:`decode_image`): Pillow (with pillow-heif's plugin for the HEIC/HEIF photos phones take),
first frame, EXIF orientation applied, transparency composited onto white, RGB uint8. High-bit-depth
modes are scaled to 8 bits rather than clipped: 16-bit grey (``I;16*``) and 32-bit integer (``I``)
images by the smallest of 8, 16 or 32 bits that holds their largest value; float (``F``) images in
[0, 1] are multiplied by 255, those in [0, 255] kept, and brighter ones scaled so that their maximum
is 255 (Pillow itself already reduces 16-bit RGB and RGBA to 8 bits per channel). Images down to
``MIN_IMAGE_SIDE`` (64 px) are accepted; under ``SOFT_IMAGE_SIDE`` (256 px) :func:`decode_inputs`
warns that the video will be soft.

Audio (:func:`decode_audio`): PyAV (FFmpeg's libraries), float32 at the stream's own rate. Mono and
stereo are kept as they are (upstream's exact path). More channels are mixed down to stereo by
libswresample with its ITU-style matrix (centre and surrounds at -3 dB, LFE dropped), so the vocal
separator, wav2vec2 and the AAC mux all see at most two channels. A file that states no channel
layout (a WAV without a channel mask, say) is taken to have FFmpeg's default layout for its channel
count, as the ``ffmpeg`` command does, with a warning; a count FFmpeg has no layout for (9 or 11
channels, for example) is rejected with ``AUDIO_LAYOUT_UNSUPPORTED``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import math
import os
import warnings as pywarnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import DecodedAudio, DecodedImage, DecodedInputs
from hallo3_worker.lazy import lazy_module

av = lazy_module("av", "error")  # PyAV loads when audio is first decoded or resampled

logger = logging.getLogger(__name__)

#: Images whose shorter side is below this are rejected (IMAGE_TOO_SMALL); ``HALLO3_MIN_IMAGE_SIDE``.
#: The face detector still has a chance on a 64-pixel face.
MIN_IMAGE_SIDE = 64
#: Images whose shorter side is below this are accepted with a warning that the video will be soft (they
#: are scaled up to the model's 480-pixel canvas); ``HALLO3_SOFT_IMAGE_SIDE``.
SOFT_IMAGE_SIDE = 256
#: More pixels than this are rejected (MEDIA_TOO_LARGE) before decoding; ``HALLO3_MAX_IMAGE_PIXELS``.
MAX_IMAGE_PIXELS = 40_000_000
#: Transparent images are composited onto this colour.
ALPHA_BACKGROUND = (255, 255, 255)
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_UNDECODABLE_AUDIO = "The audio could not be decoded; send WAV, MP3, FLAC, OGG or M4A speech."



@functools.cache
def _register_heif() -> None:
    """HEIC/HEIF for ``Image.open`` (libheif applies the photo's rotation); loaded with the first image.

    pillow-heif is a pinned dependency of the worker; a stack without it (a bare GPU machine running
    the GPU check) still decodes every other format, and says once that HEIC cannot be.
    """
    try:
        import pillow_heif
    except ModuleNotFoundError:
        logger.warning("pillow-heif is not installed: HEIC/HEIF photos cannot be decoded here")
        return
    pillow_heif.register_heif_opener()


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """The checks of :func:`decode_inputs`; the worker fills them from its settings."""

    min_image_side: int = MIN_IMAGE_SIDE
    soft_image_side: int = SOFT_IMAGE_SIDE
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_duration_s: float = 60.0
    min_duration_s: float = 0.2
    silence_dbfs: float = -60.0


# ----------------------------------------------------------------------------------------- image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to an 8-bit "L" image (see module doc)."""
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max(initial=0.0))
    if image.mode == "F":
        scale = 1 / 255 if top <= 1.0 else 1.0 if top <= 255.0 else top / 255
    else:
        bits = next(b for b in (8, 16, 32, 64) if top < 2.0**b)
        scale = (2.0**bits - 1) / 255
    return Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8))


def decode_image(
    source: str | Path | bytes | BinaryIO,
    *,
    min_side: int = MIN_IMAGE_SIDE,
    max_pixels: int = MAX_IMAGE_PIXELS,
    apply_exif_orientation: bool = True,
) -> DecodedImage:
    """Decode an image file to upright RGB uint8 and check its size (see the module docstring).

    Opaque 8-bit images convert exactly as upstream's ``convert("RGB")``; ``apply_exif_orientation=False``
    gives upstream's (unrotated) behaviour. Raises ``InputError`` with IMAGE_UNDECODABLE,
    IMAGE_TOO_SMALL or MEDIA_TOO_LARGE.
    """
    _register_heif()
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise InputError(
                        ErrorCode.MEDIA_TOO_LARGE,
                        f"The image is {width}x{height}; at most {max_pixels:,} pixels are accepted.",
                    )
                img.load()
                fmt, mode = img.format or "", img.mode
                if mode in _HIGH_BIT_MODES:
                    img = _to_8bit(img)
                if apply_exif_orientation:
                    img = ImageOps.exif_transpose(img)
                if img.has_transparency_data:
                    rgba = img.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
                    rgb = Image.alpha_composite(background, rgba).convert("RGB")
                else:
                    rgb = img.convert("RGB")
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(ErrorCode.MEDIA_TOO_LARGE, "The image has too many pixels.") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputError(
            ErrorCode.IMAGE_UNDECODABLE, "The image could not be decoded; send a JPEG, PNG, WebP or HEIC picture."
        ) from None
    array = np.array(rgb, dtype=np.uint8)  # a writable copy
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        raise InputError(
            ErrorCode.IMAGE_TOO_SMALL, f"The image is {width}x{height}; both sides must be at least {min_side} pixels."
        )
    return DecodedImage(array, fmt, mode)


# ----------------------------------------------------------------------------------------- audio


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of float samples in dB relative to full scale (``-inf`` for digital silence)."""
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _source_layout(layout: av.AudioLayout) -> tuple[str, bool]:
    """(layout name to mix down from, whether it was assumed) for a stream of more than two channels."""
    if any(channel.name != "NONE" for channel in layout.channels):
        return layout.name, False
    try:  # "6c" is FFmpeg's default layout for 6 channels (5.1), the one the ffmpeg command guesses
        return av.AudioLayout(f"{layout.nb_channels}c").name, True
    except (ValueError, av.error.FFmpegError):
        raise InputError(
            ErrorCode.AUDIO_LAYOUT_UNSUPPORTED,
            f"The audio has {layout.nb_channels} channels and no channel layout, so it cannot be mixed down; "
            "send mono or stereo speech, or a file that names its layout (such as 5.1).",
        ) from None


def swr_convert(samples: np.ndarray, rate: int, layout: str, *, out_layout: str, out_rate: int, fmt: str = "flt",
                options: dict[str, str] | None = None, block: int = 65536) -> np.ndarray:
    """Run (C, n) samples of packed format ``fmt`` through libswresample: (C_out, m), same dtype.

    Frames are packed because PyAV's planar frames stop at 8 channels. Raises ``ValueError`` or
    ``av.error.FFmpegError`` for a layout libswresample cannot convert.
    """
    resampler = av.AudioResampler(format=fmt, layout=out_layout, rate=out_rate, options=options)
    width = av.AudioLayout(out_layout).nb_channels
    out: list[np.ndarray] = []
    for start in range(0, samples.shape[1], block):
        packed = np.ascontiguousarray(samples[:, start : start + block].T).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(packed, format=fmt, layout=layout)
        frame.sample_rate = rate
        out.extend(o.to_ndarray().reshape(-1, width) for o in resampler.resample(frame))
    out.extend(o.to_ndarray().reshape(-1, width) for o in resampler.resample(None))
    return np.ascontiguousarray(np.concatenate(out).T) if out else np.zeros((width, 0), samples.dtype)


def decode_audio(
    path: str | os.PathLike[str], *, silence_dbfs: float | None = -60.0, limit_s: float | None = None
) -> DecodedAudio:
    """Decode the first audio stream of ``path``: float32 (channels <= 2, n) at the stream's rate.

    Decoding stops once more than ``limit_s`` seconds came out (then ``complete`` is False).

    Raises:
        InputError: ``AUDIO_UNDECODABLE`` when the file cannot be opened or decoded, has no audio
            stream or no samples, or contains non-finite samples; ``AUDIO_LAYOUT_UNSUPPORTED`` for
            more than two channels without a usable layout; ``AUDIO_SILENT`` when the RMS level of
            the channel average is at or below ``silence_dbfs`` (``None`` skips that check).
    """
    chunks: list[np.ndarray] = []
    total, rate, complete = 0, 0, True
    try:
        with av.open(os.fspath(path), metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio file has no audio stream.")
            stream = container.streams.audio[0]
            codec, source = stream.codec_context.name, stream.codec_context.layout
            # Only the sample format changes (to packed float: PyAV's planar frames stop at 8 channels);
            # rate and channel layout come from the first frame.
            resampler = av.AudioResampler(format="flt")
            for frame in container.decode(stream):
                rate = rate or int(frame.sample_rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1, source.nb_channels))  # (n, C)
                    total += out.samples
                if limit_s is not None and total > math.ceil(limit_s * rate):
                    complete = False
                    break
            else:
                chunks.extend(out.to_ndarray().reshape(-1, source.nb_channels) for out in resampler.resample(None))
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, UnicodeDecodeError):
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, _UNDECODABLE_AUDIO) from None
    if not chunks or rate <= 0:
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio file contains no samples.")
    samples = np.ascontiguousarray(np.concatenate(chunks).T, dtype=np.float32)  # (C, n)
    if samples.shape[1] == 0:
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio file contains no samples.")
    if not np.isfinite(samples).all():
        raise InputError(ErrorCode.AUDIO_UNDECODABLE, "The audio contains invalid (non-finite) samples.")
    channels = samples.shape[0]
    layout, assumed = (source.name, False) if channels <= 2 else _source_layout(source)
    if channels > 2:
        try:  # libswresample's default matrix is the ITU-style one
            samples = swr_convert(samples, rate, layout, out_layout="stereo", out_rate=rate)
        except (ValueError, av.error.FFmpegError):
            raise InputError(ErrorCode.AUDIO_LAYOUT_UNSUPPORTED,
                             f"The audio's channel layout ({layout}) cannot be mixed down to stereo.") from None
    decoded = DecodedAudio(samples, rate, codec, channels, layout, assumed, complete)
    level = rms_dbfs(decoded.mono())
    if silence_dbfs is not None and level <= silence_dbfs:
        shown = "digital silence" if math.isinf(level) else f"{level:.0f} dBFS"
        raise InputError(ErrorCode.AUDIO_SILENT, f"The audio is silent ({shown}); send audio with speech in it.")
    logger.debug("Decoded %s audio: %d ch (%s), %d Hz, %.3f s, %.1f dBFS", codec, channels, layout, rate,
                 decoded.duration_s, level)
    return decoded


# ----------------------------------------------------------------------------------------- a job


def decode_inputs(
    image_path: str | os.PathLike[str],
    audio_path: str | os.PathLike[str],
    limits: InputLimits = InputLimits(),
    max_duration_s: float | None = None,
) -> DecodedInputs:
    """Decode and check both files of a job; raise ``InputError`` for anything the pipeline cannot use.

    ``max_duration_s`` is the job's own cap: longer audio is cut to it with a warning. Without it,
    audio longer than ``limits.max_duration_s`` is rejected (AUDIO_TOO_LONG).
    """
    image = decode_image(Path(image_path), min_side=limits.min_image_side, max_pixels=limits.max_image_pixels)
    cap = limits.max_duration_s if max_duration_s is None else min(max_duration_s, limits.max_duration_s)
    audio = decode_audio(audio_path, silence_dbfs=limits.silence_dbfs, limit_s=cap)
    warnings: list[str] = []
    height, width = image.rgb.shape[:2]
    if min(height, width) < limits.soft_image_side:
        warnings.append(f"The image is only {width}x{height}: it is scaled up to the model's canvas, so the video "
                        f"will be soft; a portrait at least {limits.soft_image_side} px on each side gives a "
                        "sharper one.")
    if audio.source_channels > 2:
        how = f"no channel layout, read as {audio.layout}" if audio.layout_assumed else f"{audio.layout}"
        warnings.append(f"The audio's {audio.source_channels} channels ({how}) were mixed down to stereo.")
    if not audio.complete:
        if max_duration_s is None:
            raise InputError(
                ErrorCode.AUDIO_TOO_LONG,
                f"The audio is longer than the {limits.max_duration_s:g} s limit of this endpoint; send shorter "
                "audio, or set max_duration_s to render only its beginning.",
            )
        audio = dataclasses.replace(audio, samples=audio.samples[:, : int(round(cap * audio.sample_rate))])
        warnings.append(f"The audio was cut to its first {cap:g} s (max_duration_s).")
    if audio.duration_s < limits.min_duration_s:
        raise InputError(
            ErrorCode.AUDIO_TOO_SHORT,
            f"The audio is {audio.duration_s:.2f} s long; at least {limits.min_duration_s:g} s is needed.",
        )
    return DecodedInputs(image, audio, tuple(warnings))
