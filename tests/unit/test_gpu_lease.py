"""The GPU lease's entry point on a CPU (issue 22): it runs end to end within its budget, names what it skips, keeps
every finished row when killed, imports nothing the GPU machine lacks beyond the carried wheels, and its output
check refuses what a precision cannot explain."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench import gpu, gpu_lease, lease_results
from bench.lease_rows import read_rows

REPO = Path(__file__).resolve().parents[2]
LEASE_SH = REPO / "bench" / "gpu_lease.sh"
FIRST_PARTY = ("bench", "instantid_core")  # what the lease may import from the tree it travels with

# sitecustomize for the lease's processes (they inherit PYTHONPATH): every finder on sys.meta_path is wrapped so that
# a top-level package outside the device's packages, the carried wheels and the stdlib is not found at all, as on the
# GPU machine (find_spec returns None, import raises ModuleNotFoundError), when our code or a carried wheel imports
# it. A device package's own imports pass: the machine's copy of it (another version than ours) brings what it needs.
DEVICE_SITE = '''
import json, os, sys

_allowed = frozenset(json.loads(os.environ["DEVICE_ALLOWED_MODULES"]))
_device_own = set(json.loads(os.environ["DEVICE_OWN_MODULES"]))  # grows with what those packages import
_log = os.environ["DEVICE_REFUSED_LOG"]
_logged = set()


def _importer():
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__") or ""
        if not (name.startswith(("importlib", "_frozen_importlib")) or name == __name__):
            return name.partition(".")[0]
        frame = frame.f_back
    return ""


class _DeviceOnly:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self._finder, "find_spec", None)
        top = name.partition(".")[0]
        stdlib = top in sys.stdlib_module_names or top in sys.builtin_module_names or top.startswith("_sysconfigdata")
        if top in _allowed or stdlib or top in _device_own:
            return find(name, path, target) if find else None
        if _importer() in _device_own:
            _device_own.add(top)  # a device package's dependency: its own imports are the device's business too
            return find(name, path, target) if find else None
        if top not in _logged and path is None and find and find(name, None, None) is not None:
            _logged.add(top)
            with open(_log, "a") as f:
                f.write(top + "\\n")
        return None

    def __getattr__(self, name):
        return getattr(self._finder, name)


sys.meta_path[:] = [_DeviceOnly(f) for f in sys.meta_path]
'''


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(path: Path) -> dict[str, str | None]:
    """name -> pinned version (or None) of a package list: one `name[==version]` per line, # comments."""
    listed = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            listed[_normalise(name)] = version or None
    return listed


def _modules_of(dists: set[str]) -> set[str]:
    """Top-level modules of these distributions, as installed in this venv."""
    return {module for module, owners in importlib.metadata.packages_distributions().items()
            if any(_normalise(owner) in dists for owner in owners)}


def _allowed_modules() -> tuple[list[str], list[str]]:
    """(what the GPU machine can import: its packages, the carried wheels, the project's own packages; the modules
    of the machine's own packages that are not carried, whose imports are the machine's business)."""
    device, wheels = set(_listed(REPO / "bench" / "device_packages.txt")), set(_listed(REPO / "bench" /
                                                                                      "device_wheels.txt"))
    return sorted(_modules_of(device | wheels) | set(FIRST_PARTY)), sorted(_modules_of(device - wheels))


@pytest.fixture(scope="module")
def device_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("device-site")
    (site / "sitecustomize.py").write_text(DEVICE_SITE)
    refused = site / "refused.txt"
    refused.touch()
    allowed, device_own = _allowed_modules()
    return dict(os.environ, PYTHONPATH=str(site), DEVICE_ALLOWED_MODULES=json.dumps(allowed),
                DEVICE_OWN_MODULES=json.dumps(device_own), DEVICE_REFUSED_LOG=str(refused))


