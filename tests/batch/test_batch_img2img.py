"""The batch job's --params carry img2img: `"init_image": "$input"` regenerates each input photo's face in place."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from batch.job import run_batch
from batch.pairs import BatchSettings, load_prompts
from instantid_core.config import ModelSources, PipelineSettings
from instantid_core.errors import InvalidParameter


def test_batch_inpaint_face_keeps_each_photo_outside_its_face(tmp_path, astronaut_bytes, tiny_root,
                                                              batch_ray):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    photo = Image.open(io.BytesIO(astronaut_bytes)).convert("RGB").resize((128, 128))
    photo.save(inputs / "a.png")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump([{"id": "p", "prompt": "a portrait", "style": "(No style)"}]))
    settings = BatchSettings(ModelSources.from_root(str(tiny_root)), None, PipelineSettings())
    summary = run_batch(str(inputs), load_prompts(prompts), str(out), settings,
                        {"init_image": "$input", "inpaint_face": True, "steps": 2}, progress=False)
    assert summary["status"] == {"ok": 1}, summary
    (meta_path,) = out.rglob("meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["params"]["inpaint_face"]
    image = np.asarray(Image.open(meta_path.parent / "0.png").convert("RGB"))
    before = np.asarray(photo)
    assert image.shape == before.shape
    same = (image == before).all(-1)
    assert 0.3 < same.mean() < 0.98 and same[-8:].all()  # the face changed; the suit at the bottom did not


def test_batch_init_image_that_cannot_be_read_is_one_error_that_writes_nothing(tmp_path, tiny_root):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    settings = BatchSettings(ModelSources.from_root(str(tiny_root)), None, PipelineSettings())
    with pytest.raises(InvalidParameter, match="init_image") as err:
        run_batch(str(tmp_path / "in"), load_prompts_inline(tmp_path), str(tmp_path / "out"), settings,
                  {"init_image": str(tmp_path / "missing.png")}, progress=False)
    assert err.value.field == "init_image" and not (tmp_path / "out").exists()


def load_prompts_inline(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump([{"id": "p", "prompt": "x"}]))
    return load_prompts(path)
