"""The one decode-and-validate path (hallo3_worker.conditioning.decode): images, audio, whole jobs."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pillow_heif
import pytest
import soundfile as sf
from PIL import Image

from hallo3_worker.conditioning import decode as D
from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.tiny import TinyFaceAnalyzer
from media_files import speech_clip, write_multichannel

ASSETS = Path(__file__).resolve().parents[1] / "assets"

pillow_heif.register_heif_opener()  # lets these tests write HEIC photos with Pillow


def decode_image(source, **kwargs) -> np.ndarray:
    return D.decode_image(source, **kwargs).rgb


# ------------------------------------------------------------------------------------------ images


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_decode_image_converts_modes_to_rgb() -> None:
    rgba = Image.new("RGBA", (300, 260), (10, 20, 30, 255))
    rgba.paste((10, 20, 30, 0), (0, 0, 50, 50))  # transparent corner
    rgba.paste((200, 0, 0, 128), (100, 100, 150, 150))  # half-transparent red
    out = decode_image(_encode(rgba, "PNG"))
    assert out.shape == (260, 300, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert tuple(out[10, 10]) == (255, 255, 255)  # transparent -> white (docs/api.md)
    assert tuple(out[200, 200]) == (10, 20, 30)  # opaque pixels unchanged
    a = 128 / 255  # alpha-composited onto white
    np.testing.assert_allclose(out[120, 120], [200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)], atol=1)
    opaque = Image.new("RGBA", (256, 256), (1, 2, 3, 255))
    np.testing.assert_array_equal(decode_image(_encode(opaque, "PNG")), np.asarray(opaque.convert("RGB")))
    grey = Image.new("L", (290, 256), 77)
    assert np.all(decode_image(_encode(grey, "PNG")) == 77)
    pal = Image.new("P", (256, 256), 3)
    pal.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2, 200, 100, 50] + [0] * 756)
    assert tuple(decode_image(_encode(pal, "PNG"))[5, 5]) == (200, 100, 50)
    pal.info["transparency"] = 3
    assert tuple(decode_image(_encode(pal, "PNG", transparency=3))[5, 5]) == (255, 255, 255)


def test_decode_image_applies_exif_orientation(tmp_path) -> None:
    img = Image.new("RGB", (360, 280), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # blue top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    img.save(path, format="JPEG", exif=exif, quality=95)
    upright = decode_image(path)
    assert upright.shape == (360, 280, 3)
    assert upright[5, -6, 2] > 200 and upright[5, -6, 0] < 60  # the blue corner moved to the top-right
    raw = decode_image(path, apply_exif_orientation=False)
    assert raw.shape == (280, 360, 3)


def test_decode_image_rejects_small_undecodable_and_huge() -> None:
    with pytest.raises(InputError) as small:
        decode_image(_encode(Image.new("RGB", (600, 63)), "PNG"))  # docs/api.md: both sides >= 64 px
    assert small.value.code == ErrorCode.IMAGE_TOO_SMALL and "600x63" in small.value.message
    assert decode_image(_encode(Image.new("RGB", (64, 64)), "PNG")).shape == (64, 64, 3)
    with pytest.raises(InputError) as raised_floor:
        decode_image(_encode(Image.new("RGB", (100, 80)), "PNG"), min_side=256)
    assert raised_floor.value.code == ErrorCode.IMAGE_TOO_SMALL
    with pytest.raises(InputError) as bad:
        decode_image(b"definitely not an image")
    assert bad.value.code == ErrorCode.IMAGE_UNDECODABLE
    with pytest.raises(InputError) as truncated:
        decode_image(_encode(Image.new("RGB", (300, 300), 5), "PNG")[:200])
    assert truncated.value.code == ErrorCode.IMAGE_UNDECODABLE
    with pytest.raises(InputError) as huge:
        decode_image(_encode(Image.new("RGB", (300, 300)), "PNG"), max_pixels=50_000)
    assert huge.value.code == ErrorCode.MEDIA_TOO_LARGE
    with pytest.raises(InputError) as default_limit:  # 40 megapixels by default; rejected before decoding
        decode_image(_encode(Image.new("1", (8000, 5001)), "PNG"))
    assert default_limit.value.code == ErrorCode.MEDIA_TOO_LARGE


def test_heic_photos_decode_upright(tmp_path: Path) -> None:
    """HEIC, the default photo format of phones, through pillow-heif; the photo's rotation is applied."""
    img = Image.new("RGB", (360, 280), (200, 20, 20))
    img.paste((0, 0, 255), (0, 0, 40, 30))  # blue top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display, as a phone held upright writes it
    path = tmp_path / "photo.heic"
    img.save(path, format="HEIF", exif=exif.tobytes(), quality=90)
    assert path.read_bytes()[4:12] in (b"ftypheic", b"ftypmif1")  # a real HEIF container
    decoded = D.decode_image(path)
    assert decoded.format == "HEIF" and decoded.rgb.shape == (360, 280, 3)
    upright = decoded.rgb
    assert upright[5, -6, 2] > 200 and upright[5, -6, 0] < 60  # the blue corner moved to the top-right
    assert upright[-6, 5, 0] > 150 and upright[-6, 5, 2] < 80  # the rest is still red
    # The worker registers the HEIF opener itself (this test module registered it to write the file).
    probe = "import sys; from hallo3_worker.conditioning.decode import decode_image; print(decode_image(sys.argv[1]).format)"
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "HEIF", done.stderr[-2000:]