def _lease(out: Path, *args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(LEASE_SH), *args], env=dict(env or os.environ, OUT=str(out)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


BUDGET_S = 35


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory: pytest.TempPathFactory, tiny_root: Path, device_env: dict) -> dict:
    """The lease on the tiny preset, importing only what the GPU machine has, with a budget that fits the baseline
    and one to three more configurations of the six (on a quiet 2-core machine 50 s fitted all but one: too close
    to force a skip), fewer on a loaded machine."""
    out = tmp_path_factory.mktemp("lease-out")
    started = time.monotonic()
    proc = _lease(out, "--tiny", "--models-dir", str(tiny_root), "--device", "cpu", "--budget-s", str(BUDGET_S),
                  "--batches", "1", "--workdir", str(tmp_path_factory.mktemp("lease-work")),
                  env=dict(device_env, OMP_NUM_THREADS="1"))
    stdout, _ = proc.communicate(timeout=180)
    return dict(out=out, stdout=stdout, code=proc.returncode, wall=time.monotonic() - started,
                rows=read_rows(out / "results.jsonl"), refused=Path(device_env["DEVICE_REFUSED_LOG"]).read_text())


def test_small_budget_runs_in_priority_order_and_names_what_it_skips(budget_run):
    assert budget_run["code"] == 0, budget_run["stdout"][-3000:]
    rows = budget_run["rows"]
    assert rows[0]["config"] == "setup" and rows[0]["status"] == "ok"
    by_config = {}
    for row in rows[1:]:
        by_config.setdefault(row["config"], []).append(row)
    # Every item of the lease has its row, in priority order, and nothing ran twice.
    assert list(by_config) == gpu_lease.ITEM_NAMES and all(len(r) == 1 for r in by_config.values())
    statuses = [r[0]["status"] for r in by_config.values()]
    assert statuses[0] == "ok"
    # On a loaded machine a configuration may run out of the budget it started with: a failed row that says so.
    assert all(r[0]["reason"].startswith("timed out") for r in by_config.values() if r[0]["status"] == "failed")
    budget_skips = [r[0] for r in by_config.values() if "budget left" in (r[0].get("reason") or "")]
    assert budget_skips and all(r["status"] == "skipped" for r in budget_skips)
    assert by_config["regional_cudagraphs"][0]["reason"] == "needs a CUDA device"
    assert budget_run["wall"] < BUDGET_S + 20  # the budget holds (plus the shell, interpreter start and the summary)
    markdown = (budget_run["out"] / "results.md").read_text()
    for config, (row, *_) in by_config.items():
        if row["status"] == "skipped":
            assert f"- {config} b1: skipped: {row['reason']}" in markdown
        elif row["status"] == "failed":  # timed out by its share of the budget (checked above): its own line
            assert config in markdown
        elif config == "cold_start":
            assert "| warm cache | " in markdown
        else:
            assert f"| {config} | 1 | ok |" in markdown


def test_lease_imports_nothing_the_device_lacks_beyond_the_carried_wheels(budget_run, device_env, tiny_root,
                                                                          tmp_path):
    # The hook is real: a package installed here but not on the device machine does not import.
    proc = subprocess.run([sys.executable, "-c", "import boto3"], env=device_env, capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'boto3'" in proc.stderr
    # The budget run above (prompt encoding with compel, the denoiser, the output check, the rows) ran in it.
    ran = {r["config"] for r in budget_run["rows"] if r["status"] == "ok"}
    assert {"setup", "baseline"} <= ran, budget_run["stdout"][-3000:]
    # The full-size path's writer (published configs, SDXL pipeline layout) at tiny widths, in it too.
    out = tmp_path / "out"
    proc = _lease(out, "--shrunk", "--models-dir", str(tmp_path / "shrunk"), "--device", "cpu", "--setup-only",
                  "--workdir", str(tmp_path / "work"), env=device_env)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-3000:]
    setup = read_rows(out / "results.jsonl")
    assert [(r["config"], r["status"]) for r in setup] == [("setup", "ok")]
    assert (tmp_path / "shrunk" / ".complete").exists()
    print("installed here, refused as on the device (optional imports):", budget_run["refused"].split())


