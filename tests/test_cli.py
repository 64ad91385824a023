"""The `instantid` console command, run as a user runs it: a subprocess of the installed entry point.

Expected failures must end with exit code 2 and one `error:` line that names the problem, never a traceback.
Sizes and steps are the smallest the parameters allow (64x64, 2 steps), so a model-loading run takes seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from tests.fixtures_tiny import ASTRONAUT

INSTANTID = Path(sys.executable).parent / "instantid"  # the console script `pip install -e .` puts next to python
SMALL = ["--steps", "2", "--width", "64", "--height", "64"]
WARNING_LINE = re.compile(r"\b\w+Warning: ")


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert INSTANTID.exists(), f"{INSTANTID} missing: install the project (`make setup` or `pip install -e .`)"
    return subprocess.run([str(INSTANTID), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line of a failed run; asserts exit code 2 and no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file", uri
    return Path(parsed.path)


@pytest.fixture
def blank_png(tmp_path: Path) -> Path:
    path = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(path)
    return path


@pytest.mark.slow
def test_weights_tiny_check_and_generate_write_a_png_and_sidecar(tmp_path: Path) -> None:
    weights, out = tmp_path / "weights", tmp_path / "out"

    tiny = run_cli("weights", "tiny", weights, cwd=tmp_path)
    assert tiny.returncode == 0, tiny.stderr
    assert f"wrote the tiny preset to {weights}" in tiny.stdout

    check = run_cli("weights", "check", weights, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: ") and str(weights / "sdxl") in check.stdout

    gen = run_cli("generate", "--weights", weights, "--face", ASTRONAUT, "--prompt", "an astronaut, watercolor",
                  "--style", "Watercolor", "--seed", "7", *SMALL, "--out", out, cwd=tmp_path)
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

    # What a user sees on stderr: the timings line, no third-party warnings (see instantid_core/_quiet.py).
    assert "timings: face=" in gen.stderr
    assert "requires torchvision" not in gen.stderr
    assert not WARNING_LINE.search(gen.stderr), gen.stderr


@pytest.mark.slow
def test_generate_on_a_blank_image_exits_2_naming_the_file(tiny_root: Path, tmp_path: Path, blank_png: Path) -> None:
    result = run_cli("generate", "--weights", tiny_root, "--face", blank_png, "--prompt", "x", *SMALL,
                     "--out", tmp_path / "out", cwd=tmp_path)
    line = error_line(result)
    assert str(blank_png) in line and "no face found" in line
    assert not (tmp_path / "out").exists()


def test_generate_with_a_text_file_as_face_exits_2_naming_the_file(tiny_root: Path, tmp_path: Path) -> None:
    note = tmp_path / "face.txt"
    note.write_text("not a photo\n")
    line = error_line(run_cli("generate", "--weights", tiny_root, "--face", note, "--prompt", "x", *SMALL,
                              "--out", tmp_path / "out", cwd=tmp_path))
    assert str(note) in line and "is not an image" in line


def test_generate_with_a_missing_face_file_exits_2(tiny_root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jpg"
    line = error_line(run_cli("generate", "--weights", tiny_root, "--face", missing, "--prompt", "x", *SMALL,
                              "--out", tmp_path / "out", cwd=tmp_path))
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
                     "--out", tmp_path / "out", cwd=tmp_path)
    line = error_line(result)
    assert line.startswith(f"error: {field}: ") and detail in line, line


def test_generate_with_a_missing_weights_folder_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-weights"
    line = error_line(run_cli("generate", "--weights", missing, "--face", ASTRONAUT, "--prompt", "x", *SMALL,
                              "--out", tmp_path / "out", cwd=tmp_path))
    assert f"weights folder {missing} does not exist" in line and "instantid weights tiny" in line


def test_weights_check_names_the_missing_folder(tmp_path: Path) -> None:
    line = error_line(run_cli("weights", "check", tmp_path / "no-weights", cwd=tmp_path))
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
    line = error_line(run_cli("weights", "check", broken, cwd=tmp_path))
    assert line.startswith(f"error: {part}: ") and Path(relative).name.replace("*", "") in line, line


def test_weights_tiny_into_a_file_exits_2(tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("")
    line = error_line(run_cli("weights", "tiny", target, cwd=tmp_path))
    assert str(target) in line and "not a folder" in line


@pytest.mark.slow
def test_generate_with_an_lcm_lora_folder_runs_the_lcm_scheduler(tiny_root: Path, tmp_path: Path) -> None:
    from tests.test_denoise import write_tiny_lcm_lora

    write_tiny_lcm_lora(tiny_root, tmp_path / "lcm")
    gen = run_cli("generate", "--weights", tiny_root, "--lcm-lora", tmp_path / "lcm", "--scheduler", "lcm",
                  "--guidance", "1", "--face", ASTRONAUT, "--prompt", "x", *SMALL, "--out", tmp_path / "out",
                  cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    meta = json.loads(uri_path(gen.stdout.split()[1]).read_text())
    assert meta["params"]["scheduler"] == "lcm"
    # Without the LoRA the same request is refused up front, naming what is missing.
    assert "LCM-LoRA" in error_line(run_cli("generate", "--weights", tiny_root, "--scheduler", "lcm", "--face",
                                            ASTRONAUT, "--prompt", "x", *SMALL, "--out", tmp_path / "o2",
                                            cwd=tmp_path))


@pytest.mark.parametrize(("flags", "detail"), [
    (["--scheduler", "bogus"], "euler"),  # the allowed values are listed
    (["--style", "Cubism"], "Watercolor"),
    (["--steps", "ten"], "invalid int value"),
])
def test_a_malformed_flag_is_one_error_line_with_the_choices(tmp_path: Path, flags: list[str], detail: str) -> None:
    result = run_cli("generate", "--face", ASTRONAUT, "--prompt", "x", *flags, "--out", tmp_path / "o", cwd=tmp_path)
    line = error_line(result)
    assert detail in line, line
    assert "usage:" not in result.stderr
