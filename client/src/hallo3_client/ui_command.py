"""The ``hallo3 ui`` subcommand: its options, and starting the page (needs the ``ui`` extra)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from hallo3_client.client import Hallo3Client


def add_ui_parser(commands: Any, api: argparse.ArgumentParser) -> None:
    """Register ``ui`` on the ``hallo3`` subcommands; ``api`` holds --endpoint/--url/--timeout."""
    ui = commands.add_parser(
        "ui", parents=[api], help="serve a page to try the endpoint in a browser",
        description="Serve a page to run jobs from a browser: upload or record, watch progress, play and "
                    "download the result. The page talks only to this process, which holds the API key. "
                    "Needs the ui extra: pip install 'hallo3-client[ui]'.")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1; anything else lets others use your key)")
    ui.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860; 0 picks a free one)")
    ui.add_argument("--upload", metavar="s3://BUCKET/PREFIX",
                    help="upload the page's files to your bucket (boto3, standard AWS_* settings) and send "
                         "presigned URLs, instead of sending them inline (10 MB limit)")


def cmd_ui(args: argparse.Namespace) -> int:
    from hallo3_client.ui import serve

    options: dict[str, Any] = {"timeout": args.timeout}
    if args.endpoint:
        client = Hallo3Client.for_endpoint(args.endpoint, **options)
    else:
        client = Hallo3Client(args.url, os.environ.get("RUNPOD_API_KEY") or None, **options)
    with client:
        serve(client, host=args.host, port=args.port, upload=args.upload)
    return 0
