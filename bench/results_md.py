"""The one way a benchmark writes its figures into bench/RESULTS.md: its own `## ...` section replaced (appended
at the end the first time), every other section untouched."""

from __future__ import annotations

from pathlib import Path


def replace_section(results_md: Path, title: str, section: str) -> None:
    """Put `section` (which starts with the `title` line) in place of the section headed `title`."""
    text = results_md.read_text()
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end + 1:] if end != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    results_md.write_text(text)


def write_raw(results_dir: Path, name: str, data: object) -> tuple[str, Path]:
    """The run's raw figures as `results_dir/{name}-{UTC stamp}.json`; returns (the stamp, the file)."""
    import json
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results_dir.mkdir(exist_ok=True)
    raw = results_dir / f"{name}-{stamp}.json"
    raw.write_text(json.dumps(data, indent=2))
    return stamp, raw
