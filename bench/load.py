"""Load and fault benchmark (issue 5, "Reliability"): the hostile-input corpus, a bounded closed-loop load generator
against the running app, an audit of the outputs it left in the store, and fault injection (denoiser replica killed
under load, S3 server stopped mid-run, a GPU worker node of a local multi-node cluster killed). Loopback only; every
run stops by itself.

    python bench/load.py                      # 32 clients, 256 requests, tiny preset, 64x64; prints a report
    python bench/load.py --write-results      # the same, then replaces the "Reliability" section of RESULTS.md

The suite runs each part in a short version (tests/serve/test_hostile_inputs.py, tests/serve/test_faults.py,
tests/cluster/test_placement.py); this script is the long one. What runs: Ray local, the `instantid` app from
serve_config.yaml's AppConfig (tiny preset, outputs to a moto S3 server on 127.0.0.1 started here), real HTTP
clients (httpx, async); then testkit.cluster's cluster with the driver of testkit.placement for the node loss. The
batch job's kill-and-resume figures come from the newest bench/batch.py run (bench/results/batch-*.json).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from testkit.hostile import body_cases, check, image_cases, send
from testkit.load import LoadResult, answered, audit_outputs, run_load
from testkit.net import free_port
from testkit.placement import run_on_local_cluster
from testkit.serve import kill_replica, replica_actors

REPO = Path(__file__).resolve().parents[1]
FACE = REPO / "instantid_core" / "data" / "astronaut.jpg"
RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Reliability (issue 5)"


def replica_rss_mb() -> dict[str, float]:
    """Resident memory of each local Serve replica process of the `instantid` app, as `Deployment#pid`.

    Ray sets the title to `...ServeReplica:instantid:<Deployment>[.<method running now>]`."""
    import psutil

    rss: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica:instantid:" in title and proc.info["memory_info"]:
            name = title.split("ServeReplica:instantid:")[1].split()[0].split(".")[0]
            rss[f"{name}#{proc.pid}"] = proc.info["memory_info"].rss / 2**20
    return rss


# --- the standalone benchmark ---------------------------------------------------------------------------------------
def _s3_objects(client: Any, bucket: str, prefix: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", [])}


def _s3_read(client: Any) -> Callable[[str], bytes]:
    def read(uri: str) -> bytes:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return read


def _first_success_after(url: str, body: dict, since: float, limit_s: float) -> float | None:
    """Seconds from `since` until a request succeeds, polling; None if none did within `limit_s`."""
    while time.monotonic() - since < limit_s:
        try:
            if httpx.post(f"{url}/v1/generate", json=body, timeout=30).status_code == 200:
                return time.monotonic() - since
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    parser.add_argument("--no-node-loss", action="store_true", help="skip the multi-node cluster part (~2 min)")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    import boto3
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{s3_port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    client = boto3.client("s3")
    bucket = f"load-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)

    import ray
    from ray import serve

    from deployments.app import build_app_from_spec
    from instantid_app.config import app_entry, app_spec, load_serve_config

    serve_config = load_serve_config()
    app = app_entry(serve_config)
    # /v1/generate only: no async jobs, so no JobConsumer and no broker to start (bench/jobs.py measures those).
    app["args"].pop("jobs", None)
    app["deployments"] = [entry for entry in app["deployments"] if entry["name"] != "JobConsumer"]
    config = app_spec(serve_config)
    config.args.weights.preset_dir = str(REPO / ".cache" / "tiny")
    config.args.output_uri = f"s3://{bucket}/out"
    config.args.allowed_input_buckets = [bucket]  # so an s3:// face in it that does not exist is a 404, not a 403
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    face = base64.b64encode(FACE.read_bytes()).decode()
    run_id = uuid.uuid4().hex[:8]

    def body(index: int, phase: str) -> dict:
        return {"face_image": face, "prompt": f"portrait {index % 8}", "seed": index, "steps": args.steps,
                "width": args.size, "height": args.size, "output": {"prefix": f"{run_id}-{phase}"}}

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    report: dict[str, Any] = {"clients": args.clients, "requests": args.requests, "size": args.size,
                              "steps": args.steps}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app_from_spec(config), name="instantid", route_prefix="/")
        for i in range(3):  # warm-up, not measured
            httpx.post(f"{url}/v1/generate", json=body(i, "warmup"), timeout=120).raise_for_status()

        # The hostile corpus: every case its documented 4xx, no 5xx, no replica restarted, a valid request after.
        corpus = image_cases(FACE.read_bytes()) + body_cases(face, bucket, config.ingress.max_body_bytes,
                                                             config.ingress.max_image_bytes)
        replicas_before = set(replica_actors())
        with httpx.Client(base_url=url, timeout=args.timeout) as http:
            answers = [(case, send(http, case)) for case in corpus]
            valid_after = http.post("/v1/generate", json=body(0, "after-hostile")).status_code
        report["hostile"] = {"cases": len(corpus),
                             "statuses": dict(sorted(Counter(r.status_code for _, r in answers).items())),
                             "server_errors": sum(r.status_code >= 500 for _, r in answers),
                             "undocumented": [p for p in (check(c, r) for c, r in answers) if p],
                             "replica_restarts": len(replicas_before - set(replica_actors())),
                             "valid_request_after": valid_after}

        # Memory: sampled before, halfway and after; growth in the second half is what would mean a leak.
        rss = {"before": replica_rss_mb()}

        def sample_halfway(live: LoadResult) -> None:
            if answered(live, args.requests // 2, args.timeout):
                rss["half"] = replica_rss_mb()

        load = run_load(url, lambda i: body(i, "load"), clients=args.clients, requests=args.requests,
                        timeout_s=args.timeout, during=sample_halfway)
        rss["after"] = replica_rss_mb()
        audit = audit_outputs(load, _s3_objects(client, bucket, f"out/{run_id}-load/"), _s3_read(client))
        report["load"] = {"statuses": load.statuses(), "p50_s": load.percentile_s(50), "p99_s": load.percentile_s(99),
                          "goodput_img_s": load.goodput(), "wall_s": load.wall_s,
                          "missing": len(audit["missing"]), "orphans": len(audit["orphans"]),
                          "bad_sidecars": audit["bad_sidecars"],
                          # replica -> MB before, halfway, after; None where it did not exist yet (autoscaling)
                          "rss_mb": {k: [round(rss[when][k]) if k in rss.get(when, {}) else None
                                         for when in ("before", "half", "after")]
                                     for k in sorted(rss["after"])}}

        # Fault 1: the denoiser's actor killed once a quarter of a load run's requests have been answered.
        killed_at: dict[str, float] = {}
        fault_requests = args.requests

        def kill_denoiser(live: LoadResult) -> None:
            if not answered(live, fault_requests // 4, args.timeout):
                return
            names = replica_actors("Denoiser")
            killed_at["t"] = time.monotonic()
            for name in names:
                kill_replica(name)

        faulted = run_load(url, lambda i: body(i, "kill"), clients=8, requests=fault_requests,
                           timeout_s=args.timeout, during=kill_denoiser)
        if "t" not in killed_at:
            raise RuntimeError("the denoiser was never killed: the fault run ended first")
        after_kill = [a for a in faulted.answers if a.started >= killed_at["t"]]
        recovered = min((a.started + a.seconds - killed_at["t"] for a in after_kill if a.status == 200), default=None)
        if recovered is None:  # the run ended before a new replica served: keep asking
            recovered = _first_success_after(url, body(999, "kill-probe"), killed_at["t"], 60)
        audit_kill = audit_outputs(faulted, _s3_objects(client, bucket, f"out/{run_id}-kill/"), _s3_read(client))
        non_retry_5xx = [a for a in faulted.answers if a.status >= 500 and not (
            a.status == 503 and a.retry_after and "retry" in json.dumps(a.body))]
        report["kill_denoiser"] = {"requests": fault_requests, "statuses": faulted.statuses(),
                                   "answered_before_kill": len(faulted.answers) - len(after_kill),
                                   "recovered_after_s": recovered, "non_retryable_5xx": len(non_retry_5xx),
                                   "missing": len(audit_kill["missing"]), "orphans": len(audit_kill["orphans"])}

        # Fault 2: the S3 server stopped for a few requests, then back.
        s3.stop()
        outage = [httpx.post(f"{url}/v1/generate", json=body(i, "outage"), timeout=args.timeout) for i in range(3)]
        down_codes = [(r.status_code, (r.json().get("error") or {}).get("code")) for r in outage]
        down_seconds = [r.elapsed.total_seconds() for r in outage]
        s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
        s3.start()
        back = time.monotonic()
        recovered_s = _first_success_after(url, body(99, "after-outage"), back, 60)
        report["s3_outage"] = {"answers_while_down": down_codes, "max_answer_s": max(down_seconds),
                               "partial_objects": len(_s3_objects(client, bucket, f"out/{run_id}-outage/")),
                               "recovered_after_s": recovered_s}
    finally:
        serve.shutdown()
        ray.shutdown()
        s3.stop()

    if not args.no_node_loss:  # after Ray local is down: the cluster and its driver are processes of their own
        with tempfile.TemporaryDirectory(prefix="load-node-loss-") as out:
            code, facts, stderr = run_on_local_cluster(Path(config.args.weights.preset_dir), Path(out))
        report["node_loss"] = facts.get("node_loss") or {"error": f"driver exit {code}: {stderr[-800:]}"}
    report["batch_resume"] = _latest_batch_resume()
    report["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}
    print(json.dumps(report, indent=2, default=str), flush=True)
    if args.write_results:
        report["started"] = started
        raw = REPO / "bench" / "results" / f"load-{started.replace(':', '').replace('-', '')}.json"
        raw.write_text(json.dumps(report, indent=2, default=str) + "\n")
        _write_results(report, raw.relative_to(REPO))
    return 0


def _latest_batch_resume() -> dict[str, Any] | None:
    """The kill-and-resume figures of the newest bench/batch.py run, with the file they come from."""
    runs = sorted((REPO / "bench" / "results").glob("batch-*.json"))
    if not runs:
        return None
    resume = json.loads(runs[-1].read_text())["resume"]
    return {**resume, "source": str(runs[-1].relative_to(REPO))}


def _write_results(report: dict[str, Any], raw: Path) -> None:
    hostile, load, kill, outage = report["hostile"], report["load"], report["kill_denoiser"], report["s3_outage"]
    loss, batch = report.get("node_loss"), report.get("batch_resume")
    rss = "; ".join(f"{k.split('#')[0]} " + "→".join("-" if v is None else str(v) for v in values)
                    for k, values in load["rss_mb"].items())
    lost = load["missing"] + kill["missing"] + outage["partial_objects"]

    def seconds(value: float | None, none: str = "none") -> str:
        return f"{value:.1f} s" if value is not None else none

    lines = [
        SECTION, "",
        f"{report['started']}, `python bench/load.py --write-results` on this machine "
        f"({report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}, Ray {report['machine']['ray']}), tiny preset on CPU, "
        f"{report['size']}×{report['size']}, {report['steps']} steps, outputs to a moto S3 server on loopback. "
        "No GPU was lent to this task: every figure here is CPU.", "",
        "| what | figure |", "|---|---|",
        f"| hostile corpus: cases tried | {hostile['cases']} |",
        f"| hostile corpus: answers by status | {hostile['statuses']} |",
        f"| hostile corpus: 5xx / answers not the documented 4xx + message | {hostile['server_errors']} / "
        f"{len(hostile['undocumented'])} |",
        f"| hostile corpus: replica restarts / valid request right after | {hostile['replica_restarts']} / "
        f"{hostile['valid_request_after']} |",
        f"| load: clients / requests | {report['clients']} / {report['requests']} |",
        f"| load: answers | {load['statuses']} |",
        f"| load: p50 / p99 latency of 200s | {load['p50_s']:.2f} s / {load['p99_s']:.2f} s |",
        f"| load: goodput | {load['goodput_img_s']:.1f} images/s over {load['wall_s']:.1f} s |",
        f"| load: outputs missing / orphan objects / sidecars disagreeing | {load['missing']} / {load['orphans']} / "
        f"{load['bad_sidecars']} |",
        f"| load: replica RSS before→halfway→after (MB) | {rss} |",
        f"| fault, denoiser replica killed under load (8 clients, {kill['requests']} requests, killed after "
        f"{kill['answered_before_kill']} answers): answers | {kill['statuses']} |",
        f"| denoiser killed: 5xx that did not say retry | {kill['non_retryable_5xx']} |",
        f"| denoiser killed: first success after the kill | {seconds(kill['recovered_after_s'])} |",
        f"| denoiser killed: outputs missing / orphans | {kill['missing']} / {kill['orphans']} |",
        f"| fault, S3 server stopped: answers while down | {outage['answers_while_down']} (slowest "
        f"{outage['max_answer_s']:.1f} s) |",
        f"| S3 stopped: partial objects visible after it came back | {outage['partial_objects']} |",
        f"| S3 back: first success after restart | {seconds(outage['recovered_after_s'], 'none within 60 s')} |",
    ]
    if loss and "error" not in loss:
        lines += [
            f"| fault, GPU worker node killed (local cluster: head, 1 CPU node, 2 GPU nodes): replicas lost | "
            f"{loss['replicas_on_victim']} |",
            f"| node killed: Ray saw it dead / replicas rescheduled / first success | "
            f"{seconds(loss.get('node_dead_after_s'))} / {seconds(loss.get('rescheduled_after_s'))} / "
            f"{seconds(loss.get('served_after_s'))} after the kill |",
        ]
    elif loss:
        lines.append(f"| fault, GPU worker node killed | failed: {loss['error'][:300]} |")
    if batch:
        lines += [
            f"| fault, batch job killed (SIGKILL) after {batch['outputs_at_kill']} pairs, rerun | skipped "
            f"{batch['skipped']}, generated {sum(batch['this_run'].values())}; manifest and objects exact (no "
            f"duplicates, no losses): {'yes' if batch['exact'] else 'NO'} (`{batch['source']}`) |",
        ]
    lines += [f"| objects lost (reported but missing, or partial) | {lost} |", "", f"Raw JSON: `{raw}`", ""]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    RESULTS.write_text(text.rstrip() + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
