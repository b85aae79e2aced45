"""What travels to a lent GPU machine stays inside its budget (scripts/travel_size.py)."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import travel_size  # noqa: E402


def test_tracked_files_plus_the_check_wheels_fit_56_mib() -> None:
    s = travel_size.summary()
    assert s["tracked"] > 0 and s["wheels"] > 0
    assert s["total"] <= 56 * 2**20, f"{s['total'] / 2**20:.1f} MiB travels; largest parts: {s['largest']}"


def test_the_wheel_lock_carries_diffusers_at_its_pin() -> None:
    pinned = re.search(r"^diffusers==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    wheels = travel_size.wheel_sizes()
    assert f"diffusers-{pinned}-py3-none-any.whl" in wheels, "re-run scripts/gpu_wheels.sh after moving the pin"
    assert any(name.startswith("importlib_metadata-") for name in wheels)


def test_fetched_wheels_match_the_lock() -> None:
    """Where scripts/gpu_wheels.sh has run, .whl/ holds exactly the locked wheels."""
    folder = ROOT / ".whl"
    lines = [line.split() for line in (ROOT / "scripts" / "gpu_wheels.lock").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    if not folder.is_dir():
        assert all(len(parts) == 3 and re.fullmatch(r"[0-9a-f]{64}", parts[2]) for parts in lines)
        return
    assert sorted(p.name for p in folder.glob("*.whl")) == sorted(name for name, _, _ in lines)
    for name, size, sha in lines:
        data = (folder / name).read_bytes()
        assert len(data) == int(size) and hashlib.sha256(data).hexdigest() == sha
