"""The job schema: defaults, types, ranges and the stable error codes."""

from __future__ import annotations

from typing import Any

import pytest

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Framing, Preset
from hallo3_worker.settings import PRESET_CHOICES, BucketSettings, Settings
from hallo3_worker.worker.schema import DEFAULT_PROMPT, OutputMode, parse_job

BASE = {"image": "aGVsbG8=", "audio": "aGVsbG8="}


def parse(settings: Settings, **fields: Any) -> Any:
    return parse_job({"id": "j", "input": {**BASE, **fields}}, settings)


def code_of(settings: Settings, job: dict[str, Any]) -> tuple[ErrorCode, str]:
    with pytest.raises(InputError) as info:
        parse_job(job, settings)
    return info.value.code, info.value.message


def test_defaults(settings: Settings) -> None:
    spec = parse(settings)
    assert spec.prompt == DEFAULT_PROMPT
    assert (spec.steps, spec.guidance) == (50, 3.5)
    assert spec.framing is Framing.UPSTREAM
    assert spec.separate_vocals is True
    assert spec.max_duration_s is None
    assert spec.output.mode is OutputMode.AUTO and spec.output.filename is None
    assert spec.s3_config is None
    assert 0 <= spec.seed <= 2**32 - 1
    assert (spec.preset, spec.cache_threshold, spec.cfg_fraction) == (Preset.EXACT, 0.0, 1.0)


def test_random_seeds_differ(settings: Settings) -> None:
    assert len({parse(settings).seed for _ in range(5)}) > 1


def test_null_means_default(settings: Settings) -> None:
    spec = parse(settings, seed=None, steps=None, guidance=None, prompt=None, framing=None, output=None)
    assert (spec.steps, spec.guidance, spec.prompt) == (50, 3.5, DEFAULT_PROMPT)


def test_explicit_values(settings: Settings) -> None:
    spec = parse(settings, seed=7, steps=12, guidance=6, framing="auto", separate_vocals=False, max_duration_s=3,
                 prompt="  A woman speaks.  ", output={"mode": "base64", "filename": "clip"})
    assert (spec.seed, spec.steps, spec.guidance) == (7, 12, 6.0)
    assert spec.framing is Framing.AUTO and spec.separate_vocals is False
    assert spec.max_duration_s == 3.0 and spec.prompt == "A woman speaks."
    assert spec.output.mode is OutputMode.BASE64 and spec.output.filename == "clip.mp4"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"seeds": 1}, ErrorCode.UNKNOWN_FIELD),
        ({"steps": True}, ErrorCode.INVALID_TYPE),  # a bool is not an integer here
        ({"steps": 2.5}, ErrorCode.INVALID_TYPE),
        ({"steps": "50"}, ErrorCode.INVALID_TYPE),
        ({"steps": 0}, ErrorCode.OUT_OF_RANGE),
        ({"steps": 1}, ErrorCode.OUT_OF_RANGE),
        ({"steps": 101}, ErrorCode.OUT_OF_RANGE),
        ({"guidance": False}, ErrorCode.INVALID_TYPE),
        ({"guidance": 0.5}, ErrorCode.OUT_OF_RANGE),
        ({"guidance": float("nan")}, ErrorCode.OUT_OF_RANGE),
        ({"seed": -1}, ErrorCode.OUT_OF_RANGE),
        ({"seed": 2**32}, ErrorCode.OUT_OF_RANGE),
        ({"seed": "42"}, ErrorCode.INVALID_TYPE),
        ({"prompt": 5}, ErrorCode.INVALID_TYPE),
        ({"prompt": "   "}, ErrorCode.INVALID_INPUT),
        ({"prompt": "x" * 2001}, ErrorCode.OUT_OF_RANGE),
        ({"framing": "crop"}, ErrorCode.INVALID_INPUT),
        ({"separate_vocals": 1}, ErrorCode.INVALID_TYPE),
        ({"max_duration_s": 11}, ErrorCode.OUT_OF_RANGE),  # above the server's 10 s
        ({"max_duration_s": 0.1}, ErrorCode.OUT_OF_RANGE),
        ({"output": "s3"}, ErrorCode.INVALID_TYPE),
        ({"output": {"mode": "volume"}}, ErrorCode.INVALID_INPUT),
        ({"output": {"mode": "auto", "bucket": "x"}}, ErrorCode.UNKNOWN_FIELD),
        ({"output": {"filename": "../../etc/x.mp4"}}, ErrorCode.INVALID_INPUT),
        ({"output": {"mode": "s3"}}, ErrorCode.BUCKET_NOT_CONFIGURED),
        ({"image": None}, ErrorCode.MISSING_FIELD),
        ({"audio": 12}, ErrorCode.INVALID_TYPE),
        ({"audio": "  "}, ErrorCode.INVALID_INPUT),
        ({"preset": "turbo"}, ErrorCode.INVALID_INPUT),
        ({"preset": 2}, ErrorCode.INVALID_TYPE),
        ({"preset": "fast", "cache_threshold": 0.5}, ErrorCode.OUT_OF_RANGE),  # above the safe 0.3
        ({"preset": "fast", "cache_threshold": -0.1}, ErrorCode.OUT_OF_RANGE),
        ({"preset": "fast", "cache_threshold": "0.1"}, ErrorCode.INVALID_TYPE),
        ({"preset": "fast", "cfg_fraction": 0.2}, ErrorCode.OUT_OF_RANGE),  # below the safe 0.4
        ({"preset": "fast", "cfg_fraction": 1.5}, ErrorCode.OUT_OF_RANGE),
        ({"preset": "balanced", "cache_threshold": 0.1}, ErrorCode.INVALID_INPUT),  # fast only
        ({"cfg_fraction": 0.8}, ErrorCode.INVALID_INPUT),
    ],
)
def test_rejections(settings: Settings, fields: dict[str, Any], code: ErrorCode) -> None:
    got, message = code_of(settings, {"id": "j", "input": {**BASE, **fields}})
    assert got is code
    assert message.endswith((".", "?")) and "Traceback" not in message


