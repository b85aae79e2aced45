"""The job schema: turns a raw Runpod job into a validated :class:`JobSpec` or an ``InputError``.

This is the single place that knows the public fields, their types, defaults and ranges; the API
reference in ``docs/api.md`` documents the same rules. The checks are written out explicitly
rather than with ``rp_validator`` so that booleans never pass as numbers, optional fields are range
checked and every failure carries a stable :class:`~hallo3_worker.errors.ErrorCode`.

``null`` for an optional field means "use the default".
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Framing, Preset
from hallo3_worker.settings import CACHE_THRESHOLD_RANGE, CFG_FRACTION_RANGE, Settings

DEFAULT_PROMPT = "A person is talking."
MAX_PROMPT_CHARS = 2000
SEED_MAX = 2**32 - 1  # numpy's seeding range
STEPS_RANGE = (2, 100)  # the zero-SNR schedule needs at least two steps
DEFAULT_STEPS = 50
GUIDANCE_RANGE = (1.0, 20.0)
DEFAULT_GUIDANCE = 3.5
MAX_FILENAME_CHARS = 128
_FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

INPUT_FIELDS = (
    "image",
    "audio",
    "prompt",
    "seed",
    "steps",
    "guidance",
    "framing",
    "separate_vocals",
    "max_duration_s",
    "preset",
    "cache_threshold",
    "cfg_fraction",
    "output",
)
#: Job fields that tune the "fast" preset (only accepted with it).
FAST_FIELDS = ("cache_threshold", "cfg_fraction")
OUTPUT_FIELDS = ("mode", "filename")
S3_CONFIG_FIELDS = ("accessId", "accessSecret", "bucketName", "endpointUrl")


class OutputMode(str, enum.Enum):
    """How the finished video is returned."""

    AUTO = "auto"  # bucket when one is configured, else inline base64 when small enough
    S3 = "s3"  # bucket only; fails early when no bucket is configured
    BASE64 = "base64"  # inline base64 only, even when a bucket is configured


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    mode: OutputMode = OutputMode.AUTO
    filename: str | None = None  # object name in the bucket; ends with ".mp4"


@dataclasses.dataclass(frozen=True)
class S3Config:
    """The request's top-level ``s3Config`` (Runpod's documented per-request bucket)."""

    access_id: str
    access_secret: str
    bucket_name: str
    endpoint_url: str

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"S3Config(endpoint_url={self.endpoint_url!r}, bucket_name={self.bucket_name!r})"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A validated job. ``image``/``audio`` are still unresolved strings (see ``inputs``)."""

    job_id: str
    image: str
    audio: str
    prompt: str
    seed: int
    steps: int
    guidance: float
    framing: Framing
    separate_vocals: bool
    max_duration_s: float | None
    output: OutputOptions
    s3_config: S3Config | None
    preset: Preset = Preset.EXACT
    cache_threshold: float = 0.0  # "fast" only; 0 otherwise
    cfg_fraction: float = 1.0  # "fast" only; 1 otherwise


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def _reject_unknown(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in data if key not in allowed]
    if not unknown:
        return
    key = str(unknown[0])
    hint = difflib.get_close_matches(key, allowed, n=1)
    suggestion = f" Did you mean '{hint[0]}'?" if hint else ""
    names = ", ".join(f"'{k}'" for k in unknown)
    raise InputError(
        ErrorCode.UNKNOWN_FIELD,
        f"Unknown field{'s' if len(unknown) > 1 else ''} {names} in {where}.{suggestion} "
        f"Allowed fields: {', '.join(allowed)}.",
    )


def _wrong_type(name: str, expected: str, value: Any) -> InputError:
    return InputError(ErrorCode.INVALID_TYPE, f"'{name}' must be {expected}, got {_type_name(value)}.")


