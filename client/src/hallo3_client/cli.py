"""The ``hallo3`` command: run a job on an endpoint and save the MP4, show a job's status, cancel a job.

Exit codes: 0 success; 1 the job failed, was cancelled or timed out, or the API could not be used;
2 a usage error (bad option, missing file, request over the size limit; nothing was sent);
130 interrupted by Ctrl-C (after asking the endpoint to cancel the job).

Printing is this module's job: results go to stdout, progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hallo3_client import __version__
from hallo3_client.client import Hallo3Client, JobResult, JobStatus
from hallo3_client.errors import Hallo3Error, Interrupted, JobFailed, UsageError
from hallo3_client.media import inline_media, resolve_media, uploaded_media
from hallo3_client.progress import ProgressDisplay
from hallo3_client.ui_command import add_ui_parser, cmd_ui

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The worker's documented values (docs/api.md): checked here so that a typo never reaches the endpoint.
FRAMINGS = ("upstream", "auto")
PRESETS = ("exact", "balanced", "fast")
OUTPUT_MODES = ("auto", "s3", "base64")
CACHE_THRESHOLD_RANGE = (0.0, 0.3)
CFG_FRACTION_RANGE = (0.4, 1.0)
_MAIN_TIMINGS = ("fetch", "validate", "prepare", "generate", "encode", "mux", "deliver", "total")


def _error(text: str) -> None:
    print(f"hallo3: {text}", file=sys.stderr)


def _number_in(low: float, high: float) -> Any:
    """An argparse type: a float between ``low`` and ``high`` (a usage error otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}-{high:g}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hallo3",
        description="Send a portrait and speech to a Hallo3 endpoint and save the talking-head MP4.",
        epilog="Exit codes: 0 done, 1 job failed or API error, 2 usage error, 130 interrupted.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests and retries to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = argparse.ArgumentParser(add_help=False)
    target = api.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", metavar="ID",
                        help="Runpod endpoint id (https://api.runpod.ai/v2/ID); the key comes from RUNPOD_API_KEY")
    target.add_argument("--url", metavar="URL",
                        help="any API base with Runpod's /run and /status routes, e.g. http://localhost:8000 "
                             "for handler.py --rp_serve_api (RUNPOD_API_KEY is sent when set)")
    api.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds per request (default 30)")
    api.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="log requests and retries to stderr")

    run = commands.add_parser("run", parents=[api], help="run a job and save the video",
                              description="Run a job, follow its progress and save the video.")
    run.add_argument("--image", required=True, help="portrait: a local file or an http(s) URL")
    run.add_argument("--audio", required=True, help="speech: a local file or an http(s) URL")
    run.add_argument("-o", "--output", metavar="OUT.mp4", help="where to save the video (default: <job id>.mp4)")
    run.add_argument("--prompt", help='text for the model (worker default: "A person is talking.")')
    run.add_argument("--seed", type=int, help="0-4294967295; the same seed gives the same video")
    run.add_argument("--steps", type=int, help="denoising steps per segment, 2-100 (worker default 50)")
    run.add_argument("--guidance", type=float, help="classifier-free guidance, 1-20 (worker default 3.5)")
    run.add_argument("--framing", choices=FRAMINGS,
                     help="upstream (default) or auto (portrait images are fitted whole)")
    run.add_argument("--preset", choices=PRESETS, help="speed preset: exact (default), balanced or fast")
    run.add_argument("--cache-threshold", type=_number_in(*CACHE_THRESHOLD_RANGE), metavar="X",
                     help="with --preset fast: step-cache threshold, 0-0.3 (worker default 0.1; 0 turns it off)")
    run.add_argument("--cfg-fraction", type=_number_in(*CFG_FRACTION_RANGE), metavar="X",
                     help="with --preset fast: share of steps with full guidance, 0.4-1 (worker default 0.6)")
    run.add_argument("--separate-vocals", action=argparse.BooleanOptionalAction, default=None,
                     help="isolate the voice before computing audio features (worker default: on)")
    run.add_argument("--max-duration", type=float, metavar="S", dest="max_duration_s",
                     help="render only the first S seconds of the audio")
    run.add_argument("--output-mode", choices=OUTPUT_MODES,
                     help="how the worker returns the video: auto (default), s3 or base64")
    run.add_argument("--output-filename", metavar="NAME", help="object name in the endpoint's bucket")
    run.add_argument("--upload", metavar="s3://BUCKET/PREFIX",
                     help="upload local files to your bucket (boto3, standard AWS_* settings) and send "
                          "presigned URLs; needed when the files are too large to send inline")
    run.add_argument("--poll-interval", type=float, default=1.0, metavar="S", help="seconds between status polls")
    run.add_argument("--json", action="store_true",
                     help="print the result (without the video) as JSON, with saved_to: where the MP4 went")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    status = commands.add_parser("status", parents=[api], help="show a job's status (as JSON)",
                                 description="Show a job's status as JSON; save its video with -o.")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("-o", "--output", metavar="OUT.mp4", help="save the video when the job has completed")

    cancel = commands.add_parser("cancel", parents=[api], help="cancel a job", description="Cancel a job.")
    cancel.add_argument("job_id", metavar="JOB_ID")
    add_ui_parser(commands, api)
    return parser


