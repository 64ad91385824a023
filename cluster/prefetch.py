"""Fill a node's weights cache before Ray starts: resolve the weights of a serve config's `instantid` application.

    python -m cluster.prefetch /etc/instantid/serve_config.yaml

Runs as the init container of every KubeRay worker pod (k8s/overlays/gpu) and in the launcher's worker setup
(cluster/aws.yaml), with the environment the Ray containers get (HF_HOME, HF_TOKEN, AWS_*): it downloads exactly
what each replica will later resolve, through the same code (`instantid_app.weights.resolve_app_weights`), so the
replicas find a warm, validated cache instead of racing each other for the same 14 GB. Exit code 2 and one line on
stderr for an expected failure (a source that cannot be fetched, a broken weights pack).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from instantid_app.config import app_config_from_serve_config
from instantid_app.weights import resolve_app_weights
from instantid_core.errors import InstantIDError


def prefetch(serve_config: Path) -> str:
    """Resolve (download if needed, then validate) the weights `serve_config` deploys; a one-line summary."""
    config = app_config_from_serve_config(Path(serve_config))
    start = time.perf_counter()
    resolved = resolve_app_weights(config)
    return (f"weights ready in {time.perf_counter() - start:.1f}s ({resolved.downloaded_files} files downloaded): "
            f"sdxl={resolved.sdxl} identitynet={resolved.identitynet} adapter={resolved.adapter} "
            f"face_pack={resolved.face_pack}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("serve_config", type=Path, help="a Serve config file with an `instantid` application")
    args = parser.parse_args(argv)
    try:
        print(prefetch(args.serve_config), flush=True)
    except (InstantIDError, FileNotFoundError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        print(f"prefetch failed: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
