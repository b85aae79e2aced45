"""``hallo3 ui``: a page to try an endpoint in a browser (``pip install 'hallo3-client[ui]'``).

A Starlette app (:mod:`hallo3_client.ui.app`) served by uvicorn on 127.0.0.1 unless told
otherwise; its one page (``static/``) talks only to this process, which sends and follows the jobs
with the client's own code (:mod:`hallo3_client.ui.jobs`). Importing this package needs nothing
beyond the plain client; :func:`serve` needs the ``ui`` extra.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
import tempfile
from pathlib import Path
from typing import Optional, TextIO

from hallo3_client.client import Hallo3Client
from hallo3_client.errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"Cannot listen on {host}:{port}: {err.strerror or err}.") from None
    sock.listen(64)
    return sock


def serve(client: Hallo3Client, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          upload: Optional[str] = None, out: TextIO = sys.stdout) -> None:
    """Serve the page until interrupted; ``port`` 0 picks a free one. Writes the page's address to ``out``."""
    try:
        import uvicorn

        from hallo3_client.ui.app import create_app
        from hallo3_client.ui.jobs import JobBoard
    except ImportError as err:
        raise UsageError(f"hallo3 ui needs the ui extra ({err.name} is missing): "
                         "pip install 'hallo3-client[ui]'.") from None
    if upload:
        from hallo3_client.media import parse_s3_target

        parse_s3_target(upload)  # a usage error before anything listens
    if not _is_loopback(host):
        logger.warning("Listening on %s: anyone who can reach it can run jobs on %s with your API key.",
                       host, client.base_url)
    sock = _listen(host, port)
    with tempfile.TemporaryDirectory(prefix="hallo3-ui-") as folder:
        board = JobBoard(client, Path(folder), upload=upload)
        loopback_names = ["127.0.0.1", "localhost"] if host in ("127.0.0.1", "localhost") else None
        app = create_app(board, target=client.base_url, allowed_hosts=loopback_names)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        shown = f"[{host}]" if ":" in host else host
        print(f"hallo3 ui: http://{shown}:{sock.getsockname()[1]}/ (jobs go to {client.base_url}; "
              "Ctrl-C stops)", file=out, flush=True)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            board.close()