def make_client(args: argparse.Namespace) -> Hallo3Client:
    options: dict[str, Any] = {"timeout": args.timeout}
    if getattr(args, "poll_interval", None) is not None:
        options["poll_interval"] = args.poll_interval
    if args.endpoint:
        return Hallo3Client.for_endpoint(args.endpoint, **options)
    return Hallo3Client(args.url, os.environ.get("RUNPOD_API_KEY") or None, **options)


def job_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job input besides the media: only what was given, so the worker's defaults apply."""
    fields = {name: getattr(args, name) for name in
              ("prompt", "seed", "steps", "guidance", "framing", "preset", "cache_threshold", "cfg_fraction",
               "separate_vocals", "max_duration_s")}
    output = {"mode": args.output_mode, "filename": args.output_filename}
    fields["output"] = {k: v for k, v in output.items() if v is not None} or None
    return {k: v for k, v in fields.items() if v is not None}


def _print_failure(err: JobFailed) -> None:
    _error(f"job {err.job_id} {err.status}")
    print(f"error: {err.error}", file=sys.stderr)
    print(f"error_code: {err.error_code or '(not reported by this API)'}", file=sys.stderr)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _print_result(result: JobResult) -> None:
    out = result.output
    size = result.path.stat().st_size if result.path else int(out.get("size_bytes") or 0)
    details = [_size(size)]
    if out.get("width") and out.get("height"):
        details.append(f"{out['width']}x{out['height']}")
    if out.get("fps"):
        details.append(f"{out['fps']} fps")
    if isinstance(out.get("duration_s"), (int, float)):
        details.append(f"{out['duration_s']:.2f} s")
    if "has_audio" in out:
        details.append("with audio" if out["has_audio"] else "no audio")
    print(f"saved {result.path} ({', '.join(details)})")
    print(f"seed: {result.seed}")
    timings = result.timings
    shown = [k for k in _MAIN_TIMINGS if k in timings] or sorted(timings)
    if shown:
        print("timings: " + ", ".join(f"{k} {float(timings[k]):.2f} s" for k in shown))
    if result.delay_time_ms is not None or result.execution_time_ms is not None:
        queue = f"{(result.delay_time_ms or 0) / 1000:.1f} s in the queue"
        worker = f"{(result.execution_time_ms or 0) / 1000:.1f} s on the worker"
        print(f"endpoint: {queue}, {worker}")
    for warning in result.warnings:
        _error(f"warning: {warning}")


def cmd_run(args: argparse.Namespace) -> int:
    if (args.cache_threshold is not None or args.cfg_fraction is not None) and args.preset != "fast":
        raise UsageError("--cache-threshold and --cfg-fraction tune --preset fast; add --preset fast.")
    output = Path(args.output).expanduser() if args.output else None
    if output is not None and output.is_dir():
        raise UsageError(f"-o {args.output}: is a folder; give a file name such as {output / 'out.mp4'}.")
    media = [resolve_media("image", args.image), resolve_media("audio", args.audio)]
    fields = job_fields(args)
    with make_client(args) as client:
        if args.upload:
            job = uploaded_media(fields, media, args.upload)
        else:
            job = inline_media(fields, media, client.max_body_bytes)  # refuses before any request when too large
        display = ProgressDisplay(sys.stderr, tty=False if args.quiet else None)
        with display:
            result = client.run(
                job,
                on_update=None if args.quiet else display.update,
                on_submitted=None if args.quiet else lambda job_id: display.submitted(job_id, client.base_url),
                on_no_progress=None if args.quiet else display.no_progress,
            )
        path = client.save_video(result.output, (output or Path(f"{result.job_id}.mp4")).absolute())
        result = dataclasses.replace(result, path=path)
    if args.json:
        print(json.dumps(result.metadata(), indent=2))  # with saved_to, the MP4's absolute path
        _error(f"saved {path}")
    else:
        _print_result(result)
    return EXIT_OK


def _printable(status: JobStatus) -> dict[str, Any]:
    body = dict(status.raw)
    output = body.get("output")
    if isinstance(output, dict) and isinstance(output.get("video"), str):
        result = JobResult(job_id=status.id, output=output)
        body["output"] = result.metadata()
    return body


def cmd_status(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        status = client.status(args.job_id)
        print(json.dumps(_printable(status), indent=2))
        if status.active:
            return EXIT_OK
        result = client.result(status, Path(args.output).expanduser() if args.output else None)
    if result.path is not None:
        print(f"saved {result.path}")
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        status = client.cancel(args.job_id)
    print(f"cancel requested for job {status.id}: status {status.status}")
    return EXIT_OK


_COMMANDS = {"run": cmd_run, "status": cmd_status, "cancel": cmd_cancel, "ui": cmd_ui}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hallo3``; returns the exit code (argparse exits with 2 on bad options)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="hallo3: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return _COMMANDS[args.command](args)
    except Interrupted as interrupt:
        _error(interrupt.message)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED
    except UsageError as err:
        _error(f"error: {err}")
        return EXIT_USAGE
    except JobFailed as err:
        _print_failure(err)
        return EXIT_FAILED
    except Hallo3Error as err:
        _error(f"error: {err}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
