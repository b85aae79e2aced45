"""Helpers of the ``hallo3 ui`` browser tests: the ui process, headless Chromium, page waits, screenshots.

Chromium and chromedriver are Debian's (``apt-get install chromium chromium-driver``; ``.ci/run``
installs them); the tests skip only when they are not on the PATH.
"""

from __future__ import annotations

import contextlib
import io
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from client_support import client_env
from worker_support import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_IMG = REPO_ROOT / "docs" / "img"


@contextlib.contextmanager
def serve_ui(api_base: str, log: Path, *extra: str) -> Iterator[str]:
    """``hallo3 ui --url API --port 0`` in its own process; yields the page's address from its first line."""
    command = [sys.executable, "-m", "hallo3_client", "-v", "ui", "--url", api_base, "--port", "0", *extra]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, env=client_env(), stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            raise RuntimeError("hallo3 ui printed no address:\n" + log.read_text(errors="replace")) from None
        assert first.startswith("hallo3 ui: http://127.0.0.1:"), first
        yield first.split()[2].rstrip("/")
    finally:
        stop_process(proc)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def start_chromium(download_dir: Path) -> Any:
    """Headless Chromium with a fake microphone that needs no permission prompt."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    assert paths is not None
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 "--autoplay-policy=no-user-gesture-required", "--mute-audio", "--disable-extensions",
                 "--no-first-run", "--disable-background-networking", "--disable-sync"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir)})
    return webdriver.Chrome(options=options, service=Service(executable_path=paths[1]))


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, *, interval_s: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def save_screenshot(driver: Any, name: str, height: int | None = None) -> Path:
    """The page as a small PNG in docs/img/ (the README shows them): 128 colours, optimised."""
    from PIL import Image

    if height is None:  # the whole page and no more: measured in a short window
        driver.set_window_size(1280, 400)
        height = driver.execute_script(
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight")
    driver.set_window_size(1280, height)
    driver.execute_script("window.scrollTo(0, 0)")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    path = DOCS_IMG / name
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path
