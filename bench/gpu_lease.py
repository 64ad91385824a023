"""One GPU lease, one command (issue 22): the denoiser benchmark in priority order under a time budget.

    OUT=dir bench/gpu_lease.sh --device cuda --budget-s 540       # on a lent GPU (the device call: bench/README.md)
    OUT=dir bench/gpu_lease.sh --tiny --device cpu --budget-s 90  # the same run here, on the tiny preset
    python -m bench.lease_results dir/results.jsonl --write       # its rows into bench/RESULTS.md

A lease is about 15 minutes, 10 per command: the run must bring back whatever it finished. So:
- the models are written once (full-size SDXL + InstantID shapes, random weights; `gpu.write_random_sdxl`), the
  prompt encoded once, inside the budget;
- `ITEMS` run in order, each configuration in its own process (`python -m bench.gpu --_child`) with its own
  timeout; an item whose estimate (from the baseline's measured times once it has run) exceeds what is left of
  `--budget-s` is skipped, and the skip is a row;
- each process appends its row to `$OUT/results.jsonl` (and rewrites `$OUT/results.md`) the moment a batch size
  ends (`lease_rows.RowWriter`); a configuration that fails or times out gets rows with its full error text;
- every candidate is checked against the fp16 baseline at the same seed (`gpu.output_check`): a few steps' latents
  and image, refused when the difference is far outside what its precision explains.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import gpu
from bench.lease_rows import FAILED, OK, SKIPPED, RowWriter, read_rows, render

REPO = gpu.REPO
ERROR_CHARS = 20_000  # a failed row keeps this much of its process's output: the whole traceback, in practice


@dataclass(frozen=True)
class LeaseItem:
    """One step of the lease: a configuration of `gpu.CONFIGS` at some batch sizes, or the cold start."""

    config: str
    batches: tuple[int, ...] = (1,)
    relative_cost: float = 1.0  # expected time per call vs the baseline's (for the budget estimate)
    compile_s: float = 0.0  # compile allowance per batch size on CUDA with inductor (for the budget estimate)
    cold_from: tuple[str, ...] = ()  # cold start: the first of these that finished gives its compile cache


# Priority order (issue 22). Batch 4 for the baseline and for FP8 + regional compile, the expected winner (each
# batch size is another compile); FP8 rides on regional compile: eager, its quantisation is extra kernels. The
# compile allowances are guesses (regional compile of SDXL's blocks: tens of seconds) until a lease measures them.
ITEMS = (
    LeaseItem("baseline", (1, 4)),
    LeaseItem("bf16", (1,)),
    LeaseItem("compile_regional", (1,), relative_cost=0.8, compile_s=30),
    LeaseItem("fp8_regional", (1, 4), relative_cost=0.7, compile_s=40),
    LeaseItem("regional_cudagraphs", (1,), relative_cost=0.7, compile_s=60),
    LeaseItem("cold_start", (1,), relative_cost=0.8, compile_s=30, cold_from=("fp8_regional", "compile_regional")),
)
ITEM_NAMES = [item.config for item in ITEMS]


# --- budget ---------------------------------------------------------------------------------------------------
@dataclass
class Seen:
    """What the run has measured so far, for estimates: a process's fixed cost and seconds per call by batch."""

    overhead_s: float
    call_s: dict[int, float]

    @classmethod
    def guess(cls, cuda: bool, full_size: bool) -> Seen:
        if cuda and full_size:  # SDXL + IdentityNet, 1024^2, 30 CFG steps (596 TFLOP) at ~150 TFLOP/s fp16 eager
            return cls(overhead_s=40.0, call_s={1: 4.0, 2: 8.0, 4: 16.0})
        return cls(overhead_s=12.0, call_s={1: 1.0, 2: 2.0, 4: 4.0})

    def call(self, batch: int) -> float:
        if batch in self.call_s:
            return self.call_s[batch]
        known = max(self.call_s)
        return self.call_s[known] * batch / known