@pytest.fixture(scope="module")
def face_grey() -> np.ndarray:
    """The face asset in 8-bit grey, (H, W) uint8."""
    return np.asarray(Image.open(ASSETS / "face.jpg").convert("L"))


def _face_box(rgb: np.ndarray) -> tuple[int, ...]:
    return tuple(int(v) for v in TinyFaceAnalyzer().analyze(rgb).detection_bbox)


def _high_bit_files(folder: Path, grey: np.ndarray, rgb: np.ndarray) -> dict[str, tuple[Path, np.ndarray]]:
    """Each high-bit-depth file with the 8-bit picture it must decode like."""
    wide_grey, wide_rgb = grey.astype(np.uint16) * 257, rgb.astype(np.uint16) * 257  # 255 -> 65535
    files = {
        "grey16.png": (grey, lambda p: Image.fromarray(wide_grey).save(p)),  # Pillow mode I;16
        "rgb16.png": (rgb, lambda p: cv2.imwrite(str(p), wide_rgb[..., ::-1])),
        "rgba16.png": (rgb, lambda p: cv2.imwrite(str(p), np.dstack([wide_rgb[..., ::-1], np.full_like(grey, 65535, np.uint16)]))),
        "grey32.tif": (grey, lambda p: Image.fromarray(wide_grey.astype(np.int32)).save(p)),  # mode I
        "float.tif": (grey, lambda p: Image.fromarray(grey.astype(np.float32) / 255).save(p)),  # mode F, [0, 1]
    }
    out = {}
    for name, (eight_bit, write) in files.items():
        write(folder / name)
        out[name] = (folder / name, eight_bit)
    return out


def test_high_bit_depth_images_decode_like_their_8_bit_versions(tmp_path: Path, face_grey: np.ndarray) -> None:
    rgb = np.asarray(Image.open(ASSETS / "face.jpg").convert("RGB"))
    files = _high_bit_files(tmp_path, face_grey, rgb)
    modes = {name: Image.open(path).mode for name, (path, _) in files.items()}
    assert modes == {"grey16.png": "I;16", "rgb16.png": "RGB", "rgba16.png": "RGBA", "grey32.tif": "I",
                     "float.tif": "F"}  # the modes Pillow reads them in: each conversion path is taken
    for name, (path, eight_bit) in files.items():
        decoded = decode_image(path)
        expected = np.repeat(eight_bit[..., None], 3, axis=2) if eight_bit.ndim == 2 else eight_bit
        assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1, name
        want = _face_box(expected)
        got = _face_box(decoded)
        assert max(abs(a - b) for a, b in zip(got, want)) <= 2, (name, got, want)


