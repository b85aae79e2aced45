"""Run one job through the worker in-process and save the video.

    python scripts/run_job.py test_input.json out/demo.mp4

Reads settings from the environment like the deployed worker (with no weights configured it runs
the embedded tiny model), runs the job in the JSON file (``{"input": {...}}``), writes the MP4 when
it comes back inline and prints the result without the video payload. Exits 1 on a job error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

from hallo3_worker.worker.service import create_worker

logger = logging.getLogger("run_job")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="JSON file holding {'input': {...}}")
    parser.add_argument("output", type=Path, help="where to write the MP4")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    job = json.loads(args.job.read_text())
    job.setdefault("id", "local-" + args.job.stem)
    result = create_worker().run(job)
    if "error" in result:
        logger.error("job failed: %s (%s)", result["error"], result.get("error_code"))
        return 1
    summary = {k: v for k, v in result.items() if k != "video"}
    if result["video_type"] == "base64":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(base64.b64decode(result["video"]))
        summary["video"] = str(args.output)
    else:
        summary["video"] = result["video"]
        logger.info("the video was uploaded; nothing written to %s", args.output)
    print(json.dumps(summary, indent=2))  # the script's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
