"""The GPU lease's rows (issue 22): one JSON object per line in `results.jsonl`, and `results.md` beside it.

Every process that finishes a row appends it here at once (the lease runner for skipped, timed-out and cold-start
rows, each configuration's own process for its batch sizes), so a lease cut short keeps every finished row. A row
is one write of one line to a file opened for appending; a line torn by a kill mid-write is the only one a reader
drops. `results.md` is rewritten from the whole file after each row (written aside, then renamed).

Row fields (at least): `run`, `config`, `batch`, `status` (ok | skipped | failed), and for ok rows the figures
(`s_per_image`, `images_per_s`, `it_per_s`, `first_call_s`, `peak_mem_gib`, ...) and the output check (`check`: ok |
refused | reference | no baseline, `latents_rel_rms`, `allowed_rel_rms`, `image_max_abs_diff`, `image_psnr_db`);
failed rows keep `reason` (one line) and `error` (the full text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

OK, SKIPPED, FAILED = "ok", "skipped", "failed"
STATUS = {"error": FAILED}  # bench/gpu.py's run_config says "error" for a failed configuration

# Targets of issues 4 and 22, read only on a CUDA device with full-size models.
TARGET_S_PER_IMAGE = 1.2
TARGET_SPEEDUP = 2.0
TARGET_B4_IMAGES_PER_S = 1.2
TARGET_COLD_START_S = 60.0


class RowWriter:
    """Appends rows to a JSON lines file and rewrites the markdown table beside it (`<name>.md`)."""

    def __init__(self, path: Path, tags: dict | None = None) -> None:
        self.path = Path(path)
        self.tags = dict(tags or {})

    def append(self, row: dict) -> None:
        row = self.tags | dict(row)
        row["status"] = STATUS.get(row.get("status"), row.get("status"))
        line = json.dumps(row, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as file:  # O_APPEND: one write per row, never interleaved
            file.write(line)
            file.flush()
            os.fsync(file.fileno())
        markdown = self.path.with_suffix(".md")
        staging = markdown.with_suffix(f".md.{os.getpid()}.tmp")
        staging.write_text(render(read_rows(self.path)))
        staging.replace(markdown)


def read_rows(path: Path) -> list[dict]:
    """Every complete row of a results.jsonl file, in order (a last line torn by a kill is dropped)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def chosen(rows: list[dict]) -> dict | None:
    """The fastest row at batch 1 that ran, may be chosen, and passed the output check (or is the baseline)."""
    ok = [r for r in rows if r.get("batch") == 1 and r.get("status") == OK and r.get("candidate", True)
          and r.get("check") in ("ok", "reference") and r.get("s_per_image")]
    return min(ok, key=lambda r: r["s_per_image"]) if ok else None


def speedups(rows: list[dict]) -> dict[tuple[str, int], float]:
    base = {r["batch"]: r for r in rows if r.get("config") == "baseline" and r.get("status") == OK
            and r.get("images_per_s")}
    return {(r["config"], r["batch"]): r["images_per_s"] / base[r["batch"]]["images_per_s"] for r in rows
            if r.get("status") == OK and r.get("images_per_s") and r.get("batch") in base}


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets against one run's rows; not evaluated off CUDA or on small models."""
    first = rows[0] if rows else {}
    if not str(first.get("device", "")).startswith("cuda") or first.get("models") not in ("sdxl-random",):
        return ["not evaluated: not a CUDA device with full-size models"]
    best = chosen(rows)
    if best is None:
        return ["no configuration passed the output check"]
    gain = speedups(rows).get((best["config"], 1))
    lines = [f"batch 1, {best['config']}: {best['s_per_image']:.3f} s/image (target <= {TARGET_S_PER_IMAGE}): "
             f"{'met' if best['s_per_image'] <= TARGET_S_PER_IMAGE else 'missed'}"]
    if gain is not None:
        lines.append(f"vs fp16 eager baseline: {gain:.2f}x (target >= {TARGET_SPEEDUP}x): "
                     f"{'met' if gain >= TARGET_SPEEDUP else 'missed'}")
    b4 = [r for r in rows if r.get("batch") == 4 and r.get("status") == OK and r.get("check") in ("ok", "reference")
          and r.get("images_per_s")]
    if b4:
        top = max(b4, key=lambda r: r["images_per_s"])
        met = top["images_per_s"] >= TARGET_B4_IMAGES_PER_S
        lines.append(f"batch 4, {top['config']}: {top['images_per_s']:.2f} images/s (target >= "
                     f"{TARGET_B4_IMAGES_PER_S}): {'met' if met else 'missed'}")
    cold = [r for r in rows if r.get("config") == "cold_start" and r.get("status") == OK]
    if cold:
        first_image = cold[0]["first_image_s"]
        lines.append(f"cold start with a warm compile cache ({cold[0].get('source')}): {first_image:.1f} s (target < "
                     f"{TARGET_COLD_START_S}): {'met' if first_image < TARGET_COLD_START_S else 'missed'}")
    return lines


