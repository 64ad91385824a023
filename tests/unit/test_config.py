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


# Layer by layer, each importing every module of its package into one fresh interpreter, and which of the names it
# must never import (top-level) are loaded after it. A name one layer must not import was absent after every layer
# before it (each set below is within the earlier ones), so what appears after a layer came from that layer.
LAYERS = {
    "instantid_core": {"ray", "fastapi", "starlette", "instantid_app", "instantid_cli", "deployments", "batch", "bench",
                       "cluster", "testkit"},
    "instantid_app": {"deployments", "batch", "instantid_cli", "bench", "testkit", "ray", "fastapi"},
    "batch": {"deployments", "instantid_cli", "bench", "testkit"},
}


@pytest.fixture(scope="module")
def imported_by_layer() -> dict[str, list[str]]:
    """package -> the names of its LAYERS entry that a fresh interpreter holds after importing it (and the layers
    before it)."""
    code = ("import importlib, json, pkgutil, sys\n"
            f"layers, found = {LAYERS!r}, {{}}\n"
            "for package, watched in layers.items():\n"
            "    root = importlib.import_module(package)\n"
            "    for m in pkgutil.walk_packages(root.__path__, package + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "    found[package] = sorted({n.split('.')[0] for n in sys.modules} & watched)\n"
            "print(json.dumps(found))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_instantid_core_imports_no_framework_and_no_layer_above_it(imported_by_layer) -> None:
    assert imported_by_layer["instantid_core"] == []


def test_the_batch_job_and_the_shared_app_layer_import_nothing_of_the_serving_app(imported_by_layer) -> None:
    assert imported_by_layer["instantid_app"] == []
    assert imported_by_layer["batch"] == []


def test_core_errors_carry_no_http_status_and_the_serving_table_maps_each_one() -> None:
    import inspect

    from deployments.errors import HTTP_STATUS, http_status
    from instantid_core import errors

    core = [cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.InstantIDError)]
    assert all(not hasattr(cls, "http_status") and not hasattr(cls, "status_code") for cls in core)
    assert set(core) <= set(HTTP_STATUS), set(core) - set(HTTP_STATUS)
    assert http_status(errors.NoFaceDetected("x")) == 422 and http_status(errors.ImageTooLarge("x")) == 413
