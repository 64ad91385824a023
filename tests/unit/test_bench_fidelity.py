"""bench/fidelity.py on the tiny preset, in-process: one image per (photo, prompt) pair through the product's
pipeline with scoring, the scoring recogniser's Face Sim and a tiny CLIP's CLIP-T in one table row, and the notice
that random weights make the numbers meaningless."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import fidelity


def test_tiny_run_reports_face_sim_and_clip_t_for_every_pair(tiny_root: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a portrait photo\n")
    assert fidelity.main(["--weights", str(tiny_root), "--prompts", str(prompts), "--clip", "tiny", "--steps", "2",
                          "--size", "64"]) == 0
    out, err = capsys.readouterr()
    assert fidelity.TINY_NOTE in out and fidelity.TINY_NOTE in err
    assert "scorer: a recogniser of its own (scoring_face_pack)" in out  # the preset's second pack, not its own
    (row,) = re.findall(r"^\| 1 \| 1 \| 1 \| (\d) \| (\S+) \| (\S+) \|$", out, flags=re.M)
    found, face_sim, clip_t = int(row[0]), row[1], row[2]
    assert face_sim == "-" if found == 0 else -1 <= float(face_sim) <= 1
    assert -100 <= float(clip_t) <= 100  # CLIP-T: 100 x cosine
