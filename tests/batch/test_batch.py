"""The batch job over an S3 image set: exact manifest counts, no-op rerun, kill and resume."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pytest
import yaml
from PIL import Image, ImageOps

from batch.job import run_batch
from batch.pairs import BatchSettings, list_inputs, load_prompts, pair_seed
from instantid_cli import main as cli_main
from instantid_core.config import GenerateParams, ModelSources, PipelineSettings
from instantid_core.errors import InvalidParameter
from instantid_core.pipeline import InstantIDPipeline
from instantid_core.storage import OutputStore
from testkit.api import png_pixels, s3_read

REPO = Path(__file__).resolve().parents[2]
PARAMS = {"steps": 2, "width": 64, "height": 64}
PROMPTS = [{"id": "oil", "prompt": "an oil painting"}, {"id": "ink", "prompt": "an ink drawing", "style": "Line art"}]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


FACES = 6  # photos with a face; with 2 blank, 2 corrupt and 1 text file: 11 inputs, 22 pairs
INPUTS = FACES + 5


def upload_image_set(bucket: str, astronaut: bytes) -> dict[str, str]:
    """INPUTS inputs: FACES photos with a face (two sizes of each pose, mirrored or not, PNG or JPEG), 2 blank, 2
    corrupt, 1 text file. Returns key -> expected status."""
    s3 = boto3.client("s3")
    portrait = Image.open(io.BytesIO(astronaut)).convert("RGB")
    expected = {}
    for i in range(FACES):
        variant = ImageOps.mirror(portrait) if i % 2 else portrait
        variant = variant.resize((512 - 16 * (i // 2), 512 - 16 * (i // 2)))
        key = f"faces/face-{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
        s3.put_object(Bucket=bucket, Key=key, Body=_encode(variant, "PNG" if i % 3 == 0 else "JPEG"))
        expected[key] = "ok"
    for i, colour in enumerate([(0, 0, 0), (210, 170, 140)]):
        key = f"faces/blank-{i}.png"
        s3.put_object(Bucket=bucket, Key=key, Body=_encode(Image.new("RGB", (256, 256), colour), "PNG"))
        expected[key] = "no_face"
    jpeg = _encode(portrait, "JPEG")
    for key, body in {"faces/truncated.jpg": jpeg[: len(jpeg) // 3], "faces/zero.jpg": b"",
                      "faces/notes.jpg": b"this is a text file, not a photo\n"}.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        expected[key] = "bad_image"
    return expected


def manifest_records(bucket: str) -> list[dict]:
    s3 = boto3.client("s3")
    records = []
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out/manifest/").get("Contents", []):
        body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
        records += [json.loads(line) for line in body.splitlines() if line.strip()]
    return records


def output_objects(bucket: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    return [k for k in keys if not k.startswith(("out/manifest/", "out/job.json", "out/summary.json"))]


@pytest.fixture
def batch_settings(tiny_root) -> BatchSettings:
    return BatchSettings(ModelSources.from_root(str(tiny_root)), None, PipelineSettings())


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS))
    return path


def expected_counts(expected: dict[str, str]) -> Counter:
    return Counter({status: n * len(PROMPTS) for status, n in Counter(expected.values()).items()})


def check_outputs_match_manifest(bucket: str, expected: dict[str, str]) -> None:
    latest = {(r["image"], r["prompt_id"]): r for r in manifest_records(bucket)}
    assert len(latest) == len(expected) * len(PROMPTS)
    ok = [r for r in latest.values() if r["status"] == "ok"]
    listed = set()
    for record in ok:
        listed.update(uri.removeprefix(f"s3://{bucket}/") for uri in record["outputs"] + [record["metadata"]])
    assert set(output_objects(bucket)) == listed  # nothing lost, nothing extra (no orphans, no duplicates)


def test_batch_job_writes_every_pair_an_exact_manifest_and_the_same_pixels_again(
        s3_bucket, astronaut_bytes, batch_settings, prompts_file, batch_ray, tiny_root):
    expected = upload_image_set(s3_bucket, astronaut_bytes)
    summary = run_batch(f"s3://{s3_bucket}/faces/", load_prompts(prompts_file), f"s3://{s3_bucket}/out/",
                        batch_settings, PARAMS, progress=False)
    assert summary["images"] == INPUTS and summary["pairs"] == INPUTS * len(PROMPTS)
    assert summary["images_per_s"] > 0 and summary["outputs"] == FACES * len(PROMPTS)
    assert Counter(summary["status"]) == expected_counts(expected)
    records = manifest_records(s3_bucket)
    assert Counter(r["status"] for r in records) == expected_counts(expected)
    by_pair = {(r["image"].removeprefix(f"s3://{s3_bucket}/"), r["prompt_id"]): r for r in records}
    for key, status in expected.items():
        for prompt in PROMPTS:
            assert by_pair[(key, prompt["id"])]["status"] == status
    check_outputs_match_manifest(s3_bucket, expected)

    # Rerunning the same command is a no-op: nothing generated, nothing written.
    before = output_objects(s3_bucket)
    again = run_batch(f"s3://{s3_bucket}/faces/", load_prompts(prompts_file), f"s3://{s3_bucket}/out/",
                      batch_settings, PARAMS, progress=False)
    assert again["this_run"] == {} and again["skipped"] == INPUTS * len(PROMPTS)
    assert output_objects(s3_bucket) == before

    # Seeds are per image and prompt, and an output's sidecar replays it in the library: the same pixels again.
    record = by_pair[("faces/face-00.png", "oil")]
    sidecar = json.loads(s3_read(record["metadata"]))
    photo = s3_read(record["image"])
    replay = InstantIDPipeline.from_root(tiny_root).generate([photo], GenerateParams.model_validate(sidecar["params"]),
                                                              seed=sidecar["seed"])
    written = png_pixels(s3_read(record["outputs"][0]))
    assert sidecar["seed"] == pair_seed(record["image"], "oil", None) and written.shape == replay.images[0].shape
    assert np.abs(written.astype(int) - replay.images[0].astype(int)).max() <= 1  # as the served app's replay


def test_killed_batch_job_resumes_without_duplicates_or_losses(s3_bucket, astronaut_bytes, batch_settings,
                                                                prompts_file, batch_ray, tmp_path):
    expected = upload_image_set(s3_bucket, astronaut_bytes)
    command = [sys.executable, "-m", "instantid_cli", "batch", "--input", f"s3://{s3_bucket}/faces/", "--prompts",
               str(prompts_file), "--output", f"s3://{s3_bucket}/out/", "--params", json.dumps(PARAMS),
               "--weights", str(batch_settings.sources.sdxl).removesuffix("/sdxl"), "--no-progress"]
    # The job's driver joins the package's Ray (as `ray job submit` would run it on a cluster), so the kill below
    # takes a driver and its actors away from a cluster that stays up.
    env = {**os.environ, "RAY_ADDRESS": batch_ray}
    job = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "job.log", "wb"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None and len(output_objects(s3_bucket)) < 6:
        time.sleep(0.2)
    assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    os.killpg(job.pid, signal.SIGKILL)  # the driver (Ray ends its actors when their owner dies)
    job.wait()
    assert 0 < len(output_objects(s3_bucket))

    summary = run_batch(f"s3://{s3_bucket}/faces/", load_prompts(prompts_file), f"s3://{s3_bucket}/out/",
                        batch_settings, PARAMS, progress=False)
    assert Counter(summary["status"]) == expected_counts(expected)
    assert summary["skipped"] > 0
    check_outputs_match_manifest(s3_bucket, expected)
    # One record per pair over both runs: what the killed run recorded (or wrote) was never generated again.
    records = manifest_records(s3_bucket)
    pairs = INPUTS * len(PROMPTS)
    assert len(records) == pairs and len({(r["image"], r["prompt_id"]) for r in records}) == pairs


def test_inputs_are_the_files_under_the_prefix_as_a_folder(tmp_path):
    for name in ("faces/a.jpg", "faces/sub/b.png", "faces/.hidden.jpg", "faces_old/c.jpg", "faces/out/0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    store = OutputStore("file:///")
    found = list_inputs(store, (tmp_path / "faces").as_uri(), None, output_uri=(tmp_path / "faces" / "out").as_uri())
    assert found == [(tmp_path / "faces/a.jpg").as_uri(), (tmp_path / "faces/sub/b.png").as_uri()]
    assert list_inputs(store, (tmp_path / "faces").as_uri() + "/", 1) == found[:1]


@pytest.mark.parametrize(("text", "message"), [
    (None, "No such file"), ("just text", "non-empty list"), ("- {id: a, prompt: x}\n- {id: a, prompt: y}\n",
                                                            "duplicate prompt ids"),
    ("- {id: a}\n", "prompt 0: prompt"),
])
def test_bad_prompt_files_are_one_line_errors_with_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "prompts.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InvalidParameter, match=message):
        load_prompts(path)
    code = cli_main(["batch", "--input", str(tmp_path), "--prompts", str(path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_an_input_prefix_without_files_is_an_error_that_writes_nothing(tmp_path, batch_settings):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidParameter, match="no files under this prefix"):
        run_batch(str(tmp_path / "empty"), [], str(tmp_path / "out"), batch_settings, PARAMS, progress=False)
    assert not (tmp_path / "out").exists()


def test_batch_best_of_and_min_identity_record_each_images_identity_in_the_manifest_and_sidecar(
        tmp_path, tiny_root, astronaut_bytes, batch_ray):
    from batch.manifest import Manifest
    from instantid_app.config import AppConfig
    from instantid_core.scoring import next_round

    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "face.jpg").write_bytes(astronaut_bytes)
    bound = 4
    app = AppConfig(weights={"preset": "tiny", "preset_dir": str(tiny_root)}, scoring={"max_candidates": bound})
    settings = BatchSettings(ModelSources.from_root(str(tiny_root)), None, PipelineSettings(), app=app)
    prompts = [load_prompts(_write_prompts(tmp_path, PROMPTS[:1]))[0]]
    with pytest.raises(InvalidParameter, match="best_of: at most 4"):
        run_batch(str(tmp_path / "faces"), prompts, str(tmp_path / "out"), settings, {**PARAMS, "best_of": 5},
                  progress=False)
    # One prompt chooses the best of 3; the other asks for a floor that no tiny output reaches (the tiny
    # recogniser's cosines are low, or it finds no face): rounds of 2 on the next seeds until the bound.
    floor = 0.99
    prompts = load_prompts(_write_prompts(tmp_path, [{**PROMPTS[0], "params": {"best_of": 3}},
                                                     {**PROMPTS[1], "params": {"best_of": 2, "min_identity": floor}}]))
    summary = run_batch(str(tmp_path / "faces"), prompts, str(tmp_path / "out"), settings, {**PARAMS, "seed": 20},
                        progress=False)
    assert summary["status"] == {"ok": 2} and summary["outputs"] == 2
    records = {r["prompt_id"]: r for r in Manifest(OutputStore(f"file://{tmp_path / 'out'}")).load().values()}
    for record in records.values():
        sidecar = json.loads(Path(record["metadata"].removeprefix("file://")).read_text())
        assert sidecar["identity"] == record["identity"]

    best = records["oil"]["identity"]
    first_seed = pair_seed(records["oil"]["image"], "oil", 20)  # image i of a pair runs on its seed + i
    assert best["candidates"] == 3 and len(best["scores"]) == 1
    assert best["seeds"][0] - first_seed in (0, 1, 2) and "below_floor" not in best

    rounds = records["ink"]["identity"]
    ran = 2  # the serving app's rule: another round of 2 while a kept image misses the floor, within the bound
    while next_round([None], floor, ran, 2, bound):
        ran += 2
    assert ran == bound and rounds["candidates"] == ran  # two rounds ran
    first_seed = pair_seed(records["ink"]["image"], "ink", 20)  # round two starts at seed + 2
    assert len(rounds["seeds"]) == 1 and rounds["seeds"][0] - first_seed in range(ran)
    assert rounds["below_floor"] == [True] and rounds["min_identity"] == floor
    assert rounds["scores"][0] is None or rounds["scores"][0] < floor


def _write_prompts(tmp_path: Path, prompts: list[dict]) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(prompts))
    return path