def test_unknown_field_suggests_the_right_name(settings: Settings) -> None:
    _, message = code_of(settings, {"input": {**BASE, "sed": 3}})
    assert "'sed'" in message and "Did you mean 'seed'?" in message


def test_missing_image_and_non_object_input(settings: Settings) -> None:
    assert code_of(settings, {"input": {"audio": "aGVsbG8="}})[0] is ErrorCode.MISSING_FIELD
    assert code_of(settings, {"input": "hello"})[0] is ErrorCode.INVALID_INPUT
    assert code_of(settings, {})[0] is ErrorCode.INVALID_INPUT


def test_s3_config_is_read_from_the_top_level(settings: Settings) -> None:
    config = {"accessId": "a", "accessSecret": "top-secret", "bucketName": "b", "endpointUrl": "https://s3.example.com"}
    spec = parse_job({"input": {**BASE, "output": {"mode": "s3"}}, "s3Config": config}, settings)
    assert spec.s3_config is not None and spec.s3_config.bucket_name == "b"
    assert "top-secret" not in repr(spec.s3_config)  # never in logs or tracebacks


def test_incomplete_s3_config(settings: Settings) -> None:
    code, message = code_of(settings, {"input": BASE, "s3Config": {"accessId": "a", "endpointUrl": "https://x"}})
    assert code is ErrorCode.INVALID_INPUT and "accessSecret" in message and "bucketName" in message


def test_s3_mode_accepts_the_endpoint_bucket(make_settings: Any) -> None:
    settings = make_settings(bucket=BucketSettings("https://s3.example.com", "k", "s", "b"))
    assert parse(settings, output={"mode": "s3"}).output.mode is OutputMode.S3


def test_presets(make_settings: Any) -> None:
    settings = make_settings(fast_cache_threshold=0.05, fast_cfg_fraction=0.8)
    assert parse(settings, preset=" Balanced ").preset is Preset.BALANCED
    balanced = parse(settings, preset="balanced")
    assert (balanced.cache_threshold, balanced.cfg_fraction) == (0.0, 1.0)  # the fast knobs are off
    fast = parse(settings, preset="fast")  # the endpoint's defaults
    assert (fast.preset, fast.cache_threshold, fast.cfg_fraction) == (Preset.FAST, 0.05, 0.8)
    tuned = parse(settings, preset="fast", cache_threshold=0, cfg_fraction=1)
    assert (tuned.cache_threshold, tuned.cfg_fraction) == (0.0, 1.0)
    assert parse(settings, preset=None, cache_threshold=None).preset is Preset.EXACT
    assert [p.value for p in Preset] == list(PRESET_CHOICES)


def test_a_preset_the_endpoint_does_not_allow_is_rejected(make_settings: Any) -> None:
    settings = make_settings(presets=("exact", "balanced"))
    code, message = code_of(settings, {"input": {**BASE, "preset": "fast"}})
    assert code is ErrorCode.INVALID_INPUT and "not enabled" in message and "exact, balanced" in message
    assert parse(settings, preset="exact").preset is Preset.EXACT
