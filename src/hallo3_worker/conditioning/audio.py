"""Speech audio -> Hallo3's per-frame wav2vec2 conditioning.

The chain, in upstream's order (``hallo3/sgm/utils/audio_processor.py:73-126``,
``hallo3/sgm/models/wav2vec.py``, ``hallo3/sample_video.py:161-171,347-373``):

1. :func:`~hallo3_worker.conditioning.decode.decode_audio` decodes anything FFmpeg can decode
   (through PyAV) and rejects unusable input; that module is the one decode path of a job.
2. Optional vocal separation (:mod:`hallo3_worker.conditioning.separation`), then
   :func:`vocals_to_16k` reproduces upstream's ``ffmpeg -ar 16000`` + ``librosa.load(sr=16000)``
   in-process: 16-bit PCM through libswresample, then a float32 channel average. Without
   separation, :func:`mix_to_16k` reproduces ``librosa.load(sr=16000)`` on the original file.
3. :class:`Wav2VecEncoder` normalises the waveform with ``Wav2Vec2FeatureExtractor``, counts
   ``ceil(samples / 16000 * 25)`` video frames, zero-pads the *normalised* waveform to a multiple
   of 49 frames of 640 samples, runs wav2vec2's CNN, interpolates the CNN features linearly
   (``align_corners=True``) to exactly one vector per video frame, then runs the feature
   projection and the transformer encoder, keeping every layer's output: (S, layers, hidden).
4. :func:`window_features` stacks frames i-2..i+2 (indices clamped): (S, 5, layers, hidden).
5. :func:`segment_audio_chunk` cuts the 49-row audio input of one video segment, exactly as
   upstream's segment loop does but addressable by segment index.

Everything that touches the model takes ``device`` and ``dtype`` arguments; nothing here picks a
device by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from hallo3_worker.conditioning.decode import decode_audio, swr_convert
from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import DecodedAudio
from hallo3_worker.lazy import lazy_module

# Loaded on first use: a job that hands over 16 kHz speech without separation needs neither.
librosa = lazy_module("librosa")
sf = lazy_module("soundfile")

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  #: Hz, wav2vec2's input rate
FPS = 25  #: video frames per second; one audio feature vector per video frame
CLIP_FRAMES = 49  #: pixel frames per segment, (13 latent frames - 1) * 4 + 1
MOTION_FRAMES = 2  #: frames each segment re-uses from the previous one
NEW_FRAMES_PER_SEGMENT = CLIP_FRAMES - MOTION_FRAMES  #: 47
WINDOW_RADIUS = 2  #: the +-2 frame context window of ``process_audio_emb``
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")

#: libswresample's internal format for s16 -> s16 in the FFmpeg releases upstream ran with
UPSTREAM_SWR_INTERNAL_FMT = "s16p"
_PCM16_SCALE = 32767.0  # audio-separator's float -> int16 writer multiplies by this and truncates
_PCM16_READ_SCALE = 32768.0  # libsndfile (and so librosa) reads int16 as x / 32768


# ----------------------------------------------------------------------- for the vocal separator


def write_float_wav(path: str | os.PathLike[str], audio: DecodedAudio) -> Path:
    """Write ``audio`` losslessly as a 32-bit float WAV (what the vocal separator reads)."""
    out = Path(path)
    sf.write(out, audio.samples.T, audio.sample_rate, subtype="FLOAT")
    return out


# ------------------------------------------------------------------------------ to 16 kHz mono


def quantize_pcm16(samples: np.ndarray) -> np.ndarray:
    """float -> int16 the way audio-separator's WAV writer does it: ``(x * 32767).astype(int16)``.

    The cast truncates toward zero. ``samples`` is clipped to [-1, 1] first (the separator has
    already peak-normalised its output to 0.9, so this only guards against stray values).
    """
    return (np.clip(samples, -1.0, 1.0) * _PCM16_SCALE).astype(np.int16)


def resample_pcm16(
    pcm: np.ndarray,
    rate_in: int,
    rate_out: int = SAMPLE_RATE,
    *,
    internal_sample_fmt: str | None = UPSTREAM_SWR_INTERNAL_FMT,
) -> np.ndarray:
    """Resample 16-bit PCM like ``ffmpeg -i in.wav -ar RATE out.wav`` does, in-process.

    Runs libswresample through PyAV (its ``aresample`` filter, default filter settings) with s16
    in and out. The one setting that matters is the resampler's internal sample format:
    FFmpeg 4.x/5.x (the Ubuntu 20.04/22.04 packages upstream documents; Debian 12 ships 5.1)
    resample s16 -> s16 in ``s16p``, newer FFmpeg (PyAV 18's bundled 8.1, the 9.0 CLI) in
    ``fltp``; the two differ by up to 2 LSB. The default, ``"s16p"``, is bit-exact with the
    Debian 5.1 CLI; ``None`` leaves the choice to the bundled FFmpeg (bit-exact with the 9.0 CLI).

    Args:
        pcm: int16 samples, shape (channels, num_samples).
        internal_sample_fmt: libswresample ``internal_sample_fmt`` option, or None.
    Returns:
        int16 samples, shape (channels, num_out).
    """
    if pcm.dtype != np.int16 or pcm.ndim != 2:
        raise ValueError(f"expected int16 samples of shape (channels, n), got {pcm.dtype} {pcm.shape}")
    channels = pcm.shape[0]
    layout = {1: "mono", 2: "stereo"}.get(channels)
    if layout is None:
        raise ValueError(f"only mono and stereo PCM is supported here, got {channels} channels")
    if rate_in == rate_out:
        return pcm.copy()
    options = {"internal_sample_fmt": internal_sample_fmt} if internal_sample_fmt else None
    return swr_convert(pcm, rate_in, layout, out_layout=layout, out_rate=rate_out, fmt="s16", options=options, block=4096)


def pcm16_to_mono_float(pcm: np.ndarray) -> np.ndarray:
    """int16 (channels, n) -> float32 (n,), as ``librosa.load(mono=True)`` reads a 16-bit WAV."""
    return np.mean(pcm.astype(np.float32) / _PCM16_READ_SCALE, axis=0, dtype=np.float32)


def vocals_to_16k(vocals: DecodedAudio) -> np.ndarray:
    """Upstream's path for separated vocals, in-process: float32 (n,) at 16 kHz.

    Upstream writes the separator's output as 16-bit WAV, resamples it with ``ffmpeg -ar 16000``
    (16-bit WAV again) and reads it with ``librosa.load(sr=16000)``. Here: :func:`quantize_pcm16`,
    :func:`resample_pcm16`, :func:`pcm16_to_mono_float`.
    """
    pcm = quantize_pcm16(vocals.samples)
    return pcm16_to_mono_float(resample_pcm16(pcm, vocals.sample_rate, SAMPLE_RATE))


def mix_to_16k(audio: DecodedAudio) -> np.ndarray:
    """Upstream's path without separation: ``librosa.load(path, sr=16000)``, float32 (n,).

    librosa averages the channels first and then resamples with soxr (``soxr_hq``).
    """
    mono = audio.mono()
    if audio.sample_rate == SAMPLE_RATE:
        return mono
    return librosa.resample(mono, orig_sr=audio.sample_rate, target_sr=SAMPLE_RATE, res_type="soxr_hq").astype(
        np.float32, copy=False
    )


# ------------------------------------------------------------------------------- frame counts


def frame_count(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Video frames covered by ``num_samples``: ``ceil(num_samples / sample_rate * fps)`` (upstream's formula)."""
    return math.ceil(num_samples / sample_rate * fps)


def padded_frame_count(frames: int, clip_frames: int = CLIP_FRAMES) -> int:
    """``frames`` rounded up to a multiple of ``clip_frames`` (upstream pads before wav2vec)."""
    if frames % clip_frames == 0:
        return frames
    return frames + clip_frames - frames % clip_frames


def num_segments(frames: int, new_frames_per_segment: int = NEW_FRAMES_PER_SEGMENT) -> int:
    """Segments needed to cover ``frames`` video frames: ``ceil(frames / 47)``.

    Upstream calls this with the *padded* frame count and so may run one extra segment that only
    covers padding; pass the real frame count to skip it.
    """
    return math.ceil(frames / new_frames_per_segment)


def pad_waveform(
    values: np.ndarray, frames: int, *, clip_frames: int = CLIP_FRAMES, sample_rate: int = SAMPLE_RATE, fps: int = FPS
) -> tuple[np.ndarray, int]:
    """Append zeros to the normalised waveform so that it covers a multiple of ``clip_frames`` frames.

    Upstream's rule (``audio_processor.py:110-112``): when ``frames % clip_frames != 0``, append
    ``(clip_frames - frames % clip_frames) * (sample_rate // fps)`` zero samples.

    Args:
        values: normalised waveform, shape (n,).
        frames: ``frame_count(n)``.
    Returns:
        (padded waveform of shape (n + pad,), padded frame count).
    """
    padded_frames = padded_frame_count(frames, clip_frames)
    pad = (padded_frames - frames) * (sample_rate // fps)
    if pad == 0:
        return values, frames
    return np.concatenate([values, np.zeros(pad, dtype=values.dtype)]), padded_frames


# ------------------------------------------------------------------------------------ wav2vec2


@dataclasses.dataclass(frozen=True)
class AudioFeatures:
    """wav2vec2 conditioning for one clip.

    Attributes:
        features: (S, layers, hidden) float32 on CPU, one row per video frame of the padded clip.
        windowed: (S, 5, layers, hidden), rows i-2..i+2 of ``features`` with clamped indices.
        audio_length: real frames, ``ceil(duration * 25)``; the output video has this many frames.
        padded_length: S, ``audio_length`` rounded up to a multiple of 49.
    """

    features: torch.Tensor
    windowed: torch.Tensor
    audio_length: int
    padded_length: int

    @property
    def num_segments(self) -> int:
        """Segments that cover the real audio (no all-padding segment)."""
        return num_segments(self.audio_length)

    @property
    def upstream_num_segments(self) -> int:
        """Segments upstream runs (it counts over the padded length)."""
        return num_segments(self.padded_length)


def window_features(features: torch.Tensor, radius: int = WINDOW_RADIUS) -> torch.Tensor:
    """Stack frames i-radius..i+radius for every frame, indices clamped to [0, S-1].

    Args:
        features: (S, ...) per-frame features.
    Returns:
        (S, 2*radius+1, ...) tensor, same dtype and device.
    """
    length = features.shape[0]
    if length == 0:
        raise ValueError("cannot window an empty feature sequence")
    offsets = torch.arange(-radius, radius + 1, device=features.device)
    index = (torch.arange(length, device=features.device)[:, None] + offsets[None, :]).clamp_(0, length - 1)
    return features[index]


def segment_audio_chunk(
    windowed: torch.Tensor,
    segment: int,
    *,
    clip_frames: int = CLIP_FRAMES,
    motion_frames: int = MOTION_FRAMES,
) -> torch.Tensor:
    """The audio rows that video segment ``segment`` is conditioned on.

    Reproduces upstream's loop (``sample_video.py:347-373``) for one index: segment t takes the
    ``clip_frames - motion_frames`` new rows starting at ``t * (clip_frames - motion_frames)``,
    preceded by ``motion_frames`` rows that are zeros for t = 0 and the previous segment's last
    rows otherwise; if the clip runs out, its last row is repeated up to ``clip_frames`` rows.
    Row j therefore holds frame ``t * new - motion + j``, clamped to the last frame, or zeros
    before frame 0.

    Args:
        windowed: (S, ...) windowed features (normally the *padded* sequence).
        segment: 0-based segment index; it must start inside the sequence.
    Returns:
        (clip_frames, ...) tensor, same dtype and device as ``windowed``.
    """
    new_frames = clip_frames - motion_frames
    length = windowed.shape[0]
    if segment < 0 or segment * new_frames >= length:
        raise ValueError(f"segment {segment} starts past the end of {length} audio frames")
    first = segment * new_frames - motion_frames
    frames = torch.arange(first, first + clip_frames, device=windowed.device)
    chunk = windowed[frames.clamp(0, length - 1)]
    before_start = frames < 0
    if bool(before_start.any()):
        chunk[before_start] = 0
    return chunk


def _check_attn_implementation(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")


class Wav2VecEncoder:
    """wav2vec2 feature extraction as Hallo3 runs it (all layers, 25 Hz, padded to whole clips).

    Runs transformers' ``Wav2Vec2Model`` with its CNN (``feature_extractor``) output resampled to
    the video frame rate. The attention kernel is an explicit choice
    (``"sdpa"`` or ``"eager"``); the two agree to float rounding.
    """

    def __init__(
        self,
        model: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        *,
        clip_frames: int = CLIP_FRAMES,
        fps: int = FPS,
    ) -> None:
        if int(feature_extractor.sampling_rate) != SAMPLE_RATE:
            raise ValueError(f"the wav2vec2 feature extractor expects {feature_extractor.sampling_rate} Hz, not 16 kHz")
        if not feature_extractor.do_normalize:
            logger.warning("wav2vec2 preprocessor has do_normalize=false; waveforms are used unnormalised")
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.clip_frames = clip_frames
        self.fps = fps

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> Wav2VecEncoder:
        """Load ``Wav2Vec2Model`` and ``Wav2Vec2FeatureExtractor`` from a local folder (no downloads)."""
        _check_attn_implementation(attn_implementation)
        model = Wav2Vec2Model.from_pretrained(
            os.fspath(model_dir), local_files_only=True, attn_implementation=attn_implementation, dtype=dtype
        )
        model = model.to(device=device, dtype=dtype)
        extractor = Wav2Vec2FeatureExtractor.from_pretrained(os.fspath(model_dir), local_files_only=True)
        return cls(model, extractor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def normalize(self, speech: np.ndarray) -> np.ndarray:
        """Apply the feature extractor (zero mean, unit variance when ``do_normalize``): (n,) -> (n,) float32."""
        values = self.feature_extractor(speech, sampling_rate=SAMPLE_RATE).input_values
        return np.squeeze(np.asarray(values, dtype=np.float32), axis=0)

    def prepare_input(self, speech: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Normalise and pad a 16 kHz mono waveform.

        Args:
            speech: float32 waveform at 16 kHz, shape (n,).
        Returns:
            (padded normalised waveform of shape (n_padded,), real frame count, padded frame count).
        """
        if speech.ndim != 1 or speech.size == 0:
            raise ValueError(f"expected a non-empty mono waveform, got shape {speech.shape}")
        values = self.normalize(speech)
        frames = frame_count(values.shape[0], SAMPLE_RATE, self.fps)
        padded, padded_frames = pad_waveform(values, frames, clip_frames=self.clip_frames, fps=self.fps)
        return padded, frames, padded_frames

    @torch.inference_mode()
    def hidden_states(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Run wav2vec2 with its CNN features resampled to ``num_frames`` frames.

        The model's own forward runs (so every transformers release collects the hidden states
        its way); a forward hook on its CNN replaces the ~50 Hz features with their linear
        interpolation to ``num_frames``, as upstream's wav2vec2 subclass does.

        Args:
            input_values: (1, n) normalised waveform on any device.
            num_frames: frames to interpolate the ~50 Hz CNN output to.
        Returns:
            (num_frames, layers, hidden) on the model's device and dtype: the outputs of every
            transformer layer (the pre-layer embedding is dropped).
        """

        def to_video_rate(module: torch.nn.Module, args: tuple, cnn: torch.Tensor) -> torch.Tensor:
            # (1, conv_dim[-1], T_cnn) -> (1, conv_dim[-1], S)
            return F.interpolate(cnn, size=num_frames, mode="linear", align_corners=True)

        values = input_values.to(device=self.device, dtype=self.dtype)
        handle = self.model.feature_extractor.register_forward_hook(to_video_rate)
        try:
            out = self.model(values, output_hidden_states=True, return_dict=True)
        finally:
            handle.remove()
        if out.hidden_states is None or len(out.hidden_states) != self.num_layers + 1:
            raise RuntimeError("wav2vec2 returned no per-layer hidden states")
        return torch.stack(out.hidden_states[1:], dim=2)[0]  # (1, S, layers, hidden) -> (S, layers, hidden)

    def encode(self, speech: np.ndarray) -> AudioFeatures:
        """16 kHz mono waveform (n,) -> :class:`AudioFeatures` (features on CPU, float32)."""
        padded, frames, padded_frames = self.prepare_input(speech)
        values = torch.from_numpy(padded).unsqueeze(0)
        features = self.hidden_states(values, padded_frames).float().cpu()
        logger.debug("wav2vec2: %d real frames, %d padded, features %s", frames, padded_frames, tuple(features.shape))
        return AudioFeatures(
            features=features,
            windowed=window_features(features),
            audio_length=frames,
            padded_length=padded_frames,
        )


class VocalSeparatorLike(Protocol):
    """Anything with ``separate(audio, job_dir) -> Path`` (see :class:`~.separation.VocalSeparator`)."""

    def separate(self, audio: DecodedAudio, job_dir: Path) -> Path: ...


def speech_to_16k(
    audio: DecodedAudio,
    *,
    job_dir: str | os.PathLike[str],
    separator: VocalSeparatorLike | None = None,
) -> np.ndarray:
    """The waveform wav2vec2 sees: float32 (n,) at 16 kHz, vocals only when ``separator`` is given.

    Raises:
        InputError: ``AUDIO_SILENT`` when separation leaves no vocals at all.
    """
    if separator is None:
        return mix_to_16k(audio)
    vocals_path = separator.separate(audio, Path(job_dir))
    vocals = decode_audio(vocals_path, silence_dbfs=None)
    speech = vocals_to_16k(vocals)
    if not np.any(speech):
        raise InputError(ErrorCode.AUDIO_SILENT, "No voice was found in the audio after separating the vocals.")
    return speech

