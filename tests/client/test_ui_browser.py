"""``hallo3 ui`` driven in a real headless Chromium against the worker's real local API (tiny model).

One worker API server (the client tests' session fixture), one ``hallo3 ui`` process and one
browser serve the whole module. The worker's local API shows no progress while a job runs, so
progress, segments as they arrive and Cancel are driven against the scripted Runpod-shaped API.
The tests save the screenshots that the README shows (``docs/img/``).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from client_support import FakeRunpodApi
from PIL import Image
from ui_support import chromium_paths, save_screenshot, serve_ui, start_chromium, wait_for
from worker_support import voice_like, wav_bytes

from hallo3_worker.errors import InputError
from hallo3_worker.settings import load_settings
from hallo3_worker.worker.schema import parse_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium_paths() is None,
                       reason="Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"),
]

AUDIO_S = 2.2  # two segments of the tiny model
FRAME_S = 1 / 25 + 1e-6  # one frame at 25 fps (and float rounding)
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ui(worker_api, tmp_path_factory) -> Iterator[str]:
    with serve_ui(worker_api.base, tmp_path_factory.mktemp("ui") / "ui.log") as url:
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Iterator[Any]:
    browser = start_chromium(tmp_path_factory.mktemp("downloads"))
    browser.set_script_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ui-media") / "speech.wav"
    path.write_bytes(wav_bytes(voice_like(AUDIO_S)))
    return path


def _el(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def _open(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_for(lambda: driver.execute_script("return document.body.dataset.ready === '1'"), 30, "the page to start")


def _fill(driver: Any, **values: str) -> None:
    for element_id, value in values.items():
        field = _el(driver, element_id)
        field.clear()
        if value:
            field.send_keys(value)


def _choose_files(driver: Any, image: Path, audio: Path | None) -> None:
    _el(driver, "image-input").send_keys(str(image))
    wait_for(lambda: driver.execute_script(
        "const p = document.getElementById('image-preview'); return !p.hidden && p.complete && p.naturalWidth > 0"),
        15, "the portrait's preview")
    if audio is not None:
        _el(driver, "audio-input").send_keys(str(audio))
        wait_for(lambda: _el(driver, "audio-preview").is_displayed(), 15, "the audio's preview")


def _fast_options(driver: Any, seed: str = "") -> None:
    _fill(driver, seed=seed, steps="2")
    if _el(driver, "separate-vocals").is_selected():
        _el(driver, "separate-vocals").click()


def _wait_for_end(driver: Any, previous_job: str | None = None) -> str:
    """Wait until the page shows a result (a job other than ``previous_job``) or an error; 'result' or 'error'."""
    def ended() -> str | None:
        if _el(driver, "job-error").is_displayed():
            return "error"
        video = _el(driver, "result-video")
        if _el(driver, "result").is_displayed() and video.get_attribute("data-job-id") != previous_job:
            return "result"
        return None
    return wait_for(ended, JOB_TIMEOUT_S, "the job to end in the page", interval_s=0.5)


def _play_to_end(driver: Any) -> dict[str, float]:
    """Play the result's video from the start in the page; its duration and how far it played."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const v = document.getElementById('result-video');
        const finish = () => done({duration: v.duration, ended: v.ended, played: v.played.length ? v.played.end(v.played.length - 1) : 0,
                                   width: v.videoWidth, error: v.error ? v.error.code : 0});
        const go = () => { v.currentTime = 0; v.onended = finish; v.onerror = finish; v.play().catch((e) => done({error: String(e)})); };
        if (v.readyState >= 1) go(); else { v.onloadedmetadata = go; v.onerror = finish; }
    """)


def _worker_message(**fields: Any) -> str:
    """What the worker's own job schema says about these fields."""
    with pytest.raises(InputError) as refused:
        parse_job({"input": {"image": "x", "audio": "y", **fields}}, load_settings({}))
    return refused.value.message


