"""`instantid generate` with issue 12's flags (`main(argv)` in this process): swap a face into a photo, and the
flags' mistakes as one error line (exit 2) before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantid_core.img2img import seam_alpha
from testkit.api import FACE as ASTRONAUT
from testkit.cli import run_cli, uri_path


@pytest.mark.slow
def test_inpaint_face_swaps_the_face_into_the_photo_and_leaves_the_rest(tiny_root: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.open(ASTRONAUT).convert("RGB").resize((160, 160)).save(photo)
    result = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--init-image", photo, "--inpaint-face",
                     "--prompt", "a (portrait:1.3)", "--steps", "2", "--seed", "3", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    image_uri, meta_uri = result.stdout.split()
    out = np.asarray(Image.open(uri_path(image_uri)).convert("RGB"))
    before = np.asarray(Image.open(photo).convert("RGB"))
    assert out.shape == before.shape
    changed = np.abs(out.astype(int) - before.astype(int)).sum(-1) > 0
    assert 0.02 < changed.mean() < 0.7  # the face (and its seam), not the photo
    ys, xs = np.nonzero(changed)
    mask = np.zeros(changed.shape, np.uint8)
    mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = 255  # what changed lies in one box around the face
    assert seam_alpha(mask).mean() < 0.8
    meta = json.loads(uri_path(meta_uri).read_text())
    assert meta["params"]["inpaint_face"] and meta["inputs"]["init_image"] == str(photo)


@pytest.mark.parametrize(("flags", "detail"), [
    (["--mask", "{face}"], "needs an init image (--init-image)"),
    (["--inpaint-face"], "inpaint_face needs an init image"),
    (["--strength", "0.5"], "strength needs an init image"),
    (["--init-image", "{face}", "--strength", "1.5"], "strength"),
    (["--style", "Cubism"], "style 'Cubism' is not one of"),
    (["--identity-start", "0.8", "--identity-end", "0.2"], "identity_end"),
])
def test_control_flag_mistakes_are_one_error_line(tmp_path: Path, flags: list[str], detail: str) -> None:
    args = [flag.replace("{face}", str(ASTRONAUT)) for flag in flags]
    line = run_cli("generate", "--weights", tmp_path, "--face", ASTRONAUT, "--prompt", "x", "--out", tmp_path / "out",
                   *args).error_line()
    assert detail in line


def test_a_pose_preset_places_the_face_and_the_sidecar_records_it(tiny_root: Path, tmp_path: Path) -> None:
    result = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--prompt", "x", "--steps", "2",
                     "--width", "64", "--height", "64", "--pose-preset", "three_quarter_left", "--pose-box",
                     "8,8,56,56", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    meta = json.loads(uri_path(result.stdout.split()[1]).read_text())
    assert meta["params"]["pose"] == {"preset": "three_quarter_left", "box": [8.0, 8.0, 56.0, 56.0]}


@pytest.mark.parametrize(("flags", "detail"), [
    (["--pose-preset", "frontal"], "pose.box"),  # a preset needs its box
    (["--pose-preset", "frontal", "--pose-box", "8,8,56"], "give 4 comma-separated numbers"),
    (["--pose-preset", "sideways", "--pose-box", "8,8,56,56"], "frontal"),  # the choices are listed
    (["--pose-preset", "frontal", "--pose-box", "8,8,900,900"], "pose.box"),  # beyond the 64 x 64 output
    (["--keypoints", "1,2,3"], "give 10 comma-separated numbers"),
])
def test_pose_flag_mistakes_are_one_error_line(tiny_root: Path, tmp_path: Path, flags: list[str],
                                               detail: str) -> None:
    line = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--prompt", "x", "--width", "64",
                   "--height", "64", "--out", tmp_path / "out", *flags).error_line()
    assert detail in line, line
