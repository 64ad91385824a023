"""bench/serve_overhead.py's arithmetic and its RESULTS.md writer, without Ray (milliseconds).

The end-to-end run is not tested here: deploying the two apps alone takes 40 s to 2 minutes on a 2-core machine.
Run `python bench/serve_overhead.py --quick` to check the harness end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def sample(e2e: float, **timings: float) -> dict:
    return {"e2e_ms": e2e, "timings_ms": timings, "batch_size": 1, "images": 1, "response_bytes": 500}


def test_overhead_subtracts_the_critical_path_compute_only(bench):
    # face and prompt overlap: only the longer counts; the queue is not compute, so it stays in the overhead.
    timings = dict(face=5.0, prompt=3.0, queue=10.0, denoise=50.0, encode=2.0, write=1.0, total=80.0)
    row = bench.summarize("instantid", 4, 1, [sample(100.0, **timings)], wall_s=0.5, errors=0)

    assert row.compute_p50 == 58.0
    assert row.overhead_p50 == 42.0
    assert row.queue_p50 == 10.0 and row.unqueued_p50 == 32.0
    assert row.http_p50 == 20.0
    assert row.images_per_s == 2.0


def test_verdicts_compare_each_setting_with_the_noop_dag_and_batching_at_most_clients(bench):
    def row(app, batch, clients, overhead, images_per_s):
        return bench.Row(app, batch, clients, 10, 0, 1.0, images_per_s, 0, 0, 0, overhead, 0, 0, overhead, 0, 1, 500)

    rows = [row("instantid", 1, 8, 50.0, 10.0), row("noop", 1, 8, 40.0, 30.0),
            row("instantid", 4, 8, 40.0, 16.0), row("noop", 4, 8, 40.0, 30.0)]
    lines = bench.verdicts(rows)

    assert "= 1.25x (target <= 1.1x: missed)" in lines[0]
    assert "= 1.00x (target <= 1.1x: met)" in lines[1]
    assert "16.00 images/s (max_batch_size 4) vs 10.00 (1) = 1.60x (target >= 1.5x: met)" in lines[2]


def test_write_section_replaces_its_own_section_and_keeps_the_others(bench, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## GPU denoiser (issue 4)\n\ngpu\n\n### run\n\nrows\n")
    bench.write_section(results, f"{bench.SECTION}\n\nfirst\n")
    results.write_text(results.read_text() + "\n## Later section\n\nlater\n")
    bench.write_section(results, f"{bench.SECTION}\n\n### run\n\nsecond\n")

    text = results.read_text()
    assert text.count(bench.SECTION) == 1 and "first" not in text and "second" in text
    assert "## GPU denoiser (issue 4)\n\ngpu\n\n### run\n\nrows\n" in text
    assert text.endswith("## Later section\n\nlater\n")
