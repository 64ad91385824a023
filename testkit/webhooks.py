"""A webhook receiver on loopback for the jobs tests (unit and served)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from testkit.net import free_port


class WebhookReceiver:
    """Answers each POST with the next status in `answers` (then 200; a 3xx names another place); records each
    call's headers (lower-cased names), body and arrival time (time.monotonic). `close` and `start` take it down
    and bring it back on the same port (a receiver that is down, as bench/jobs_chaos.py needs)."""

    def __init__(self, answers: list[int]) -> None:
        self.calls: list[tuple[dict[str, str], bytes, float]] = []
        self.answers = list(answers)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.start()

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("location", "http://127.0.0.1:9/elsewhere")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
