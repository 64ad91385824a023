"""A GPU lease's `results.jsonl` -> `bench/RESULTS.md` rows (issue 22), here, after the files came back.

    python -m bench.lease_results /work/.device/<call>/results.jsonl           # print the markdown
    python -m bench.lease_results /work/.device/<call>/results.jsonl --write   # and add it to bench/RESULTS.md

Each run in the file (rows carry their `run` stamp) becomes one block under SECTION: a heading with device, driver,
torch and CUDA versions, the table, the failures and skips, the chosen configuration and the targets. A run already
in RESULTS.md is left as it is, so writing twice changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.lease_rows import read_rows, render

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## GPU lease (issue 22)"


def add_to_results(blocks: list[str], results_md: Path) -> list[str]:
    """Insert each markdown block (one run, starting with its `### ` heading) at the end of SECTION; returns the
    headings added (runs already there are skipped)."""
    current = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    if SECTION not in current:
        current = current.rstrip("\n") + f"\n\n{SECTION}\n"
    added = []
    for block in blocks:
        heading = block.splitlines()[0]
        if heading in current:
            continue
        start = current.index(SECTION) + len(SECTION)
        end = current.find("\n## ", start)
        end = len(current) if end < 0 else end + 1
        tail = current[end:]
        current = current[:end].rstrip("\n") + "\n\n" + block.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
        added.append(heading)
    results_md.write_text(current)
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a lease's results.jsonl")
    parser.add_argument("--write", action="store_true", help=f"add the runs to {RESULTS_MD.name} under {SECTION!r}")
    parser.add_argument("--results-md", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    rows = read_rows(args.results)
    if not rows:
        raise SystemExit(f"{args.results}: no rows")
    runs = list(dict.fromkeys(row.get("run") for row in rows))
    blocks = [render([row for row in rows if row.get("run") == run]) for run in runs]
    print("\n".join(blocks))
    if args.write:
        added = add_to_results(blocks, args.results_md)
        print(f"{args.results_md}: added {len(added)} run(s), {len(blocks) - len(added)} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
