"""``pip install ./client`` into a fresh virtual environment: the command works and torch is not there;
``./client[ui]`` adds ``hallo3 ui`` with its page."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Proxy settings as the test run found them (the autouse fixture hides them from the tests): pip may need them.
_PROXIES = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}


@pytest.mark.slow
def test_client_installs_into_a_fresh_venv_without_torch(tmp_path: Path) -> None:
    source = tmp_path / "client"  # a copy, so that the build leaves nothing in the working tree
    shutil.copytree(REPO_ROOT / "client", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=180)
    python, hallo3 = venv / "bin" / "python", venv / "bin" / "hallo3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(_PROXIES)

    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    shown = subprocess.run([str(hallo3), "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "usage: hallo3" in shown.stdout and "run" in shown.stdout and "cancel" in shown.stdout
    run_help = subprocess.run([str(hallo3), "run", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert run_help.returncode == 0 and "--upload" in run_help.stdout
    version = subprocess.run([str(hallo3), "--version"], env=env, capture_output=True, text=True, timeout=60)
    installed = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('hallo3-client'))"],
                               env=env, capture_output=True, text=True, timeout=60).stdout.strip()
    assert version.returncode == 0 and version.stdout.strip() == f"hallo3 {installed}"

    torch = subprocess.run([str(python), "-c", "import torch"], env=env, capture_output=True, text=True, timeout=60)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    probe = ("import importlib.util as u, hallo3_client; "
             "print([m for m in ('runpod', 'boto3', 'starlette', 'uvicorn') if u.find_spec(m)])")
    absent = subprocess.run([str(python), "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert absent.returncode == 0 and absent.stdout.strip() == "[]", absent.stderr  # boto3 with [s3], the rest with [ui]

    # hallo3 ui without its extra: a usage error that says what to install, and nothing listens
    no_ui = subprocess.run([str(hallo3), "ui", "--url", "http://127.0.0.1:9", "--port", "0"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert no_ui.returncode == 2 and "pip install 'hallo3-client[ui]'" in no_ui.stderr, no_ui.stderr

    # with the extra, the page and its script are in the installed package and served
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{source}[ui]"], env=env,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    ui = subprocess.Popen([str(hallo3), "ui", "--url", "http://127.0.0.1:9", "--port", "0"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ui.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("hallo3 ui: http://127.0.0.1:"), line + ui.stderr.read()  # type: ignore[union-attr]
        page = line.split()[2]
        assert "Generate video" in httpx.get(page, timeout=10).text
        assert httpx.get(page + "static/app.js", timeout=10).status_code == 200
    finally:
        ui.terminate()
        ui.wait(timeout=10)