def estimate(item: LeaseItem, plan: gpu.Plan, seen: Seen) -> float:
    """Seconds this item should take: process + load, its calls at the seen speed, compiles on CUDA."""
    compiling = plan.compile_backend == "inductor" and gpu.is_cuda(plan.device)
    if item.cold_from:  # text encoders and the prompt too, then the warm-up call and the first image
        return 1.5 * seen.overhead_s + 2 * seen.call(1) * item.relative_cost + (item.compile_s if compiling else 0.0)
    calls = 1 + plan.warm_calls + plan.repeats
    seconds = seen.overhead_s + seen.call(1) * plan.check_steps / plan.steps
    for batch in item.batches:
        seconds += calls * seen.call(batch) * item.relative_cost + (item.compile_s if compiling else 0.0)
    return seconds


def learn(seen: Seen, rows: list[dict], wall_s: float, plan: gpu.Plan) -> None:
    """Update the estimates from a finished eager configuration's rows and its process's wall time."""
    ok = [r for r in rows if r.get("status") == OK and r.get("call_s")]
    if not ok:
        return
    seen.call_s = {r["batch"]: r["call_s"] for r in ok}
    calls = sum((1 + plan.warm_calls + plan.repeats) * r["call_s"] for r in ok) + (ok[0].get("check_call_s") or 0.0)
    seen.overhead_s = max(wall_s - calls, 1.0)


# --- child processes ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it when the lease runner dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Runner:
    def __init__(self, plan: gpu.Plan, writer: RowWriter, workdir: Path, deadline: float) -> None:
        self.plan, self.writer, self.workdir, self.deadline = plan, writer, workdir, deadline
        self.current: subprocess.Popen | None = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def rows(self, config: str) -> list[dict]:
        run = self.writer.tags["run"]
        return [r for r in read_rows(self.writer.path) if r.get("run") == run and r.get("config") == config]

    def skip(self, item: LeaseItem, reason: str) -> None:
        for batch in item.batches:
            self.writer.append(dict(config=item.config, batch=batch, status=SKIPPED, reason=reason))
        print(f"[lease] {item.config}: skipped: {reason}", flush=True)

    def spawn(self, args: list[str], timeout: float, log: Path) -> tuple[int | None, float, str]:
        """Run `python -m bench.gpu ARGS` in its own process group; returns (exit code or None on timeout, wall
        seconds, the tail of its output)."""
        started = time.monotonic()
        with open(log, "w") as output:
            self.current = subprocess.Popen([sys.executable, "-m", "bench.gpu", *args], cwd=REPO, stdout=output,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)
            try:
                code = self.current.wait(timeout=max(timeout, 1.0))
            except subprocess.TimeoutExpired:
                self.kill()
                code = None
            finally:
                self.current = None
        return code, time.monotonic() - started, log.read_text(errors="replace")[-ERROR_CHARS:]

    def kill(self) -> None:
        if self.current is not None and self.current.poll() is None:
            try:
                os.killpg(self.current.pid, signal.SIGKILL)  # the child and whatever it started (compile workers)
            except ProcessLookupError:
                pass
            self.current.wait()

    def run_config(self, item: LeaseItem, timeout: float) -> tuple[list[dict], float]:
        plan = replace(self.plan, batches=list(item.batches))
        plan_file = self.workdir / f"plan-{item.config}.json"
        plan_file.write_text(json.dumps(asdict(plan)))
        code, wall, output = self.spawn(["--_child", item.config, "--_plan", str(plan_file), "--_out",
                                         str(self.workdir / f"result-{item.config}.json")], timeout,
                                        self.workdir / f"log-{item.config}.txt")
        done = {r["batch"] for r in self.rows(item.config)}
        missing = [b for b in item.batches if b not in done]
        if missing:  # killed or crashed before its row: the row says how, with the process's output
            reason = (f"timed out after {wall:.0f} s (its share of the budget)" if code is None
                      else f"process exited with code {code} before finishing")
            for batch in missing:
                self.writer.append(dict(config=item.config, batch=batch, status=FAILED, reason=reason,
                                        error=output, wall_s=wall))
        return self.rows(item.config), wall

    def run_cold_start(self, item: LeaseItem, source: str, timeout: float) -> None:
        """A fresh process from imports to the first image, with the compile cache `source` left behind."""
        plan = replace(self.plan, batches=[1])
        plan_file = self.workdir / "plan-cold.json"
        plan_file.write_text(json.dumps(asdict(plan)))
        marks_file = self.workdir / "cold-marks.json"
        marks_file.unlink(missing_ok=True)
        spawned = time.time()
        code, wall, output = self.spawn(["--_cold", source, "--_plan", str(plan_file), "--_out", str(marks_file),
                                         "--_cache", str(self.workdir / f"compile-cache-{source}")], timeout,
                                        self.workdir / "log-cold-start.txt")
        row = dict(config=item.config, batch=1, source=source, wall_s=wall)
        if code == 0 and marks_file.exists():
            marks = json.loads(marks_file.read_text())
            row |= dict(status=OK, imports_s=marks["imported"] - spawned, ready_s=marks["ready"] - spawned,
                        first_image_s=marks["first_image"] - spawned, warmup_s=marks["warmup_s"])
        else:
            row |= dict(status=FAILED, error=output, reason=(f"timed out after {wall:.0f} s" if code is None
                                                             else f"process exited with code {code}"))
        self.writer.append(row)


