"""bench/gpu.py as a harness: every configuration row, the output check, FLOPs, cold start, the full-size writer.

These check the harness on a CPU, not speed (the numbers of a shared CPU runner mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
GPU_BENCH = BENCH / "gpu.py"


# One torch (OpenMP) thread per bench process: on a shared 2-core runner, two threads spin at every op's barrier
# while the other is descheduled, and the same quick run took 3x the CPU and up to 40x the wall time of one thread
# (fp16 on a CPU is thousands of tiny ops). The rows' timings are not what these tests check.
BENCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(GPU_BENCH), "--device", "cpu", "--quick", "--results-dir", str(results),
                           *args], capture_output=True, text=True, timeout=900, env=BENCH_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(results.glob("gpu-cpu-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text()), proc.stdout


@pytest.mark.slow
def test_tiny_quick_run_reports_every_configuration(tmp_path, tiny_root):
    # Batch 1 and one timed call only: a CPU runner is shared, and the loops are the same code for every size and
    # repeat. The session's tiny preset: the bench reads it as it is (ensure_tiny_preset writes only a folder that
    # is not complete). The cold-start children run the eager baseline: the harness (a fresh process per cache
    # state, ready and first-image times) is the same for every configuration, and the default's compile (its rows
    # above compile it already) cost each child ~10 s here.
    report, stdout = _run_bench(tmp_path, "--tiny", "--models-dir", str(tiny_root), "--batches", "1", "--repeats", "1",
                                "--cold-config", "baseline")
    from bench import gpu

    assert report["schema"] == gpu.SCHEMA and report["plan"]["models"] == "tiny"
    batches = report["plan"]["batches"]
    assert {(row["config"], row["batch"]) for row in report["rows"]} == {(c.name, b) for c in gpu.CONFIGS
                                                                          for b in batches}
    needs_cuda = {c.name for c in gpu.CONFIGS if c.needs_cuda}
    for row in report["rows"]:
        if row["config"] in needs_cuda:
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
            continue
        assert row["status"] in ("ok", "mismatch"), row
        for name in ("s_per_image", "it_per_s", "images_per_s", "first_call_s", "mfu", "max_abs_diff"):
            assert isinstance(row[name], (int, float)) and row[name] >= 0, (name, row)
        assert len(row["call_s_all"]) == report["plan"]["repeats"]
        assert row["within_tolerance"] == (row["status"] == "ok")
    baseline = [row for row in report["rows"] if row["config"] == "baseline"]
    assert all(row["max_abs_diff"] == 0 and row["psnr_db"] is None for row in baseline)
    assert report["matmul"]["tflops"] > 0 and report["flops"]["per_step"] > 0 and report["flops"]["fixed"] > 0
    assert [(c["config"], c["cache"]) for c in report["cold_start"]] == [("baseline", "empty_cache"),
                                                                          ("baseline", "warm_cache")]
    assert all(c["status"] == "ok" and c["first_image_s"] >= c["ready_s"] > 0 for c in report["cold_start"])
    assert report["chosen"] is not None and report["chosen"]["batch"] == 1
    assert "| config | batch | status |" in stdout and "not evaluated" in stdout


@pytest.mark.slow
def test_isolated_run_on_the_shrunk_published_layout(tmp_path):
    # The full-size writer at tiny widths (same depths, same file layout), each configuration in its own process.
    report, _ = _run_bench(tmp_path, "--shrunk", "--models-dir", str(tmp_path / "shrunk"), "--configs",
                           "fp32_reference,sdpa_flash", "--batches", "1", "--isolate", "--no-cold-start")
    rows = {row["config"]: row for row in report["rows"]}
    assert report["isolate"] and rows["fp32_reference"]["status"] == "ok" and rows["sdpa_flash"]["status"] == "skipped"
    assert rows["fp32_reference"]["mfu"] > 0  # FLOPs counted in the child process
    adapter = torch.load(tmp_path / "shrunk" / "InstantID" / "ip-adapter.bin", weights_only=True)
    assert len(adapter["ip_adapter"]) == 140  # 70 decoupled cross-attention layers, as in the published file
    assert {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"} <= {
        p.name for p in (tmp_path / "shrunk" / "sdxl").iterdir()}


def test_published_configs_build_the_published_architectures():
    from bench import sdxl_configs as published

    with torch.device("meta"):
        unet = published.build_unet()
        models = dict(unet=unet, vae=published.build_vae(), identitynet=published.build_identitynet(unet))
        models["text_encoder"], models["text_encoder_2"] = published.build_text_encoders()
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == published.PUBLISHED_PARAMS
    image_proj = published.resampler_state_dict(None, "meta")
    assert image_proj["layers.0.0.to_q.weight"].shape == (1280, 1280)  # 20 heads x 64
    assert image_proj["proj_out.weight"].shape == (2048, 1280) and image_proj["latents"].shape == (1, 16, 1280)
