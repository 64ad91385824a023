"""The `instantid` command: `main(argv)` in this process (its exit code and what it prints), and as a user runs it,
the installed console script in a subprocess (a fresh interpreter: imports, warnings and exit codes as they are).

Expected failures must end with exit code 2 and one `error:` line that names the problem, never a traceback.
Sizes and steps are the smallest the parameters allow (64x64, 2 steps), so a model-loading run takes seconds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from testkit.api import FACE as ASTRONAUT
from testkit.cli import run_cli, run_cli_subprocess, uri_path
from testkit.tiny import write_tiny_lcm_lora

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]
WARNING_LINE = re.compile(r"\b\w+Warning: ")


@pytest.fixture
def blank_png(tmp_path: Path) -> Path:
    path = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    return path


@pytest.mark.slow
def test_weights_tiny_check_and_generate_write_a_png_and_sidecar(tmp_path: Path) -> None:
    """As a user runs it: `weights tiny` and `weights check` through main(), then `generate` as the console script in
    a fresh process (imports, warnings and exit code as a user meets them)."""
    weights, out = tmp_path / "weights", tmp_path / "out"

    tiny = run_cli("weights", "tiny", weights)
    assert tiny.returncode == 0, tiny.stderr
    assert f"wrote the tiny preset to {weights}" in tiny.stdout

    check = run_cli("weights", "check", weights)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: ") and str(weights / "sdxl") in check.stdout

    gen = run_cli_subprocess("generate", "--weights", weights, "--face", ASTRONAUT, "--prompt",
                             "an astronaut, watercolor", "--style", "Watercolor", "--seed", "7", *SMALL, "--out", out,
                             cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    image_uri, meta_uri = gen.stdout.split()
    assert image_uri.endswith("/0.png") and meta_uri.endswith("/meta.json")

    image_path, meta_path = uri_path(image_uri), uri_path(meta_uri)
    assert image_path.is_relative_to(out) and image_path.parent == meta_path.parent
    with Image.open(image_path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
    meta = json.loads(meta_path.read_text())
    assert meta["images"] == [image_uri]
    assert meta["seed"] == 7 and (meta["width"], meta["height"]) == (64, 64)
    assert meta["params"]["steps"] == 2 and meta["params"]["style"] == "Watercolor"
    assert meta["inputs"]["face"] == [str(ASTRONAUT)]
    assert set(meta["timings_s"]) >= {"face", "prompt", "denoise"}

    # What a user sees on stderr: the timings line, no third-party warnings (see instantid_core/quiet.py).
    assert "timings: face=" in gen.stderr
    assert "requires torchvision" not in gen.stderr
    assert not WARNING_LINE.search(gen.stderr), gen.stderr


@pytest.mark.slow
def test_generate_on_a_blank_image_exits_2_naming_the_file(tiny_root: Path, tmp_path: Path, blank_png: Path) -> None:
    result = run_cli("generate", "--weights", tiny_root, "--face", blank_png, "--prompt", "x", *SMALL,
                     "--out", tmp_path / "out")
    line = result.error_line()
    assert str(blank_png) in line and "no face found" in line
    assert not (tmp_path / "out").exists()


def test_generate_with_a_text_file_as_face_exits_2_naming_the_file(tiny_root: Path, tmp_path: Path) -> None:
    note = tmp_path / "face.txt"
    note.write_text("not a photo\n")
    line = run_cli("generate", "--weights", tiny_root, "--face", note, "--prompt", "x", *SMALL,
                   "--out", tmp_path / "out").error_line()
    assert str(note) in line and "is not an image" in line


def test_generate_with_a_missing_face_file_exits_2(tiny_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"
    line = run_cli("generate", "--weights", tiny_root, "--face", missing, "--prompt", "x", *SMALL,
                   "--out", tmp_path / "out").error_line()
    assert f"cannot read {missing}" in line


@pytest.mark.parametrize(("flags", "field", "detail"), [
    (["--steps", "0"], "steps", "greater than or equal to 1"),
    (["--width", "65", "--height", "64"], "width", "multiple of 8"),
    (["--guidance", "50"], "guidance", "less than or equal to 20"),
    (["--width", "64"], "parameters", "give both width and height"),
])
def test_generate_with_a_bad_parameter_exits_2_naming_the_field(
        tiny_root: Path, tmp_path: Path, flags: list[str], field: str, detail: str) -> None:
    result = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--prompt", "x", *flags,
                     "--out", tmp_path / "out")
    line = result.error_line()
    assert line.startswith(f"error: {field}: ") and detail in line, line


def test_generate_with_a_missing_weights_folder_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-weights"
    line = run_cli("generate", "--weights", missing, "--face", ASTRONAUT, "--prompt", "x", *SMALL,
                   "--out", tmp_path / "out").error_line()
    assert f"weights folder {missing} does not exist" in line and "instantid weights tiny" in line


def test_weights_check_names_the_missing_folder(tmp_path: Path) -> None:
    line = run_cli("weights", "check", tmp_path / "no-weights").error_line()
    assert "does not exist" in line


@pytest.mark.parametrize(("part", "relative"), [
    ("sdxl", "sdxl/unet/diffusion_pytorch_model*.safetensors"),  # the fp16 file too: either one is enough
    ("adapter", "InstantID/ip-adapter.bin"),
    ("face_pack", "antelopev2/glintr100.onnx"),
])
def test_weights_check_on_a_broken_folder_names_the_deleted_file(
        tiny_root: Path, tmp_path: Path, part: str, relative: str) -> None:
    broken = Path(shutil.copytree(tiny_root, tmp_path / "broken"))
    for path in broken.glob(relative):
        path.unlink()
    line = run_cli("weights", "check", broken).error_line()
    assert line.startswith(f"error: {part}: ") and Path(relative).name.replace("*", "") in line, line


def test_weights_tiny_into_a_file_exits_2(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("")
    line = run_cli("weights", "tiny", target).error_line()
    assert str(target) in line and "not a folder" in line


@pytest.mark.slow
def test_generate_with_an_lcm_lora_folder_runs_the_lcm_scheduler(tiny_root: Path, tmp_path: Path) -> None:
    write_tiny_lcm_lora(tiny_root, tmp_path / "lcm")
    gen = run_cli("generate", "--weights", tiny_root, "--lcm-lora", tmp_path / "lcm", "--scheduler", "lcm",
                  "--guidance", "1", "--face", ASTRONAUT, "--prompt", "x", *SMALL, "--out", tmp_path / "out")
    assert gen.returncode == 0, gen.stderr
    meta = json.loads(uri_path(gen.stdout.split()[1]).read_text())
    assert meta["params"]["scheduler"] == "lcm"
    # Without the LoRA the same request is refused up front, naming what is missing.
    assert "LCM-LoRA" in run_cli("generate", "--weights", tiny_root, "--scheduler", "lcm", "--face", ASTRONAUT,
                                 "--prompt", "x", *SMALL, "--out", tmp_path / "o2").error_line()


@pytest.mark.parametrize(("flags", "detail"), [
    (["--scheduler", "bogus"], "euler"),  # the allowed values are listed
    (["--style", "Cubism"], "Watercolor"),
    (["--steps", "ten"], "invalid int value"),
])
def test_a_malformed_flag_is_one_error_line_with_the_choices(tmp_path: Path, flags: list[str], detail: str) -> None:
    result = run_cli("generate", "--face", ASTRONAUT, "--prompt", "x", *flags, "--out", tmp_path / "o")
    line = result.error_line()
    assert detail in line, line
    assert "usage:" not in result.stderr


def test_the_console_script_ends_a_usage_mistake_with_exit_2_and_one_error_line(tmp_path: Path) -> None:
    """As a user runs it: the installed script's exit code is main()'s (here argparse's, through our parser)."""
    result = run_cli_subprocess("generate", "--face", ASTRONAUT, "--prompt", "x", "--steps", "ten", cwd=tmp_path)
    assert "invalid int value" in result.error_line() and "usage:" not in result.stderr


@pytest.mark.slow
def test_generate_with_two_identities_records_their_layout(tiny_root: Path, tmp_path: Path) -> None:
    mirrored = tmp_path / "mirrored.png"
    Image.open(ASTRONAUT).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    gen = run_cli("generate", "--weights", tiny_root, "--identity", f"{ASTRONAUT}@0,0,64,64",
                  "--identity", f"{mirrored}@64,0,128,64", "--prompt", "two people", "--steps", "2", "--width",
                  "128", "--height", "64", "--out", tmp_path / "out")
    assert gen.returncode == 0, gen.stderr
    meta = json.loads(uri_path(gen.stdout.split()[1]).read_text())
    assert [who["box"] for who in meta["identities"]] == [[0, 0, 64, 64], [64, 0, 128, 64]]
    assert all(len(who["keypoints"]) == 5 and len(who["face_image_sha256"]) == 1 for who in meta["identities"])
    assert meta["inputs"]["identities"] == [[str(ASTRONAUT)], [str(mirrored)]]


@pytest.mark.slow
def test_generate_with_overlapping_identities_exits_2_naming_the_box(tiny_root: Path, tmp_path: Path) -> None:
    result = run_cli("generate", "--weights", tiny_root, "--identity", f"{ASTRONAUT}@0,0,80,64",
                     "--identity", f"{ASTRONAUT}@64,0,128,64", "--prompt", "x", "--steps", "2", "--width", "128",
                     "--height", "64", "--out", tmp_path / "out")
    assert result.error_line().startswith("error: identities[1].box: overlaps identities[0].box")


def test_generate_best_of_records_each_images_score_and_seed_and_refuses_above_the_bound(
        tiny_root: Path, tmp_path: Path) -> None:
    gen = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--prompt", "x", *SMALL, "--seed", "9",
                  "--best-of", "2", "--out", tmp_path / "out")
    assert gen.returncode == 0, gen.stderr
    meta = json.loads(uri_path(gen.stdout.split()[1]).read_text())
    assert meta["identity"]["candidates"] == 2 and meta["identity"]["seeds"][0] in (9, 10)
    assert meta["identity"]["same_model"] is False and "identity: " in gen.stderr  # the preset's own scoring pack
    line = run_cli("generate", "--weights", tiny_root, "--face", ASTRONAUT, "--prompt", "x", *SMALL,
                   "--best-of", "3", "--max-candidates", "2", "--out", tmp_path / "o2").error_line()
    assert line.startswith("error: best_of: at most 2"), line
