"""What travels to a lent GPU machine: every tracked file plus the wheels in scripts/gpu_wheels.lock.

The machine takes at most 64 MiB; the project keeps 8 MiB of that spare (56 MiB), so a new golden
file or wheel that would crowd the check out is caught here and in tests/test_travel.py first.

    python scripts/travel_size.py        # prints the total and the largest parts; exit 1 over budget
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_BYTES = 56 * 2**20
MIB = 2**20

logger = logging.getLogger("travel_size")


def tracked_sizes(root: Path = ROOT) -> dict[str, int]:
    """Bytes of every file git tracks (as checked out), by path."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    sizes = {}
    for name in names.decode().split("\0"):
        path = root / name
        if name and path.is_file():
            sizes[name] = path.stat().st_size
    return sizes


def wheel_sizes(root: Path = ROOT) -> dict[str, int]:
    """Bytes of each wheel the GPU check carries, from scripts/gpu_wheels.lock."""
    sizes = {}
    for line in (root / "scripts" / "gpu_wheels.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, size, _sha = line.split()
            sizes[name] = int(size)
    return sizes


def summary(root: Path = ROOT) -> dict:
    tracked, wheels = tracked_sizes(root), wheel_sizes(root)
    folders = Counter()
    for name, size in tracked.items():
        parts = name.split("/")
        folders["/".join(parts[:3]) if parts[0] == "tests" and len(parts) > 3 else parts[0]] += size
    total = sum(tracked.values()) + sum(wheels.values())
    return {"tracked": sum(tracked.values()), "wheels": sum(wheels.values()), "total": total,
            "budget": BUDGET_BYTES, "largest": folders.most_common(8)}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    s = summary()
    logger.info("travels to a GPU machine: %.1f MiB tracked + %.1f MiB wheels = %.1f MiB (budget %.0f MiB)",
                s["tracked"] / MIB, s["wheels"] / MIB, s["total"] / MIB, s["budget"] / MIB)
    for name, size in s["largest"]:
        logger.info("  %-28s %6.1f MiB", name, size / MIB)
    return 0 if s["total"] <= s["budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
