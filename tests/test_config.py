"""GenerateParams limits (each out-of-range value names its field) and the core's independence from Ray/FastAPI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from instantid_core.config import GenerateParams


@pytest.mark.parametrize(("field", "bad", "good"), [
    ("steps", 0, 1), ("steps", 101, 100),
    ("guidance", -0.1, 0.0), ("guidance", 20.5, 20.0),
    ("identitynet_strength", -0.1, 0.0), ("identitynet_strength", 1.6, 1.5),
    ("adapter_strength", -0.1, 0.0), ("adapter_strength", 1.6, 1.5),
    ("num_images", 0, 1), ("num_images", 5, 4),
    ("seed", -1, 0), ("seed", 2**63, 2**63 - 1),
    ("face_index", -1, 0),
    ("guidance", float("nan"), 5.0),
    ("prompt", "", "x"), ("prompt", "x" * 2001, "x" * 2000),
])
def test_each_limit_is_a_validation_error_naming_its_field(field: str, bad, good) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateParams.model_validate({"prompt": "x", field: bad})
    assert caught.value.errors()[0]["loc"][0] == field
    assert getattr(GenerateParams.model_validate({"prompt": "x", field: good}), field) == good


@pytest.mark.parametrize(("width", "height"), [(60, 64), (64, 2056), (63, 64), (2048, 8)])
def test_sides_are_multiples_of_8_within_the_limits(width: int, height: int) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateParams(prompt="x", width=width, height=height)
    assert caught.value.errors()[0]["loc"][0] in ("width", "height")
    assert GenerateParams(prompt="x", width=64, height=2048).height == 2048


def test_instantid_core_imports_neither_ray_nor_fastapi() -> None:
    # A fresh interpreter imports every module of the core, then reports which frameworks came along.
    code = ("import importlib, json, pkgutil, sys, instantid_core\n"
            "for m in pkgutil.walk_packages(instantid_core.__path__, 'instantid_core.'):\n"
            "    importlib.import_module(m.name)\n"
            "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'fastapi', 'starlette'})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
