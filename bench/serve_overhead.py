"""Serving overhead benchmark (issue 7): HTTP + DAG overhead and throughput of the `instantid` app on the tiny preset,
beside a no-op DAG of the same shape (`bench/noop_app.py`), in the same run.

    python bench/serve_overhead.py                    # the default run (a few minutes): 64x64, 2 steps
    python bench/serve_overhead.py --write-results    # also writes the "Serving overhead (issue 7)" section
    python bench/serve_overhead.py --quick            # harness check: a handful of requests per configuration

What runs: Ray local with Serve's HTTP proxy on 127.0.0.1; both applications deployed side by side, the real one
from `serve_config.yaml`'s AppConfig (tiny preset, outputs to a temporary file:// folder) and the no-op one with the
same per-stage Serve options and batch settings. Every stage is pinned to one replica (autoscaling min = max = 1)
so that no scale-up lands in the middle of a measurement. For each batch setting (`max_batch_size` 1 = batching
off, 4 = on; both apps redeployed) and each client count (1, 8), each app gets warm-up requests (not counted), then
a fixed number of `POST /v1/generate` requests from that many concurrent httpx clients over loopback, the two apps
one after the other so they share the machine's noise.

Per request, from the response's `timings_ms` (what each stage measured of its own work):
- compute: in-stage work on the critical path = max(face, prompt) + denoise + encode + write. face and prompt run
  concurrently; denoise is the forward pass of the batch the request ran in; encode and write are the writer's PNG
  encode and its file write. Each is timed inside its stage around the work alone;
- overhead = end-to-end latency at the client - compute: HTTP (proxy, FastAPI, JSON), the ingress (validation,
  base64, hashing), every handle hop and payload (de)serialisation, and the denoiser queue;
- queue: the part of the overhead a request spent in the denoiser's `@serve.batch` queue (waiting for a batch to
  fill, up to `batch_wait_timeout_s`, or for the batch before it); reported on its own, and `overhead - queue`
  (the plumbing alone) beside it, since at 8 clients the queue is mostly other requests' compute;
- http: end-to-end - the ingress's own `total` (proxy + FastAPI + JSON in and out).
Images/s = images returned / wall time from the first measured request sent to the last response received.

For the no-op DAG compute is ~0, so its overhead is its end-to-end latency: the floor for this shape on this machine.
The issue's targets (evaluated, never asserted): our overhead p50 <= 1.1x the no-op's at the same batch setting and
client count; batching on >= 1.5x the images/s of batching off at 8 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from testkit.net import free_port, wait_ready

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
SECTION = "## Serving overhead (issue 7)"
SCHEMA = "instantid-bench-serve-overhead/1"
FACE = REPO / "instantid_core" / "data" / "astronaut.jpg"
PROMPT = "an astronaut portrait, watercolor"
NEGATIVE = "blurry, lowres"
TARGET_OVERHEAD_RATIO = 1.1
TARGET_BATCH_GAIN = 1.5
APPS = {"instantid": "/", "noop": "/noop"}


@dataclass
class Row:
    """One (app, batch setting, client count) measurement; latencies in ms."""

    app: str
    max_batch_size: int
    clients: int
    requests: int
    errors: int
    wall_s: float
    images_per_s: float
    e2e_p50: float
    e2e_p95: float
    compute_p50: float
    overhead_p50: float
    overhead_p95: float
    queue_p50: float
    unqueued_p50: float  # overhead - queue: HTTP, ingress, hops and (de)serialisation alone
    http_p50: float
    mean_batch: float
    response_bytes: int  # median size of the JSON response body


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="output width and height (multiple of 8, >= 64)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per image")
    parser.add_argument("--clients", default="1,8", help="concurrent client counts, comma-separated")
    parser.add_argument("--batch-sizes", default="1,4", help="denoiser max_batch_size values (1 = batching off)")
    parser.add_argument("--requests", type=int, default=100, help="measured requests per configuration at 1 client")
    parser.add_argument("--requests-concurrent", type=int, default=200,
                        help="measured requests per configuration with more than one client")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up requests per client, not counted")
    parser.add_argument("--num-cpus", type=float, default=max(4, os.cpu_count() or 1),
                        help="logical CPUs given to Ray (both apps ask for serve_config.yaml's CPUs at once)")
    parser.add_argument("--quick", action="store_true", help="harness check: 4 requests per configuration")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the raw JSON goes")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD, help="the markdown file --write-results edits")
    parser.add_argument("--write-results", action="store_true", help=f"replace/append '{SECTION[3:]}' there")
    parser.add_argument("--note", default="", help="a line written under the settings (e.g. how quiet the machine was)")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.quick:
        args.requests, args.requests_concurrent, args.warmup = 4, 8, 1
    return args


# --- setup ----------------------------------------------------------------------------------------------------------
def bench_config(max_batch_size: int, output_uri: str):
    """serve_config.yaml's AppSpec with the tiny preset in .cache/tiny, a temporary output folder, the given batch
    size and one replica per stage."""
    from instantid_app.config import app_entry, app_spec, load_serve_config

    config = load_serve_config()
    app = app_entry(config)
    app["args"]["weights"]["preset_dir"] = str(REPO / ".cache" / "tiny")
    app["args"]["output_uri"] = output_uri
    # /v1/generate only: no async jobs, so no JobConsumer and no broker to start.
    app["args"].pop("jobs", None)
    app["deployments"] = [entry for entry in app["deployments"] if entry["name"] != "JobConsumer"]
    for entry in app["deployments"]:
        entry["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        if entry["name"] == "Denoiser":
            entry["user_config"] = {**entry.get("user_config", {}), "max_batch_size": max_batch_size}
    return app_spec(config)  # validated as serve deploy would


def stage_payloads(config, params: dict[str, Any]):
    """The face and prompt stages' real outputs for the benchmark's photo, size and prompt (the no-op DAG returns
    these), computed once here by the library on the tiny preset."""
    from instantid_app.weights import resolve_app_weights
    from instantid_core.conditioning import RequestPhotos, face_condition
    from instantid_core.config import GenerateParams
    from instantid_core.face import FaceAnalyzer
    from instantid_core.text import PromptEncoder

    weights = resolve_app_weights(config.args)
    settings = config.args.pipeline
    face = face_condition(FaceAnalyzer(weights.face_pack, settings), RequestPhotos([FACE.read_bytes()]),
                          GenerateParams.model_validate(params), settings)
    prompt = PromptEncoder(weights.sdxl, settings).encode(PROMPT, NEGATIVE)
    return face, prompt


# --- measurement ----------------------------------------------------------------------------------------------------
async def run_clients(url: str, body: dict, clients: int, requests: int, seed0: int) -> tuple[list[dict], float, int]:
    """`requests` POSTs from `clients` concurrent clients; returns the per-request samples, the wall time, errors."""
    samples: list[dict] = []
    errors = 0
    next_index = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def client() -> None:
            nonlocal next_index, errors
            while next_index < requests:
                index, next_index = next_index, next_index + 1
                started = time.perf_counter()
                response = await http.post("/v1/generate", json={**body, "seed": seed0 + index})
                e2e_ms = (time.perf_counter() - started) * 1000
                if response.status_code != 200:
                    errors += 1
                    print(f"  {url}: HTTP {response.status_code}: {response.text[:200]}", file=sys.stderr)
                    continue
                result = response.json()
                samples.append({"e2e_ms": e2e_ms, "timings_ms": result["timings_ms"],
                                "batch_size": result["batch_size"], "images": len(result["images"]),
                                "response_bytes": len(response.content)})

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall_s = time.perf_counter() - started
    return samples, wall_s, errors


def compute_ms(timings: dict[str, float]) -> float:
    """In-stage work on the request's critical path (face and prompt run concurrently)."""
    return max(timings["face"], timings["prompt"]) + timings["denoise"] + timings["encode"] + timings["write"]