# --- the lease -----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run, models written included")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="where results.jsonl/.md go (default $OUT)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (CPU check of the whole run)")
    parser.add_argument("--shrunk", action="store_true", help="SDXL's depths at tiny widths (the writer on a CPU)")
    parser.add_argument("--weights", help="real weights, laid out as ModelSources.from_root(DIR) expects")
    parser.add_argument("--models-dir", help="where the random models (or the tiny preset) are written once")
    parser.add_argument("--items", help=f"comma-separated subset, run in priority order: {', '.join(ITEM_NAMES)}")
    parser.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")),
                        help="batch sizes for every configuration (default per item: baseline 1,4 ...)")
    parser.add_argument("--size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, help="timed calls per batch size (median; default 3, small models 2)")
    parser.add_argument("--check-steps", type=int, help="steps of the output check call (default 4; small 2)")
    parser.add_argument("--check-factor", type=float, default=16.0,
                        help="refuse a candidate whose latents differ by more than this x its unit roundoff")
    parser.add_argument("--fp8-backend", choices=("auto", "scaled_mm", "emulated"),
                        help="default: auto on CUDA (the FP8 kernel); elsewhere the CPU's torch._scaled_mm if this "
                        "torch has one, else emulated (numerics only)")
    parser.add_argument("--compile-backend", help="inductor (default on CUDA) or eager (default elsewhere)")
    parser.add_argument("--setup-only", action="store_true", help="write the models, encode the prompt, stop")
    parser.add_argument("--workdir", help="scratch folder (prompt, plans, check outputs, compile caches, logs)")
    return parser.parse_args(argv)


def select_items(args: argparse.Namespace) -> list[LeaseItem]:
    items = list(ITEMS)
    if args.items:
        wanted = args.items.split(",")
        unknown = set(wanted) - set(ITEM_NAMES)
        if unknown:
            raise SystemExit(f"--items: unknown {sorted(unknown)}; known: {', '.join(ITEM_NAMES)}")
        items = [item for item in items if item.config in wanted]
    if args.batches:
        items = [item if item.cold_from else replace(item, batches=args.batches) for item in items]
    return items


def make_plan(args: argparse.Namespace, workdir: Path) -> gpu.Plan:
    small = args.tiny or args.shrunk
    bench_args = argparse.Namespace(
        device=args.device, tiny=args.tiny, shrunk=args.shrunk, weights=args.weights, models_dir=args.models_dir,
        quick=small, size=args.size, steps=args.steps, batches=[1], repeats=args.repeats or (2 if small else 3),
        psnr_min=30.0, compile_backend=args.compile_backend, fp8_backend=args.fp8_backend)
    plan = gpu.build_plan(bench_args, workdir)
    return replace(plan, warm_calls=1, check_steps=args.check_steps or (2 if small else 4),
                   check_factor=args.check_factor)


def environment(device: str) -> dict:
    import huggingface_hub
    import transformers

    env = gpu.environment(device)
    keep = ("torch", "diffusers", "python", "gpu", "cuda", "cudnn", "driver", "cpu", "cpu_count")
    # The machine's transformers and huggingface-hub are not our pins: the rows say which ran.
    return {key: env.get(key) for key in keep} | dict(transformers=transformers.__version__,
                                                      huggingface_hub=huggingface_hub.__version__)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if not args.out:
        raise SystemExit("--out (or $OUT) is required: the folder results.jsonl and results.md go to")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = select_items(args)
    deadline = started + args.budget_s
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="instantid-lease-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("check-*.npz"):  # the output check compares within one run only
        stale.unlink()
    run = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "")
    writer = RowWriter(out / "results.jsonl", dict(run=run, device=args.device, budget_s=args.budget_s))
    runner = Runner(None, writer, workdir, deadline)  # type: ignore[arg-type]  # the plan follows the setup

    def stop(signum, frame):  # the device's command timeout: take the current configuration down with us
        runner.kill()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    print(f"[lease] run {run}: budget {args.budget_s:.0f} s, items {', '.join(i.config for i in items)}", flush=True)
    try:
        plan = make_plan(args, workdir)
        gpu.encode_prompt(plan)
        matmul = gpu.measure_matmul(plan.device)
        if gpu.is_cuda(plan.device):
            torch.cuda.empty_cache()  # the configurations' processes get the GPU's memory
    except Exception as exc:
        writer.append(dict(config="setup", batch=0, status=FAILED, reason=f"{type(exc).__name__}: {exc}"[:400],
                           error=traceback.format_exc()))
        print(f"[lease] setup failed: {exc}", flush=True)
        return 1
    tags = writer.tags | environment(plan.device) | dict(models=plan.models, width=plan.width, height=plan.height,
                                                         steps=plan.steps)
    writer.tags = tags
    runner.plan = replace(plan, rows_file=str(writer.path), row_tags=tags)
    writer.append(dict(config="setup", batch=0, status=OK, seconds=time.monotonic() - started,
                       matmul_tflops=matmul["tflops"], note="models written or found, prompt encoded"))
    (out / "run.json").write_text(json.dumps(dict(tags=tags, plan=asdict(plan), matmul=matmul,
                                                  items=[asdict(i) for i in items]), indent=1, default=str))
    if args.setup_only:
        items = []
    full_size = plan.models == "sdxl-random" or plan.models.startswith("weights:")
    seen = Seen.guess(gpu.is_cuda(plan.device), full_size)
    configs = {c.name: c for c in gpu.CONFIGS}
    for item in items:
        remaining = runner.remaining()
        config = configs.get(item.config)
        if config is not None and config.needs_cuda and not gpu.is_cuda(plan.device):
            runner.skip(item, "needs a CUDA device")
            continue
        source = None
        if item.cold_from:
            source = next((name for name in item.cold_from if any(r.get("status") == OK for r in runner.rows(name))),
                          None)
            if source is None:
                runner.skip(item, f"none of {', '.join(item.cold_from)} finished in this run (no compile cache)")
                continue
        needed = estimate(item, plan, seen)
        if needed > remaining:
            runner.skip(item, f"needs about {needed:.0f} s, {max(remaining, 0):.0f} s of the {args.budget_s:.0f} s "
                        "budget left")
            continue
        timeout = min(remaining, max(3 * needed, 60.0))
        print(f"[lease] {item.config} (batches {','.join(map(str, item.batches))}): estimate {needed:.0f} s, "
              f"timeout {timeout:.0f} s, {remaining:.0f} s left", flush=True)
        if source is not None:
            runner.run_cold_start(item, source, timeout)
            rows = runner.rows(item.config)
        else:
            rows, wall = runner.run_config(item, timeout)
            if item.config == "baseline" or (config is not None and not gpu.compiles(config.accel)
                                             and not any(r.get("config") == "baseline" and r.get("status") == OK
                                                         for r in runner.rows("baseline"))):
                learn(seen, rows, wall, plan)
        for row in rows:
            print(f"[lease] row {row['config']} b{row['batch']}: {row['status']}"
                  f"{' check ' + row['check'] if row.get('check') else ''}", flush=True)
    mine = [r for r in read_rows(writer.path) if r.get("run") == run and r.get("config") != "setup"]
    print(render(mine), flush=True)
    print(f"[lease] done in {time.monotonic() - started:.0f} s of {args.budget_s:.0f} s; rows in {writer.path}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