HEADER = ("| config | batch | status | s/image | images/s | it/s | vs base | first call s | peak GiB | check "
          "| latents diff (allowed) | image max diff | PSNR dB |")


def table(rows: list[dict]) -> list[str]:
    gains = speedups(rows)
    lines = [HEADER, "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r.get("config") in ("cold_start", "setup"):  # their own table / the run's heading
            continue
        if r.get("latents_rel_rms") is not None:
            diff = f"{fmt(r['latents_rel_rms'])} ({fmt(r.get('allowed_rel_rms'))})"
        else:
            diff = "-"
        psnr = "identical" if r.get("image_max_abs_diff") == 0 else fmt(r.get("image_psnr_db"))
        cells = [r.get("config"), r.get("batch"), r.get("status"), fmt(r.get("s_per_image")),
                 fmt(r.get("images_per_s")), fmt(r.get("it_per_s")), fmt(gains.get((r.get("config"), r.get("batch")))),
                 fmt(r.get("first_call_s")), fmt(r.get("peak_mem_gib")), r.get("check") or "-", diff,
                 fmt(r.get("image_max_abs_diff")), psnr]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    cold = [r for r in rows if r.get("config") == "cold_start"]
    if cold:
        lines += ["", "| cold start | from compile cache of | status | imports s | ready s | first image s |",
                  "|---|---|---|---:|---:|---:|"]
        lines += [f"| warm cache | {r.get('source', '-')} | {r['status']} | {fmt(r.get('imports_s'))} | "
                  f"{fmt(r.get('ready_s'))} | {fmt(r.get('first_image_s'))} |" for r in cold]
    notes = [r for r in rows if r.get("status") in (SKIPPED, FAILED) or r.get("check") == "refused"]
    if notes:
        lines.append("")
        for r in notes:
            why = r.get("check_reason") if r.get("status") == OK else r.get("reason")
            lines.append(f"- {r.get('config')} b{r.get('batch')}: {r.get('status')}"
                         f"{', output refused' if r.get('check') == 'refused' else ''}: "
                         f"{(why or '').splitlines()[0][:300] if why else '-'}")
    return lines


def describe_run(rows: list[dict]) -> str:
    first = rows[0]
    where = first.get("gpu") or f"CPU ({first.get('cpu', '?')})"
    versions = f"torch {first.get('torch')}, transformers {first.get('transformers')}"
    if first.get("cuda"):
        versions += f", CUDA {first.get('cuda')}, driver {first.get('driver')}"
    return (f"### {str(first.get('run', '?'))[:19]}Z, {where}, models {first.get('models')}\n\n- {versions}; "
            f"{first.get('width')}x{first.get('height')}, {first.get('steps')} steps, guidance 5, Euler; budget "
            f"{fmt(first.get('budget_s'))} s")


def render(rows: list[dict]) -> str:
    """Markdown for every run in `rows`: a heading, the table, the failures and skips, the choice and targets."""
    parts = []
    for run in dict.fromkeys(r.get("run") for r in rows):
        mine = [r for r in rows if r.get("run") == run]
        best = chosen(mine)
        body = [describe_run(mine), "", *table(mine), "",
                f"- chosen (fastest at batch 1 that passed the output check): {best['config'] if best else 'none'}"]
        body += [f"- target: {line}" for line in targets(mine)]
        parts.append("\n".join(body))
    return "\n\n".join(parts) + "\n"