def test_page_runs_a_job_plays_it_and_reruns_its_seed(ui, driver, face_path, speech) -> None:
    _open(driver, ui)
    save_screenshot(driver, "ui-empty.png")
    assert "Jobs go to http://127.0.0.1:" in _el(driver, "target").text

    # invalid values are refused in the page, in the worker's own words, and nothing is sent
    _fill(driver, seed="-1", steps="2.5", guidance="25")
    driver.execute_script("document.getElementById('prompt').value = 'a'.repeat(2001)")
    _el(driver, "run-button").click()
    shown = [item.text for item in _el(driver, "form-errors").find_elements("tag name", "li")]
    expected = [_worker_message(prompt="a" * 2001), _worker_message(seed=-1), _worker_message(steps=2.5),
                _worker_message(guidance=25)]
    assert shown == [*expected, "Choose a portrait image.", "Choose an audio file or record one."]
    assert expected[1] == "'seed' must be between 0 and 4294967295, got -1."
    assert not _el(driver, "job-panel").is_displayed()

    # a job with the API's random seed
    _fill(driver, guidance="3.5", prompt="A person is talking.")
    _fast_options(driver)
    _choose_files(driver, face_path, speech)
    _el(driver, "run-button").click()
    assert _wait_for_end(driver) == "result", _el(driver, "job-error").text
    first_job = _el(driver, "result-video").get_attribute("data-job-id")
    seed = _el(driver, "result-seed").text
    assert seed.isdigit()
    played = _play_to_end(driver)
    assert played.get("error") == 0 and played["ended"], played
    assert abs(played["duration"] - AUDIO_S) <= FRAME_S, played
    assert abs(played["played"] - played["duration"]) <= FRAME_S and played["width"] > 0, played
    assert "tiny random-weight model" in _el(driver, "result-warnings").text
    chart = _el(driver, "timings-chart").text
    assert "generate" in chart and "total" in chart
    save_screenshot(driver, "ui-result.png")
    download = _el(driver, "download-link").get_attribute("href")
    first_video = httpx.get(download, timeout=30)
    assert first_video.headers["content-disposition"].startswith("attachment")

    # the seed shown is the one the result carries: running again with it gives the same file
    _el(driver, "rerun-button").click()
    assert _wait_for_end(driver, previous_job=first_job) == "result", _el(driver, "job-error").text
    assert _el(driver, "result-seed").text == seed
    second = httpx.get(_el(driver, "download-link").get_attribute("href"), timeout=30)
    assert second.content == first_video.content and len(second.content) > 1000

    # the history of this browser survives a reload and re-opens a result
    _open(driver, ui)
    items = _el(driver, "history").find_elements("tag name", "li")
    assert [i.get_attribute("data-id") for i in items][1] == first_job
    items[1].find_element("tag name", "button").click()
    wait_for(lambda: _el(driver, "result").is_displayed(), 15, "the earlier result")
    assert _el(driver, "result-video").get_attribute("data-job-id") == first_job
    assert abs(_play_to_end(driver)["duration"] - AUDIO_S) <= FRAME_S


def test_blank_image_shows_the_worker_error(ui, driver, speech, tmp_path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (512, 512), (128, 128, 128)).save(blank)
    _open(driver, ui)
    _fast_options(driver)
    _choose_files(driver, blank, speech)
    _el(driver, "run-button").click()
    assert _wait_for_end(driver) == "error"
    assert _el(driver, "job-error").text == "No face was found in the image."
    assert not _el(driver, "result").is_displayed()

    # an earlier result whose URL has expired says so
    driver.execute_script("""localStorage.setItem('hallo3-ui-history', JSON.stringify([{id: 'gone-1', at: Date.now(),
        seed: 5, duration_s: 1, prompt: 'p', timings: {}, warnings: [],
        video_url: 'https://bucket.example.com/gone-1.mp4?X-Amz-Date=20200101T000000Z&X-Amz-Expires=60',
        video_expires_at: 1577836860}]))""")
    _open(driver, ui)
    _el(driver, "history").find_element("tag name", "button").click()
    note = wait_for(lambda: _el(driver, "history-note").is_displayed() and _el(driver, "history-note").text, 10,
                    "the expiry note")
    assert note.startswith("The result's URL expired on ")
    assert not _el(driver, "result").is_displayed()
    driver.execute_script("localStorage.clear()")