def test_killed_lease_keeps_every_finished_row(tiny_root, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # One torch thread (as tests/test_bench_gpu.py): on a shared 2-core machine two spin at every op's barrier.
    proc = _lease(out, "--tiny", "--models-dir", str(tiny_root), "--device", "cpu", "--budget-s", "300",
                  "--workdir", str(work), env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    rows_file = out / "results.jsonl"
    deadline = time.monotonic() + 120
    markdown = out / "results.md"
    while time.monotonic() < deadline and proc.poll() is None:
        # The row is appended to results.jsonl, then results.md is rewritten: kill once both have it (a kill
        # between the two would leave the markdown one row behind the jsonl, which is the record).
        if any(r["config"] == "baseline" for r in read_rows(rows_file)) and markdown.exists() \
                and "| baseline | 1 | ok |" in markdown.read_text():
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the lease ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the shell, the runner and tee: what a command timeout takes down
    stdout, _ = proc.communicate(timeout=30)
    lines = rows_file.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is whole: rows are single appends
    finished = re.findall(r"\[lease\] row (\S+) b(\d+): (\w+)", stdout)
    assert {(c, int(b)) for c, b, _ in finished} <= {(r["config"], r["batch"]) for r in rows}
    baseline = [r for r in rows if r["config"] == "baseline"]
    assert baseline and baseline[0]["status"] == "ok" and baseline[0]["batch"] == 1
    assert "[lease] done" not in stdout  # killed part-way through the list
    assert "| baseline | 1 | ok |" in markdown.read_text()
    # The configuration's process died with the runner (PR_SET_PDEATHSIG), it does not run on and append rows.
    time.sleep(1.0)
    alive = [p for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    assert not alive, [p.info["cmdline"] for p in alive]
    assert read_rows(rows_file) == rows


def test_results_command_adds_each_run_to_results_md_once(budget_run, tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n## GPU denoiser (issue 4)\n\ntext\n\n## Batch job (issue 6)\n\nok\n")
    jsonl = str(budget_run["out"] / "results.jsonl")
    assert lease_results.main([jsonl, "--write", "--results-md", str(results_md)]) == 0
    assert lease_results.main([jsonl, "--write", "--results-md", str(results_md)]) == 0
    text = results_md.read_text()
    run = budget_run["rows"][0]["run"]
    assert text.count(f"### {run}Z") == 1
    section = text.index(lease_results.SECTION)
    assert section < text.index(f"### {run}Z") and text.index("## Batch job") < section
    assert "| baseline | 1 | ok |" in text and "not evaluated: not a CUDA device" in text


def _outputs(latents: np.ndarray) -> dict:
    image = np.clip((np.nan_to_num(latents[0, :3]).transpose(1, 2, 0) + 1) * 127.5, 0, 255).astype(np.uint8)
    return dict(latents=latents, image=image)


@pytest.mark.parametrize(("relative_noise", "precision", "verdict"), [
    (1e-3, "float16", "ok"),  # fp16 rounding grown through a few steps
    (2e-2, "float16", "refused"),  # the same kernels giving a visibly different result
    (2e-2, "bfloat16", "ok"),
    (2e-1, "fp8", "ok"),
    (1.0, "fp8", "refused"),  # another image, whatever the precision
])
def test_output_check_refuses_a_candidate_its_precision_cannot_explain(relative_noise, precision, verdict):
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    candidate = reference + relative_noise * rng.standard_normal(reference.shape).astype(np.float32)
    result = gpu.compare_outputs(_outputs(candidate), _outputs(reference), precision, "float16", factor=16.0)
    assert result["check"] == verdict, result
    assert result["latents_rel_rms"] == pytest.approx(relative_noise, rel=0.15)
    nan = candidate.copy()
    nan[0, 0, 0, 0] = np.nan
    assert gpu.compare_outputs(_outputs(nan), _outputs(reference), "fp8", "float16", 16.0)["check"] == "refused"


def test_carried_wheels_are_the_versions_the_project_tests_with():
    pins = {}
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name, _, version = requirement.partition("==")
        pins[_normalise(re.sub(r"\[.*\]", "", name))] = version
    wheels = _listed(REPO / "bench" / "device_wheels.txt")
    assert {"diffusers", "compel", "pydantic"} <= set(wheels)
    for name, version in wheels.items():
        assert version == pins.get(name, importlib.metadata.version(name)), name
