"""moto's S3 server on loopback (a real S3 API over HTTP) for tests and bench/jobs_chaos.py, and the environment
that points boto3 at it, so the code under test creates its clients exactly as it does in production."""

from __future__ import annotations

from pathlib import Path

# Variables that would point boto3 at a real account, profile or endpoint instead of the test server.
CLEARED = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


class S3TestServer:
    """moto's threaded S3 server on loopback that a fault test can stop and start again on the same port.

    moto keeps buckets in this process's memory, not in the server thread, so objects survive a restart."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.running = True

    def stop(self) -> None:
        if self.running:
            self._server.stop()
            self.running = False

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        if not self.running:
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
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
