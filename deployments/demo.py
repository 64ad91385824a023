"""`make demo`: start the `instantid` app on the tiny preset (Ray local), send one real HTTP request with the bundled
face photo, print the output URIs, their links that expire and per-stage timings (and, on the tiny preset, that its
images are noise), and shut everything down.

OUTPUT_URI (file://... or s3://...) overrides where outputs go; default: ./outputs. Serve listens on 127.0.0.1 at
DEMO_PORT (default 8000, Serve's own default). It also prints the playground's URL; run from a terminal (or with
DEMO_KEEP_SERVING=1) it keeps serving it until Ctrl-C.
"""

from __future__ import annotations

import base64
import os
import sys
import time

import httpx

from instantid_app.config import REPO_ROOT, app_spec, load_serve_config

FACE = REPO_ROOT / "instantid_core" / "data" / "astronaut.jpg"
REQUEST = {"prompt": "an astronaut portrait, watercolor", "style": "Watercolor", "steps": 8, "width": 512,
           "height": 512, "seed": 42}


def _wait_ready(url: str, timeout_s: float = 300) -> None:
    """Poll `{url}/readyz` until it answers 200 (the proxy learns the app's route a moment after serve.run)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the app at {url} was not ready within {timeout_s:.0f}s")


def _check_cpus(spec, available: float) -> None:
    # serve.run waits for every replica; one that cannot be placed would make the demo hang, not fail.
    needed = sum(options["ray_actor_options"].get("num_cpus", 1) for _, options in spec.stages())
    if needed > available:
        raise SystemExit(f"the app's deployments ask for {needed} CPUs but Ray has {available}; "
                         "lower ray_actor_options.num_cpus in serve_config.yaml")


def _demo_job(url: str, body: dict) -> int:
    """The same request as an async job (`make services`' Redis): submit, watch its progress, print its images."""
    submitted = httpx.post(f"{url}/v1/jobs", json=body, timeout=60)
    if submitted.status_code != 202:
        print(f"error {submitted.status_code}: {submitted.text}", file=sys.stderr)
        return 1
    job_id, shown = submitted.json()["job_id"], None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        progress = status.get("progress")
        line = f"job {job_id}: {status['status']}" + (f" {progress['step']}/{progress['steps']}" if progress else "")
        if line != shown:
            print(line, file=sys.stderr, flush=True)
            shown = line
        if status["status"] in ("done", "failed", "cancelled"):
            for uri in (status.get("result") or {}).get("images", []):
                print(uri)
            return 0 if status["status"] == "done" else 1
        time.sleep(0.2)
    print(f"job {job_id} did not finish in time", file=sys.stderr)
    return 1


def main() -> int:
    import ray
    from ray import serve

    from .app import build_app_from_spec

    spec = app_spec(load_serve_config())
    spec.args.weights.preset_dir = str(REPO_ROOT / ".cache" / "tiny")
    spec.args.output_uri = os.environ.get("OUTPUT_URI") or (REPO_ROOT / "outputs").resolve().as_uri()
    port = int(os.environ.get("DEMO_PORT", "8000"))
    url = f"http://127.0.0.1:{port}"
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        _check_cpus(spec, ray.cluster_resources().get("CPU", 0))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"starting the instantid app on {url} (tiny preset, CPU) ...", file=sys.stderr, flush=True)
        serve.run(build_app_from_spec(spec), name="instantid", route_prefix="/", blocking=False)
        _wait_ready(url)
        body = {"face_image": base64.b64encode(FACE.read_bytes()).decode(), **REQUEST}
        response = httpx.post(f"{url}/v1/generate", json=body, timeout=600)
        if response.status_code != 200:
            print(f"error {response.status_code}: {response.text}", file=sys.stderr)
            return 1
        result = response.json()
        for uri in result["images"]:
            print(uri)
        print(result["metadata"])
        timings = ", ".join(f"{stage}={ms:.0f}ms" for stage, ms in result["timings_ms"].items())
        print(f"POST /v1/generate -> 200, seed {result['seed']}, {timings}", file=sys.stderr)
        if result.get("identity"):  # with `scoring` (serve_config.yaml has it): how much each image looks like the face
            identity = result["identity"]
            scores = ", ".join("no face" if score is None else f"{score:.3f}" for score in identity["scores"])
            same = str(identity["same_model"]).lower()
            print(f"identity score: {scores} (cosine to the photo's face; same_model: {same})", file=sys.stderr)
        for link in result.get("urls", []):  # what a client without the output folder opens
            print(f"link (expires at {time.strftime('%H:%M', time.localtime(result['urls_expire_at']))}): {link}",
                  file=sys.stderr)
        if result.get("notice"):  # the tiny preset: say why the image is noise
            print(f"note: {result['notice']}", file=sys.stderr)
        status = _demo_job(url, body) if spec.args.jobs is not None else 0
        print(f"playground: {url}/")
        if sys.stdin.isatty() or os.environ.get("DEMO_KEEP_SERVING") == "1":
            print("open the playground in a browser; Ctrl-C stops the app", file=sys.stderr, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return status
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
