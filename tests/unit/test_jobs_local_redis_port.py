"""`make services` starts the jobs Redis where the app's default broker_url looks for it, and not on Ray's GCS port,
so `make demo` followed by `ray start --head` + `serve deploy` (serve_config.yaml's own advice) both work."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from instantid_app.config import REPO_ROOT, JobsConfig


def test_make_services_redis_is_where_the_default_broker_url_points_and_not_on_rays_gcs_port() -> None:
    from ray._private.ray_constants import DEFAULT_PORT as RAY_GCS_PORT

    makefile = (REPO_ROOT / "Makefile").read_text()
    (port,) = re.findall(r"^REDIS_PORT \?= (\d+)$", makefile, flags=re.MULTILINE)
    broker = urlsplit(JobsConfig().broker_url)
    assert (broker.hostname, broker.port) == ("127.0.0.1", int(port))
    assert int(port) != RAY_GCS_PORT
    # The Serve file's comment names the same URL a user is told to run against.
    assert JobsConfig().broker_url in (REPO_ROOT / "serve_config.yaml").read_text()
