"""moto's S3 service alone on a loopback port: the stand-in S3 server of the tests and benchmarks.

Run as a script (tests/s3.py starts it): ``python tests/moto_s3.py HOST PORT``. It serves the very
Flask application that ``moto_server`` hands every S3 request to (``create_backend_app("s3")``), on
the same threaded werkzeug server with moto's request handler, so the S3 API is moto's, unchanged.
What it leaves out is overhead a real store does not have, which otherwise ran on the same two cores
as the workers (docs/performance.md, "Originals in an S3 bucket"):

* ``moto_server`` serves every AWS service and works out for each request which one is meant; for
  an S3 request that lists moto's package folder and stats each of its ~175 entries, every time;
* a CORS layer on every response (no browser talks to this server): ``MOTO_DISABLE_GLOBAL_CORS``;
* one access-log line per request on stderr.

Together about a third of the server's CPU per request (measured 2026-12-01: PutObject of 514 KB
4.3–4.4 → 2.9–3.4 ms, GetObject 2.4–2.9 → 1.1–2.4 ms).
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main(host: str, port: int) -> None:
    os.environ.setdefault("MOTO_PORT", str(port))  # read by moto at import: the URLs it builds
    os.environ["MOTO_DISABLE_GLOBAL_CORS"] = "true"
    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request
    app = create_backend_app("s3")
    app.debug = False
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