def _media(data: Mapping[str, Any], name: str) -> str:
    if data.get(name) is None:
        raise InputError(
            ErrorCode.MISSING_FIELD,
            f"'{name}' is required: give a URL, base64 data, a data URI or a path on the network volume.",
        )
    value = data[name]
    if not isinstance(value, str):
        raise _wrong_type(name, "a string (URL, base64, data URI or volume path)", value)
    if not value.strip():
        raise InputError(ErrorCode.INVALID_INPUT, f"'{name}' is empty.")
    return value.strip()


def _prompt(value: Any) -> str:
    if value is None:
        return DEFAULT_PROMPT
    if not isinstance(value, str):
        raise _wrong_type("prompt", "a string", value)
    prompt = value.strip()
    if not prompt:
        raise InputError(ErrorCode.INVALID_INPUT, "'prompt' is empty; leave it out to use the default.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(ErrorCode.OUT_OF_RANGE, f"'prompt' is longer than {MAX_PROMPT_CHARS} characters.")
    return prompt


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "an integer", value)
    if isinstance(value, float):
        if not value.is_integer():
            raise _wrong_type(name, "an integer", value)
        value = int(value)
    if not low <= value <= high:
        raise InputError(ErrorCode.OUT_OF_RANGE, f"'{name}' must be between {low} and {high}, got {value}.")
    return value