def summarize(app: str, max_batch_size: int, clients: int, samples: list[dict], wall_s: float, errors: int) -> Row:
    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 2) if values else float("nan")

    e2e = [s["e2e_ms"] for s in samples]
    compute = [compute_ms(s["timings_ms"]) for s in samples]
    overhead = [e - c for e, c in zip(e2e, compute, strict=True)]
    queue = [s["timings_ms"]["queue"] for s in samples]
    unqueued = [o - q for o, q in zip(overhead, queue, strict=True)]
    http = [s["e2e_ms"] - s["timings_ms"]["total"] for s in samples]
    images = sum(s["images"] for s in samples)
    mean_batch = round(float(np.mean([s["batch_size"] for s in samples])), 2) if samples else 0.0
    return Row(app, max_batch_size, clients, len(samples), errors, round(wall_s, 3), round(images / wall_s, 2),
               pct(e2e, 50), pct(e2e, 95), pct(compute, 50), pct(overhead, 50), pct(overhead, 95), pct(queue, 50),
               pct(unqueued, 50), pct(http, 50), mean_batch,
               int(np.median([s["response_bytes"] for s in samples])) if samples else 0)


def measure(base_url: str, body: dict, args: argparse.Namespace, max_batch_size: int) -> list[Row]:
    rows = []
    for clients in args.clients:
        requests = args.requests if clients == 1 else args.requests_concurrent
        for app, prefix in APPS.items():
            url = base_url + prefix.rstrip("/")
            asyncio.run(run_clients(url, body, clients, args.warmup * clients, seed0=10_000))  # warm-up
            samples, wall_s, errors = asyncio.run(run_clients(url, body, clients, requests, seed0=0))
            row = summarize(app, max_batch_size, clients, samples, wall_s, errors)
            print(f"  {app:9s} batch {max_batch_size} clients {clients}: overhead p50 {row.overhead_p50:.1f} ms, "
                  f"e2e p50 {row.e2e_p50:.1f} ms, {row.images_per_s:.2f} images/s", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


# --- report ---------------------------------------------------------------------------------------------------------
def verdicts(rows: list[Row]) -> list[str]:
    """The issue's two targets, evaluated on what was measured."""
    by_key = {(r.app, r.max_batch_size, r.clients): r for r in rows}
    lines = []
    for r in rows:
        noop = by_key.get(("noop", r.max_batch_size, r.clients))
        if r.app != "instantid" or noop is None or not noop.overhead_p50 > 0:
            continue
        ratio = r.overhead_p50 / noop.overhead_p50
        unqueued = r.unqueued_p50 / noop.unqueued_p50 if noop.unqueued_p50 > 0 else float("nan")
        lines.append(f"overhead p50, max_batch_size {r.max_batch_size}, {r.clients} client(s): {r.overhead_p50:.1f} ms "
                     f"vs no-op {noop.overhead_p50:.1f} ms = {ratio:.2f}x (target <= {TARGET_OVERHEAD_RATIO}x: "
                     f"{'met' if ratio <= TARGET_OVERHEAD_RATIO else 'missed'}); without the denoiser queue "
                     f"{r.unqueued_p50:.1f} vs {noop.unqueued_p50:.1f} ms = {unqueued:.2f}x")
    most = max((r.clients for r in rows), default=0)
    on = [r for r in rows if r.app == "instantid" and r.clients == most and r.max_batch_size > 1]
    off = by_key.get(("instantid", 1, most))
    for r in on:
        if off is not None and off.images_per_s > 0:
            gain = r.images_per_s / off.images_per_s
            lines.append(f"batching at {most} clients: {r.images_per_s:.2f} images/s (max_batch_size "
                         f"{r.max_batch_size}) vs {off.images_per_s:.2f} (1) = {gain:.2f}x (target >= "
                         f"{TARGET_BATCH_GAIN}x: {'met' if gain >= TARGET_BATCH_GAIN else 'missed'})")
    return lines


def table(rows: list[Row]) -> str:
    header = ("| app | max_batch_size | clients | requests | errors | e2e p50 | e2e p95 | compute p50 | overhead p50 "
              "| overhead p95 | queue p50 | overhead - queue p50 | http p50 | images/s | mean batch | response bytes |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.app} | {r.max_batch_size} | {r.clients} | {r.requests} | {r.errors} | {r.e2e_p50:.1f} | "
                     f"{r.e2e_p95:.1f} | {r.compute_p50:.1f} | {r.overhead_p50:.1f} | {r.overhead_p95:.1f} | "
                     f"{r.queue_p50:.1f} | {r.unqueued_p50:.1f} | {r.http_p50:.1f} | {r.images_per_s:.2f} | "
                     f"{r.mean_batch:.2f} | {r.response_bytes} |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    m, p = report["machine"], report["plan"]
    lines = [
        SECTION, "",
        "`bench/serve_overhead.py` (module docstring: what each column means). Latencies in ms, per request, at the "
        "client; overhead = end-to-end - in-stage compute (max(face, prompt) + denoise + encode + write from the "
        "response's `timings_ms`); queue = time in the denoiser's batch queue (filling a batch, or behind "
        "the batch before), part of the overhead; http = end-to-end - the ingress's `total`. At 8 clients the "
        "queue holds the wait behind other requests' compute on one denoiser replica, so `overhead - queue` is the "
        "plumbing alone. The no-op DAG (`bench/noop_app.py`) has the same five deployments, "
        "Serve options, `@serve.batch` settings and payloads, with stages that return at once.", "",
        f"### {report['started']}, {m['machine']} ({m['cpus']} cores)", "",
        f"- Ray {m['ray']}, torch {m['torch']}, python {m['python']}; load average at start {m['loadavg']}",
        f"- Ray given {p['num_cpus']:g} logical CPUs on this {m['cpus']}-core machine, so both apps (serve_config.yaml "
        f"asks {p['app_cpus']:g} CPUs per app) are placed at once; the processes share the {m['cpus']} cores",
        f"- tiny preset, {p['size']}x{p['size']}, {p['steps']} steps, guidance 5, one image per request, one face "
        f"photo ({p['face_bytes']} bytes, {p['body_bytes']} bytes of JSON), face and prompt cached after warm-up",
        f"- one replica per stage; batch wait {p['batch_wait_timeout_s']} s; {p['requests']} requests at 1 client, "
        f"{p['requests_concurrent']} with more, after {p['warmup']} warm-up request(s) per client (not counted)",
    ]
    if report.get("note"):
        lines.append(f"- {report['note']}")
    lines += ["", table([Row(**r) for r in report["rows"]]), ""]
    lines += [f"- {line}" for line in report["verdicts"]]
    lines += [
        "- No GPU was lent to this task, so the GPU batching figures (denoiser images/s at batch 1, 2 and 4 on "
        "full-size random-weight models, at the library level) were not taken.",
        "", f"Raw JSON: `{report['raw_json']}`", "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the section (up to the next `## `) or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text, old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


# --- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    import torch
    from noop_app import build_noop_app  # bench/ is this script's folder; replicas get it on PYTHONPATH below
    from ray import serve

    from deployments.app import build_app_from_spec
    from instantid_core.tiny import ensure_tiny_preset

    started = datetime.now(timezone.utc)
    face_bytes = FACE.read_bytes()
    body = {"face_image": base64.b64encode(face_bytes).decode(), "prompt": PROMPT, "negative_prompt": NEGATIVE,
            "width": args.size, "height": args.size, "steps": args.steps}
    ensure_tiny_preset(REPO / ".cache" / "tiny")
    output_dir = Path(tempfile.mkdtemp(prefix="instantid-bench-serve-"))
    first = bench_config(args.batch_sizes[0], output_dir.as_uri())
    face, prompt = stage_payloads(first, {k: v for k, v in body.items() if k != "face_image"})
    app_cpus = sum(options["ray_actor_options"].get("num_cpus", 1) for _, options in first.stages())
    loadavg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Ray with {args.num_cpus:g} logical CPUs on a {os.cpu_count()}-core machine (each app asks {app_cpus:g}); "
          f"{args.size}x{args.size}, {args.steps} steps; load average {loadavg}", file=sys.stderr, flush=True)

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(BENCH_DIR)}})
    rows: list[Row] = []
    try:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for max_batch_size in args.batch_sizes:
            config = bench_config(max_batch_size, output_dir.as_uri())
            print(f"deploying both apps with max_batch_size {max_batch_size} ...", file=sys.stderr, flush=True)
            deploy_started = time.monotonic()
            serve.run(build_app_from_spec(config), name="instantid", route_prefix=APPS["instantid"], blocking=False)
            serve.run(build_noop_app(config, face, prompt), name="noop", route_prefix=APPS["noop"], blocking=False)
            for prefix in APPS.values():
                wait_ready(base_url + prefix.rstrip("/"))
            print(f"  ready after {time.monotonic() - deploy_started:.0f} s", file=sys.stderr, flush=True)
            rows += measure(base_url, body, args, max_batch_size)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(output_dir, ignore_errors=True)

    stamp = started.strftime("%Y%m%dT%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    raw = args.results_dir / f"serve-overhead-{stamp}.json"
    report = {
        "schema": SCHEMA, "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "note": args.note,
        "machine": {"machine": platform.machine(), "cpus": os.cpu_count(), "ray": ray.__version__,
                    "torch": torch.__version__, "python": platform.python_version(), "loadavg": loadavg},
        "plan": {"size": args.size, "steps": args.steps, "clients": args.clients, "batch_sizes": args.batch_sizes,
                 "requests": args.requests, "requests_concurrent": args.requests_concurrent, "warmup": args.warmup,
                 "num_cpus": args.num_cpus, "app_cpus": app_cpus,
                 "batch_wait_timeout_s": first.denoiser.batch_wait_timeout_s,
                 "face_bytes": len(face_bytes), "body_bytes": len(json.dumps(body))},
        "rows": [asdict(r) for r in rows], "verdicts": verdicts(rows),
        "raw_json": str(raw.relative_to(REPO)) if raw.is_relative_to(REPO) else str(raw),
    }
    raw.write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    print(text)
    if args.write_results:
        write_section(args.results_md, text)
        print(f"wrote {SECTION[3:]!r} in {args.results_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