def test_integer_and_float_scaling_rules(tmp_path: Path) -> None:
    ramp = np.linspace(0, 1, 256 * 256).reshape(256, 256)
    cases = {
        "i16_full.png": Image.fromarray((ramp * 65535).astype(np.uint16)),  # 16-bit range
        "i32_8bit.tif": Image.fromarray((ramp * 255).astype(np.int32)),  # 8-bit values in a 32-bit image
        "i32_full.tif": Image.fromarray((ramp * (2**32 - 1)).astype(np.int64).astype(np.int32) & 0x7FFFFFFF),
        "f_wide.tif": Image.fromarray((ramp * 1000).astype(np.float32)),  # floats beyond [0, 1]
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        out = decode_image(tmp_path / name)[..., 0]
        assert out.min() == 0, name
        assert 0 < out.max() <= 255 and out.mean() > 20, (name, out.max(), out.mean())  # never clipped to white
        assert (out == 255).mean() < 0.01, name


# ------------------------------------------------------------------------------------------ audio


@pytest.mark.parametrize("channels", [3, 4, 6, 8])
def test_more_than_two_channels_are_mixed_down_to_stereo(tmp_path: Path, channels: int) -> None:
    path = write_multichannel(tmp_path / f"{channels}ch.wav", channels)
    decoded = D.decode_audio(path)
    assert (decoded.channels, decoded.source_channels, decoded.layout_assumed) == (2, channels, True)
    assert decoded.layout == av.AudioLayout(f"{channels}c").name  # FFmpeg's default layout for the count
    speech = speech_clip(0.6, 16_000)
    for side in decoded.samples:  # both sides carry the speech at least as loud as the front channel
        assert np.corrcoef(side, speech)[0, 1] > 0.99
        assert np.abs(side).max() >= 0.9 * np.abs(speech).max()  # channel 1 has gain 0.92


def test_a_stated_layout_is_used_as_stated(tmp_path: Path) -> None:
    path = write_multichannel(tmp_path / "51.flac", 6, layout="5.1(side)", codec="flac")
    decoded = D.decode_audio(path)
    assert (decoded.channels, decoded.layout, decoded.layout_assumed) == (2, "5.1(side)", False)


def test_mono_and_stereo_are_decoded_unchanged(tmp_path: Path) -> None:
    for channels in (1, 2):
        path = write_multichannel(tmp_path / f"{channels}.wav", channels, subtype="FLOAT")
        reread, _ = sf.read(path, dtype="float32", always_2d=True)
        decoded = D.decode_audio(path)
        np.testing.assert_array_equal(decoded.samples, reread.T)


def test_channels_without_a_known_layout_are_rejected(tmp_path: Path) -> None:
    path = write_multichannel(tmp_path / "9ch.wav", 9)  # FFmpeg has no layout for 9 channels
    with pytest.raises(InputError) as info:
        D.decode_audio(path)
    assert info.value.code is ErrorCode.AUDIO_LAYOUT_UNSUPPORTED
    assert "9 channels" in info.value.message


# ------------------------------------------------------------------------------------------ a job


def test_decode_inputs_cuts_or_rejects_long_audio_and_rejects_short(tmp_path: Path) -> None:
    audio = write_multichannel(tmp_path / "speech.wav", 1, seconds=2.0)
    limits = D.InputLimits(max_duration_s=1.5, min_duration_s=0.5)
    with pytest.raises(InputError) as too_long:
        D.decode_inputs(ASSETS / "face.jpg", audio, limits)
    assert too_long.value.code is ErrorCode.AUDIO_TOO_LONG and "max_duration_s" in too_long.value.message
    cut = D.decode_inputs(ASSETS / "face.jpg", audio, limits, max_duration_s=1.0)
    assert cut.audio.num_samples == 16_000 and cut.warnings == ("The audio was cut to its first 1 s (max_duration_s).",)
    assert cut.image.rgb.shape == (320, 320, 3) and cut.image.format == "JPEG"
    short = write_multichannel(tmp_path / "short.wav", 1, seconds=0.3)
    with pytest.raises(InputError) as too_short:
        D.decode_inputs(ASSETS / "face.jpg", short, limits)
    assert too_short.value.code is ErrorCode.AUDIO_TOO_SHORT


def test_decode_inputs_warns_that_a_small_image_gives_a_soft_video(tmp_path: Path) -> None:
    audio = write_multichannel(tmp_path / "speech.wav", 1, seconds=1.0)
    small = tmp_path / "small.png"
    Image.open(ASSETS / "face.jpg").resize((160, 160)).save(small)
    inputs = D.decode_inputs(small, audio)
    assert inputs.image.rgb.shape == (160, 160, 3)
    assert len(inputs.warnings) == 1 and "160x160" in inputs.warnings[0] and "soft" in inputs.warnings[0]
    assert D.decode_inputs(ASSETS / "face.jpg", audio).warnings == ()  # 320x320: no warning
    with pytest.raises(InputError) as too_small:
        D.decode_inputs(small, audio, D.InputLimits(min_image_side=200))
    assert too_small.value.code is ErrorCode.IMAGE_TOO_SMALL


def test_decode_inputs_warns_about_a_mix_down(tmp_path: Path) -> None:
    audio = write_multichannel(tmp_path / "6ch.wav", 6)
    inputs = D.decode_inputs(ASSETS / "face.jpg", audio)
    assert inputs.warnings == ("The audio's 6 channels (no channel layout, read as 5.1) were mixed down to stereo.",)