def _float_in(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise InputError(ErrorCode.OUT_OF_RANGE, f"'{name}' must be between {low:g} and {high:g}, got {value}.")
    return number


def _seed(value: Any) -> int:
    if value is None:
        return secrets.randbelow(SEED_MAX + 1)
    return _int_in("seed", value, 0, SEED_MAX)


def _framing(value: Any) -> Framing:
    if value is None:
        return Framing.UPSTREAM
    choices = [f.value for f in Framing]
    if not isinstance(value, str):
        raise _wrong_type("framing", f"one of {', '.join(choices)}", value)
    try:
        return Framing(value.strip().lower())
    except ValueError:
        raise InputError(
            ErrorCode.INVALID_INPUT, f"'framing' must be one of {', '.join(choices)}, got '{value[:40]}'."
        ) from None


def _bool(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong_type(name, "true or false", value)
    return value


def _filename(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type("output.filename", "a string", value)
    name = value.strip()
    if not name.lower().endswith(".mp4"):
        name += ".mp4"
    if len(name) > MAX_FILENAME_CHARS or not _FILENAME_RE.match(name):
        raise InputError(
            ErrorCode.INVALID_INPUT,
            f"'output.filename' must be at most {MAX_FILENAME_CHARS} characters of letters, digits, "
            "'.', '_' or '-', starting with a letter or digit.",
        )
    return name


def _output(value: Any) -> OutputOptions:
    if value is None:
        return OutputOptions()
    if not isinstance(value, Mapping):
        raise _wrong_type("output", "an object", value)
    _reject_unknown(value, OUTPUT_FIELDS, "'output'")
    mode_value = value.get("mode")
    mode = OutputMode.AUTO
    if mode_value is not None:
        choices = ", ".join(m.value for m in OutputMode)
        if not isinstance(mode_value, str):
            raise _wrong_type("output.mode", f"one of {choices}", mode_value)
        try:
            mode = OutputMode(mode_value.strip().lower())
        except ValueError:
            raise InputError(
                ErrorCode.INVALID_INPUT, f"'output.mode' must be one of {choices}, got '{mode_value[:40]}'."
            ) from None
    return OutputOptions(mode=mode, filename=_filename(value.get("filename")))


def _s3_config(value: Any) -> S3Config | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _wrong_type("s3Config", "an object", value)
    missing = [k for k in S3_CONFIG_FIELDS if not isinstance(value.get(k), str) or not value[k].strip()]
    if missing:
        raise InputError(
            ErrorCode.INVALID_INPUT,
            f"'s3Config' needs non-empty string fields {', '.join(S3_CONFIG_FIELDS)}; "
            f"missing or invalid: {', '.join(missing)}.",
        )
    endpoint = value["endpointUrl"].strip()
    if not endpoint.startswith(("http://", "https://")):
        raise InputError(ErrorCode.INVALID_INPUT, "'s3Config.endpointUrl' must start with http:// or https://.")
    return S3Config(
        access_id=value["accessId"].strip(),
        access_secret=value["accessSecret"].strip(),
        bucket_name=value["bucketName"].strip(),
        endpoint_url=endpoint,
    )


def _max_duration(value: Any, settings: Settings) -> float | None:
    if value is None:
        return None
    return _float_in("max_duration_s", value, settings.min_duration_s, settings.max_duration_s)


def _preset(value: Any, settings: Settings) -> Preset:
    if value is None:
        return Preset.EXACT
    allowed = ", ".join(settings.presets)
    if not isinstance(value, str):
        raise _wrong_type("preset", f"one of {allowed}", value)
    name = value.strip().lower()
    try:
        preset = Preset(name)
    except ValueError:
        raise InputError(
            ErrorCode.INVALID_INPUT,
            f"'preset' must be one of {', '.join(p.value for p in Preset)}, got '{value[:40]}'.",
        ) from None
    if preset.value not in settings.presets:
        raise InputError(
            ErrorCode.INVALID_INPUT, f"Preset '{preset.value}' is not enabled on this endpoint; it allows {allowed}."
        )
    return preset


def _fast_knobs(data: Mapping[str, Any], preset: Preset, settings: Settings) -> tuple[float, float]:
    """(cache_threshold, cfg_fraction): the job's, the endpoint's defaults for "fast", else (0, 1)."""
    given = [name for name in FAST_FIELDS if data.get(name) is not None]
    if preset is not Preset.FAST:
        if given:
            raise InputError(ErrorCode.INVALID_INPUT, f"'{given[0]}' applies to preset 'fast' only.")
        return 0.0, 1.0
    threshold = data.get("cache_threshold")
    fraction = data.get("cfg_fraction")
    return (
        settings.fast_cache_threshold if threshold is None
        else _float_in("cache_threshold", threshold, *CACHE_THRESHOLD_RANGE),
        settings.fast_cfg_fraction if fraction is None else _float_in("cfg_fraction", fraction, *CFG_FRACTION_RANGE),
    )


def parse_job(job: Mapping[str, Any], settings: Settings) -> JobSpec:
    """Validate a raw Runpod job (``{"id", "input", "s3Config"?...}``); raise ``InputError``."""
    data = job.get("input")
    if not isinstance(data, Mapping):
        raise InputError(ErrorCode.INVALID_INPUT, "The job 'input' must be an object.")
    _reject_unknown(data, INPUT_FIELDS, "the job input")
    output = _output(data.get("output"))
    s3_config = _s3_config(job.get("s3Config"))
    if output.mode is OutputMode.S3 and s3_config is None and settings.bucket is None:
        raise InputError(
            ErrorCode.BUCKET_NOT_CONFIGURED,
            "output.mode 's3' needs a bucket: send 's3Config' with the request or configure BUCKET_* "
            "on the endpoint.",
        )
    preset = _preset(data.get("preset"), settings)
    cache_threshold, cfg_fraction = _fast_knobs(data, preset, settings)
    return JobSpec(
        job_id=str(job.get("id") or "local"),
        image=_media(data, "image"),
        audio=_media(data, "audio"),
        prompt=_prompt(data.get("prompt")),
        seed=_seed(data.get("seed")),
        steps=_int_in("steps", DEFAULT_STEPS if data.get("steps") is None else data["steps"], *STEPS_RANGE),
        guidance=_float_in(
            "guidance", DEFAULT_GUIDANCE if data.get("guidance") is None else data["guidance"], *GUIDANCE_RANGE
        ),
        framing=_framing(data.get("framing")),
        separate_vocals=_bool("separate_vocals", data.get("separate_vocals"), True),
        max_duration_s=_max_duration(data.get("max_duration_s"), settings),
        output=output,
        s3_config=s3_config,
        preset=preset,
        cache_threshold=cache_threshold,
        cfg_fraction=cfg_fraction,
    )
