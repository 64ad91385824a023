"""moto's S3 server on loopback (a real S3 API over HTTP) for tests and bench/jobs_chaos.py, and the environment
that points boto3 at it, so the code under test creates its clients exactly as it does in production."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

# Variables that would point boto3 at a real account, profile or endpoint instead of the test server.
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Request has expired</Message></Error>")


def presigned_expired(query: str, now: float) -> bool:
    """Whether a request's query string is a presigned URL past its time, as S3 decides: SigV4's X-Amz-Date plus
    X-Amz-Expires, or SigV2's absolute Expires."""
    params = {name: values[0] for name, values in parse_qs(query).items()}
    try:
        if "X-Amz-Expires" in params:
            signed = datetime.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
            return now > signed.timestamp() + int(params["X-Amz-Expires"])
        if "Signature" in params and "Expires" in params:
            return now > int(params["Expires"])
    except (KeyError, ValueError):
        return True  # a malformed presigned URL: S3 refuses it too
    return False


def refuse_expired(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """moto's WSGI app with S3's 403 for an expired presigned URL, which moto itself does not check."""
    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if presigned_expired(environ.get("QUERY_STRING", ""), time.time()):
            start_response("403 Forbidden", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(len(EXPIRED)))])
            return [EXPIRED]
        return app(environ, start_response)

    return wrapped


def _server_class() -> type:
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class ExpiringMotoServer(ThreadedMotoServer):
        """ThreadedMotoServer serving `refuse_expired(moto's app)` (its _server_entry, with the app wrapped)."""

        def _server_entry(self) -> None:
            app = refuse_expired(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return ExpiringMotoServer


class S3TestServer:
    """moto's threaded S3 server on loopback that a fault test can stop and start again on the same port.

    moto keeps buckets in this process's memory, not in the server thread, so objects survive a restart. Presigned
    URLs expire as on S3 (403 AccessDenied past their time)."""

    def __init__(self) -> None:
        self._server = _server_class()(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        if not self.running:
            self._server = _server_class()(ip_address="127.0.0.1", port=self.port, verbose=False)
            self._server.start()
            self.running = True

    def environment(self, secret_access_key: str, scratch: Path) -> dict[str, str | None]:
        """The variables (None: unset) under which boto3 talks to this server and nothing else: test credentials,
        its endpoint, and no config file of the machine's (`scratch` is a folder where none exists)."""
        absent = str(scratch / "absent")
        return {**{name: None for name in CLEARED}, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": secret_access_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_CONFIG_FILE": absent, "AWS_SHARED_CREDENTIALS_FILE": absent,
                "AWS_EC2_METADATA_DISABLED": "true"}
