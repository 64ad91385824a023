"""Several identities in one image (issue 23) from the batch job: its --params place each row's photo beside a fixed
second person, and the sidecar records both."""

from __future__ import annotations

import hashlib
import json

import yaml
from PIL import Image, ImageOps

from batch.job import run_batch
from batch.pairs import BatchSettings, load_prompts
from instantid_core.config import ModelSources, PipelineSettings
from testkit.api import FACE

FAST = {"steps": 2, "width": 128, "height": 128, "seed": 77}
LEFT, RIGHT = [0, 32, 64, 96], [64, 32, 128, 96]


def test_batch_params_place_each_row_beside_a_fixed_second_person(tmp_path, astronaut_bytes, tiny_root,
                                                                  batch_ray):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "a.jpg").write_bytes(astronaut_bytes)
    ImageOps.mirror(Image.open(FACE)).save(tmp_path / "friend.png")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump([{"id": "p", "prompt": "two people"}]))
    settings = BatchSettings(ModelSources.from_root(str(tiny_root)), None, PipelineSettings())
    params = {**FAST, "identities": [{"box": LEFT}, {"face_image": str(tmp_path / "friend.png"), "box": RIGHT}]}
    summary = run_batch(str(inputs), load_prompts(prompts), str(out), settings, params, progress=False)
    assert summary["status"] == {"ok": 1}, summary
    (meta_path,) = out.rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    assert [who["box"] for who in meta["identities"]] == [LEFT, RIGHT]
    assert meta["identities"][0]["face_image_sha256"] == [hashlib.sha256(astronaut_bytes).hexdigest()]