def test_microphone_recording_makes_a_job_that_completes(ui, driver, face_path) -> None:
    _open(driver, ui)
    _fast_options(driver, seed="11")
    _choose_files(driver, face_path, None)
    _el(driver, "record-button").click()
    wait_for(lambda: "Stop" in _el(driver, "record-button").text, 10, "the recording to start")
    time.sleep(1.6)
    _el(driver, "record-button").click()
    name = wait_for(lambda: _el(driver, "audio-name").text.startswith("recording (") and _el(driver, "audio-name").text,
                    10, "the recording")
    recorded_s = float(name.split("(")[1].split()[0])
    assert recorded_s >= 1.5
    _el(driver, "run-button").click()
    assert _wait_for_end(driver) == "result", _el(driver, "job-error").text
    assert _el(driver, "result-seed").text == "11"
    played = _play_to_end(driver)
    assert played["ended"] and played["error"] == 0, played
    assert 1.0 <= played["duration"] <= recorded_s + 0.5, (played, recorded_s)


# ------------------------------------------------------------------ progress, segments, cancel


def _mp4(frames: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(frames):
            picture = np.full((64, 64, 3), colour, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_progress_segments_and_cancel_from_a_runpod_shaped_api(driver, face_path, speech, tmp_path) -> None:
    with FakeRunpodApi(job_id="job-seg") as api:
        seg = [api.file_url(f"s{i}.mp4", _mp4(25, (200, 40 * i, 40))) for i in range(2)]
        whole = api.file_url("whole.mp4", _mp4(50, (0, 120, 200)))
        running = {"status": "IN_PROGRESS"}
        api.statuses = [
            {"status": "IN_QUEUE"},
            *[{**running, "output": {"stage": "denoise", "progress": 0.1, "segment": 1, "num_segments": 2}}] * 2,
            *[{**running, "output": {"stage": "segment_ready", "progress": 0.4, "segment": 1, "num_segments": 2,
                                     "segment_urls": seg[:1]}}] * 3,
            *[{**running, "output": {"stage": "denoise", "progress": 0.6, "segment": 2, "num_segments": 2,
                                     "segment_urls": seg[:1]}}] * 3,
            *[{**running, "output": {"stage": "segment_ready", "progress": 0.9, "segment": 2, "num_segments": 2,
                                     "segment_urls": seg}}] * 3,
            {"status": "COMPLETED", "output": {"video": whole, "video_type": "url", "seed": 123, "duration_s": 2.0,
                                               "frames": 50, "width": 64, "height": 64, "fps": 25,
                                               "timings": {"fetch": 0.1, "generate": 1.5, "total": 2.0},
                                               "warnings": ["a warning from the worker"]}},
        ]
        with serve_ui(api.base, tmp_path / "ui.log") as url:
            _open(driver, url)
            _choose_files(driver, face_path, speech)
            _el(driver, "run-button").click()
            wait_for(lambda: _el(driver, "job-segment").text == "segment 1/2", 30, "segment 1/2 in the page")
            left = wait_for(lambda: _el(driver, "job-left").text, 30, "the time left")
            assert left.startswith("about ") and left.endswith(" left")
            assert _el(driver, "job-elapsed").text.startswith("elapsed 0:0")
            wait_for(lambda: driver.execute_script(
                "const v = document.getElementById('segment-player'); return v.dataset.index === '0' && v.readyState >= 1"),
                30, "the first segment playing")
            _el(driver, "cancel-button").click()
            wait_for(lambda: "Cancel requested: the job is CANCELLED." in _el(driver, "cancel-message").text, 15,
                     "the cancel answer")
            wait_for(lambda: len(_el(driver, "segment-list").find_elements("tag name", "li")) == 2, 30,
                     "the second segment")
            assert _wait_for_end(driver) == "result"
            assert _el(driver, "result-seed").text == "123"
            assert abs(_play_to_end(driver)["duration"] - 2.0) <= FRAME_S
            assert "a warning from the worker" in _el(driver, "result-warnings").text
        assert "POST /cancel/job-seg" in api.paths()
        fetched = [p for p in api.paths() if p.startswith("GET /files/")]
        assert fetched == ["GET /files/s0.mp4", "GET /files/s1.mp4", "GET /files/whole.mp4"]
        sent = next(r for r in api.requests if r.path == "/run").json()["input"]
        assert sent["image"].startswith("data:image/jpeg;base64,") and "seed" not in sent
