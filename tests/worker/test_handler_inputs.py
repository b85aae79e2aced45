"""Handler-level tests of every input form and of each input error code."""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from worker_support import b64, jpeg_bytes, voice_like, wav_bytes

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import GenerationRequest, PreparedJob
from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline

DATA_JPEG = "data:image/jpeg;base64,"
DATA_WAV = "data:audio/wav;base64,"

pillow_heif.register_heif_opener()  # lets these tests write HEIC photos with Pillow


def assert_ok(result: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in result, result
    assert result["video_type"] == "base64" and len(result["video"]) > 1000
    return result


def assert_error(result: dict[str, Any], code: ErrorCode) -> str:
    assert set(result) == {"error", "error_code"}, result
    assert result["error_code"] == code.value, result
    assert "Traceback" not in result["error"] and "File \"" not in result["error"]
    return result["error"]


# ------------------------------------------------------------------------------------ input forms


def test_base64_inputs(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    result = assert_ok(run_job({"image": b64(face_jpg), "audio": b64(short_wav), "seed": 1}))
    assert (result["width"], result["height"], result["frames"]) == (480, 480, 25)


def test_data_uri_inputs(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    assert_ok(run_job({"image": DATA_JPEG + b64(face_jpg), "audio": DATA_WAV + b64(short_wav)}))


@pytest.mark.parametrize("prefix", ["data:x;base64,", "data:;base64,", "data:image/jpeg;name=face.jpg;base64,",
                                    "DATA:Application/Octet-Stream;base64,"])
def test_data_uri_with_any_declared_type(run_job, face_jpg: bytes, short_wav: bytes, prefix: str) -> None:
    """docs/api.md: the declared type is ignored; the content decides."""
    assert_ok(run_job({"image": prefix + b64(face_jpg), "audio": prefix + b64(short_wav)}))


def test_data_uri_without_base64_is_refused(run_job, short_wav: bytes) -> None:
    message = assert_error(run_job({"image": "data:x,rawtext", "audio": b64(short_wav)}), ErrorCode.INVALID_INPUT)
    assert ";base64," in message


def test_heic_photo_input(run_job, short_wav: bytes) -> None:
    photo = Image.open(io.BytesIO(jpeg_bytes(300, 400)))
    buffer = io.BytesIO()
    photo.save(buffer, format="HEIF", quality=80)
    result = assert_ok(run_job({"image": "data:image/heic;base64," + b64(buffer.getvalue()), "audio": b64(short_wav)}))
    assert (result["width"], result["height"]) == (720, 480)


def test_volume_path_inputs(run_job, settings: Settings, face_jpg: bytes, short_wav: bytes) -> None:
    folder = settings.volume_root / "inputs"
    folder.mkdir()
    (folder / "face.jpg").write_bytes(face_jpg)
    (folder / "speech.wav").write_bytes(short_wav)
    assert_ok(run_job({"image": str(folder / "face.jpg"), "audio": str(folder / "speech.wav")}))
    assert sorted(p.name for p in folder.iterdir()) == ["face.jpg", "speech.wav"]  # read in place, untouched


def test_url_inputs(run_job, http_root, monkeypatch: pytest.MonkeyPatch, face_jpg: bytes, short_wav: bytes,
                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")  # the server is on loopback
    image, audio = http_root.put("face.jpg", face_jpg), http_root.put("speech.wav", short_wav)
    with caplog.at_level(logging.INFO, logger="hallo3_worker"):
        result = assert_ok(run_job({"image": f"{image}?token=SECRET1", "audio": f"{audio}?token=SECRET2"}))
    assert result["frames"] == 25
    assert sorted(http_root.requested) == ["/face.jpg?token=SECRET1", "/speech.wav?token=SECRET2"]
    assert f"url {image}" in caplog.text  # the source is logged...
    assert "SECRET" not in caplog.text  # ...without its query string


def test_mixed_inputs_and_speech_asset(run_job, http_root, monkeypatch, face_jpg: bytes, speech_wav: bytes) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    audio = http_root.put("speech.wav", speech_wav)
    result = assert_ok(run_job({"image": DATA_JPEG + b64(face_jpg), "audio": audio}))
    assert result["frames"] == int(np.ceil(result["audio_duration_s"] * 25 - 1e-6))


# ------------------------------------------------------------------------------------ fetch errors


def test_private_urls_are_blocked_by_default(run_job, http_root, short_wav: bytes) -> None:
    image = http_root.put("face.jpg", b"x")
    message = assert_error(run_job({"image": f"{image}?sig=SECRET", "audio": b64(short_wav)}),
                           ErrorCode.URL_NOT_ALLOWED)
    assert "SECRET" not in message and "127.0.0.1" in message
    assert http_root.requested == []  # refused before connecting


def test_unsupported_url_scheme(run_job, short_wav: bytes) -> None:
    assert_error(run_job({"image": "file:///etc/passwd", "audio": b64(short_wav)}), ErrorCode.URL_NOT_ALLOWED)


def test_url_not_found(run_job, http_root, monkeypatch, short_wav: bytes) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    message = assert_error(run_job({"image": f"{http_root.base}/missing.jpg", "audio": b64(short_wav)}),
                           ErrorCode.MEDIA_FETCH_FAILED)
    assert "404" in message


def test_unreachable_host_is_retried_then_reported(run_job, monkeypatch, short_wav: bytes) -> None:
    from worker_support import free_port

    from hallo3_worker.worker import inputs

    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    monkeypatch.setattr(inputs, "RETRY_DELAY_S", 0.01)
    attempts: list[str] = []
    real_once = inputs._download_once
    monkeypatch.setattr(inputs, "_download_once", lambda url, *a: attempts.append(url) or real_once(url, *a))
    url = f"http://127.0.0.1:{free_port()}/face.jpg"  # nothing listens there
    message = assert_error(run_job({"image": url, "audio": b64(short_wav)}), ErrorCode.MEDIA_FETCH_FAILED)
    assert "the host 127.0.0.1 refused the connection" in message and len(attempts) == inputs.DOWNLOAD_TRIES


def _fake_resolver(monkeypatch: pytest.MonkeyPatch, answers: dict[str, str | None]) -> list[str]:
    """socket.getaddrinfo for the names in ``answers``: an address, or None for a name that does not resolve."""
    import socket

    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        if answers[host] is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_unresolvable_host_is_a_fetch_failure_naming_the_host(run_job, monkeypatch, short_wav: bytes) -> None:
    asked = _fake_resolver(monkeypatch, {"nonexistent.invalid": None})
    result = run_job({"image": "https://nonexistent.invalid/x.jpg?sig=SECRET", "audio": b64(short_wav)})
    message = assert_error(result, ErrorCode.MEDIA_FETCH_FAILED)
    assert "the host nonexistent.invalid could not be resolved" in message and "SECRET" not in message
    assert asked == ["nonexistent.invalid"]  # asked once: a name that does not resolve is not retried


@pytest.mark.parametrize("address", ["10.1.2.3", "127.0.0.1", "169.254.169.254", "100.64.0.1"])
def test_a_name_resolving_to_a_private_address_is_not_allowed(run_job, monkeypatch, short_wav: bytes,
                                                              address: str) -> None:
    _fake_resolver(monkeypatch, {"media.example.com": address})
    message = assert_error(run_job({"image": "https://media.example.com/x.jpg", "audio": b64(short_wav)}),
                           ErrorCode.URL_NOT_ALLOWED)
    assert "media.example.com" in message


def test_a_host_that_does_not_answer_is_a_fetch_failure(make_runner, make_settings, monkeypatch,
                                                        short_wav: bytes) -> None:
    import socket

    from hallo3_worker.worker import inputs

    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    monkeypatch.setattr(inputs, "RETRY_DELAY_S", 0.01)
    run_job = make_runner(make_settings(download_timeout_s=0.3))
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/face.jpg"
        message = assert_error(run_job({"image": url, "audio": b64(short_wav)}), ErrorCode.MEDIA_FETCH_FAILED)
    assert "the host 127.0.0.1 did not answer within 0.3 s" in message


@pytest.mark.parametrize("via", ["url", "sdk_cap", "base64", "volume"])
def test_oversized_media(make_runner, make_settings, http_root, monkeypatch, face_jpg: bytes, short_wav: bytes,
                         via: str) -> None:
    settings = make_settings(max_image_bytes=len(face_jpg) - 1 if via != "sdk_cap" else 10 * len(face_jpg))
    run_job = make_runner(settings)
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    if via == "sdk_cap":
        monkeypatch.setenv("RUNPOD_MAX_DOWNLOAD_BYTES", "1000")  # the SDK's own cap also applies
    url = http_root.put("face.jpg", face_jpg)
    (settings.volume_root / "face.jpg").write_bytes(face_jpg)
    image = {"url": url, "sdk_cap": url, "base64": b64(face_jpg),
             "volume": str(settings.volume_root / "face.jpg")}[via]
    assert_error(run_job({"image": image, "audio": b64(short_wav)}), ErrorCode.MEDIA_TOO_LARGE)


def test_path_outside_the_volume(run_job, short_wav: bytes) -> None:
    message = assert_error(run_job({"image": "/etc/passwd", "audio": b64(short_wav)}), ErrorCode.PATH_NOT_ALLOWED)
    assert "network volume" in message


# ------------------------------------------------------------------------------------ media errors


def test_undecodable_image(run_job, short_wav: bytes) -> None:
    assert_error(run_job({"image": b64(b"this is not an image" * 10), "audio": b64(short_wav)}),
                 ErrorCode.IMAGE_UNDECODABLE)


def test_truncated_image(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    assert_error(run_job({"image": b64(face_jpg[: len(face_jpg) // 3]), "audio": b64(short_wav)}),
                 ErrorCode.IMAGE_UNDECODABLE)


def test_image_too_small(run_job, short_wav: bytes) -> None:
    message = assert_error(run_job({"image": b64(jpeg_bytes(300, 60)), "audio": b64(short_wav)}),
                           ErrorCode.IMAGE_TOO_SMALL)
    assert "300x60" in message and "64" in message


def test_small_image_is_accepted_with_a_warning(run_job, face_jpg: bytes, short_wav: bytes) -> None:
    small = io.BytesIO()
    Image.open(io.BytesIO(face_jpg)).resize((160, 160)).save(small, format="PNG")
    result = assert_ok(run_job({"image": b64(small.getvalue()), "audio": b64(short_wav)}))
    assert (result["width"], result["height"]) == (480, 480)
    assert any("160x160" in w and "soft" in w for w in result["warnings"]), result["warnings"]


def test_image_with_too_many_pixels(make_runner, make_settings, short_wav: bytes) -> None:
    run_job = make_runner(make_settings(max_image_pixels=300 * 300))
    assert_error(run_job({"image": b64(jpeg_bytes(400, 400)), "audio": b64(short_wav)}), ErrorCode.MEDIA_TOO_LARGE)


def test_undecodable_audio(run_job, face_jpg: bytes) -> None:
    assert_error(run_job({"image": b64(face_jpg), "audio": b64(b"RIFF....WAVEnot really" * 20)}),
                 ErrorCode.AUDIO_UNDECODABLE)


def test_audio_too_short(run_job, face_jpg: bytes) -> None:
    assert_error(run_job({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(0.2)))}), ErrorCode.AUDIO_TOO_SHORT)


def test_silent_audio(run_job, face_jpg: bytes) -> None:
    assert_error(run_job({"image": b64(face_jpg), "audio": b64(wav_bytes(np.zeros(16000)))}), ErrorCode.AUDIO_SILENT)
    assert_error(run_job({"image": b64(face_jpg), "audio": b64(wav_bytes(np.full(16000, 1e-5)))}),
                 ErrorCode.AUDIO_SILENT)


def test_audio_too_long(make_runner, make_settings, face_jpg: bytes) -> None:
    run_job = make_runner(make_settings(max_duration_s=2.0))
    message = assert_error(run_job({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(3.0)))}),
                           ErrorCode.AUDIO_TOO_LONG)
    assert "2 s" in message and "max_duration_s" in message


def test_max_duration_cuts_long_audio(make_runner, make_settings, face_jpg: bytes) -> None:
    run_job = make_runner(make_settings(max_duration_s=2.0))
    audio = b64(wav_bytes(voice_like(3.0)))
    result = assert_ok(run_job({"image": b64(face_jpg), "audio": audio, "max_duration_s": 1.2}))
    assert result["frames"] == 30 and result["audio_duration_s"] == pytest.approx(1.2)
    assert any("cut to its first 1.2 s" in w for w in result["warnings"])


def test_portrait_and_landscape_framing(run_job, short_wav: bytes) -> None:
    portrait = b64(jpeg_bytes(300, 450))
    for framing in ("upstream", "auto"):
        result = assert_ok(run_job({"image": portrait, "audio": b64(short_wav), "framing": framing}))
        assert (result["width"], result["height"]) == (720, 480)


def test_rgba_png_is_accepted(run_job, short_wav: bytes) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (320, 320), (200, 100, 50, 128)).save(buffer, format="PNG")
    assert_ok(run_job({"image": b64(buffer.getvalue()), "audio": b64(short_wav)}))


class NoFacePipeline(NoiseTalkingHeadPipeline):
    """prepare() fails the way a face detector reports a picture without a face."""

    def prepare(self, request: GenerationRequest) -> PreparedJob:
        raise InputError(ErrorCode.NO_FACE, "No face was found in the image.")


def test_no_face_passes_through(make_runner, settings: Settings, face_jpg: bytes, short_wav: bytes) -> None:
    run_job = make_runner(settings, NoFacePipeline(settings))
    message = assert_error(run_job({"image": b64(face_jpg), "audio": b64(short_wav)}), ErrorCode.NO_FACE)
    assert message == "No face was found in the image."


def test_schema_errors_come_before_any_fetch(run_job, http_root, monkeypatch, short_wav: bytes) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")
    image = http_root.put("face.jpg", b"x")
    result = run_job({"image": image, "audio": b64(short_wav), "steps": 0})
    assert_error(result, ErrorCode.OUT_OF_RANGE)
    assert http_root.requested == []
