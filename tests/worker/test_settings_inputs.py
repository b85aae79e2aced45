"""Settings parsing and the media-string rules (classification, redaction, volume paths)."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.settings import Settings, SettingsError, load_settings
from hallo3_worker.worker.inputs import SourceKind, classify, describe, fetch_media, redact_url

# ------------------------------------------------------------------------------------- settings


def test_defaults_from_an_empty_environment() -> None:
    settings = load_settings({})
    assert settings == Settings(work_dir=settings.work_dir)
    assert settings.volume_root == Path("/runpod-volume")
    assert settings.weights_dir is None and settings.bucket is None and settings.on_platform is False
    assert settings.device == "auto" and settings.inline_output_max_bytes < 10_000_000
    assert settings.offload == "auto"


def test_values_are_parsed(tmp_path: Path) -> None:
    settings = load_settings({
        "HALLO3_WORK_DIR": str(tmp_path),
        "HALLO3_VOLUME_ROOT": "/data",
        "HALLO3_MAX_DURATION_S": "30",
        "HALLO3_MAX_IMAGE_BYTES": "1000",
        "HALLO3_DEVICE": "cpu",
        "HALLO3_OFFLOAD": "Partial",
        "HALLO3_LOG_LEVEL": "debug",
        "RUNPOD_WEBHOOK_POST_OUTPUT": "https://example.invalid/post",
        "BUCKET_ENDPOINT_URL": "https://s3.example.com",
        "BUCKET_ACCESS_KEY_ID": "key",
        "BUCKET_SECRET_ACCESS_KEY": "very-secret",
        "BUCKET_NAME": "videos",
        "BUCKET_PREFIX": "/out/",
    })
    assert settings.work_dir == tmp_path and settings.volume_root == Path("/data")
    assert settings.max_duration_s == 30.0 and settings.max_image_bytes == 1000
    assert settings.device == "cpu" and settings.log_level == "DEBUG" and settings.on_platform
    assert settings.offload == "partial"
    assert settings.bucket is not None and settings.bucket.bucket_name == "videos" and settings.bucket.prefix == "out"
    assert "very-secret" not in repr(settings)


@pytest.mark.parametrize(
    "env",
    [
        {"HALLO3_MAX_DURATION_S": "long"},
        {"HALLO3_MAX_IMAGE_BYTES": "0"},
        {"HALLO3_MIN_DURATION_S": "100"},
        {"HALLO3_WORK_DIR": "relative/dir"},
        {"HALLO3_LOG_LEVEL": "LOUD"},
        {"HALLO3_VIDEO_CRF": "99"},
        {"HALLO3_OFFLOAD": "on"},
        {"HALLO3_PRESETS": "exact,turbo"},
        {"HALLO3_FAST_CACHE_THRESHOLD": "0.5"},
        {"HALLO3_FAST_CFG_FRACTION": "0.1"},
    ],
)
def test_bad_values_fail_at_start_up(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load_settings(env)


def test_partial_bucket_settings_disable_upload() -> None:
    settings = load_settings({"BUCKET_ENDPOINT_URL": "https://s3.example.com", "BUCKET_ACCESS_KEY_ID": "k",
                              "BUCKET_SECRET_ACCESS_KEY": "s"})  # no BUCKET_NAME
    assert settings.bucket is None


# ---------------------------------------------------------------------------------- media strings


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("https://example.com/a.png?sig=1", SourceKind.URL),
        ("HTTP://example.com/a.png", SourceKind.URL),
        ("ftp://example.com/a.png", SourceKind.URL),
        ("data:image/png;base64,iVBORw0KGgo=", SourceKind.DATA_URI),
        ("/runpod-volume/in/face.png", SourceKind.PATH),
        ("/9j/4AAQSkZJRgABAQ", SourceKind.BASE64),  # a JPEG's base64, not a path
        ("iVBORw0KGgoAAAANSUhEUg==", SourceKind.BASE64),
        ("/" + "A" * 5000, SourceKind.BASE64),  # too long for a path
    ],
)
def test_classify(value: str, kind: SourceKind) -> None:
    assert classify(value) is kind


def test_redaction_drops_credentials_and_query() -> None:
    url = "https://user:pw@bucket.example.com:8443/a/b.wav?X-Amz-Signature=SECRET#frag"
    shown = redact_url(url)
    assert shown == "https://bucket.example.com:8443/a/b.wav"
    assert "SECRET" not in describe(url) and "pw" not in describe(url)
    assert describe("QUJD" * 1000) == "base64 (4000 characters)"


def _fetch(value: str, tmp_path: Path, volume: Path, max_bytes: int = 1000) -> Path:
    return fetch_media(value, "image", tmp_path / "out.bin", max_bytes, volume_root=volume, timeout_s=5).path


def test_volume_paths_must_stay_inside_the_volume(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    (volume / "in").mkdir(parents=True)
    (volume / "in" / "face.png").write_bytes(b"x" * 10)
    (tmp_path / "secret.txt").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.txt", volume / "in" / "link.png")

    assert _fetch(str(volume / "in" / "face.png"), tmp_path, volume) == volume / "in" / "face.png"
    for escaping in (str(volume / "in" / ".." / ".." / "secret.txt"), str(volume / "in" / "link.png"), "/etc/hostname",
                     str(volume)):
        with pytest.raises(InputError) as info:
            _fetch(escaping, tmp_path, volume)
        assert info.value.code is ErrorCode.PATH_NOT_ALLOWED, escaping
    with pytest.raises(InputError) as info:
        _fetch(str(volume / "in" / "missing.png"), tmp_path, volume)
    assert info.value.code is ErrorCode.MEDIA_FETCH_FAILED
    (volume / "in" / "big.png").write_bytes(b"x" * 2000)
    with pytest.raises(InputError) as info:
        _fetch(str(volume / "in" / "big.png"), tmp_path, volume)
    assert info.value.code is ErrorCode.MEDIA_TOO_LARGE


def test_base64_forms(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 2
    text = base64.b64encode(payload).decode()
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    for value in (text, wrapped, "data:application/octet-stream;base64," + text,
                  base64.urlsafe_b64encode(payload).decode().rstrip("=")):
        assert _fetch(value, tmp_path, tmp_path).read_bytes() == payload
    bad_values = [("data:image/png,rawtext", ErrorCode.INVALID_INPUT), ("not base64 at all!", ErrorCode.INVALID_INPUT),
                  (base64.b64encode(b"x" * 1001).decode(), ErrorCode.MEDIA_TOO_LARGE)]
    for bad, code in bad_values:
        with pytest.raises(InputError) as info:
            _fetch(bad, tmp_path, tmp_path)
        assert info.value.code is code


def test_offload_choices_are_auto_plus_the_fitness_policies() -> None:
    from hallo3_worker import fitness
    from hallo3_worker.settings import OFFLOAD_CHOICES

    assert OFFLOAD_CHOICES == ("auto", *fitness.OFFLOAD_POLICIES)


def test_preset_settings() -> None:
    settings = load_settings({"HALLO3_PRESETS": "Fast", "HALLO3_FAST_CACHE_THRESHOLD": "0.05",
                              "HALLO3_FAST_CFG_FRACTION": "0.75"})
    assert settings.presets == ("exact", "fast")  # exact, the default preset, is always allowed
    assert (settings.fast_cache_threshold, settings.fast_cfg_fraction) == (0.05, 0.75)
    assert load_settings({}).presets == ("exact", "balanced", "fast")


def test_speed_settings_are_checked_and_reach_the_pipeline() -> None:
    import torch

    from hallo3_worker.worker.runtime import speedups_for

    cpu = torch.device("cpu")
    assert load_settings({}).compile == "auto" and load_settings({}).attention == "auto"
    for name, value in (("HALLO3_COMPILE", "sometimes"), ("HALLO3_ATTENTION", "fastest")):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: value})
    off = speedups_for(load_settings({"HALLO3_COMPILE": "off", "HALLO3_ATTENTION": "math"}), cpu)
    assert off.compile_blocks is False and off.attention == "math" and off.fused_projections
    assert speedups_for(load_settings({}), cpu).compile_blocks is None  # auto: on for CUDA only
    with pytest.raises(SettingsError, match="HALLO3_ATTENTION=fa3"):
        speedups_for(load_settings({"HALLO3_ATTENTION": "fa3"}), cpu)  # FlashAttention-3 needs a CUDA GPU
