"""The safety stage at library level: the tiny preset's CompVis-layout checker (diffusers' StableDiffusionSafetyChecker
loaded with from_pretrained) flags its known pattern and not the tiny pipeline's ordinary outputs, an inpainted
pattern is flagged (the recipe the serve tests use), the modes act as documented, the weights are resolved and
checked like every part, and the app config holds the stage to its weights and its deployment entry."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantid_app.config import AppConfig, AppSpec
from instantid_core.config import GenerateParams, ModelSources, SafetyMode
from instantid_core.errors import UnsafeContent, WeightsError
from instantid_core.safety import NOT_CONFIGURED, SafetyChecker, apply_safety, blur
from instantid_core.tiny.safety import CONCEPT_THRESHOLD, FLAGGED_IMAGE, flagged_pattern
from instantid_core.weights import resolve_weights

# Ordinary outputs must stay this far below the tiny checker's threshold (measured: -0.15 at most over 48 outputs of
# 4 sizes and 6 seeds, 2 steps), so no test that does not aim at the pattern is ever flagged.
ORDINARY_MARGIN = 0.1


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checker(tiny_root: Path) -> SafetyChecker:
    return SafetyChecker(resolve_weights(ModelSources.from_root(str(tiny_root)), parts=["safety_checker"])
                         .safety_checker)


@pytest.fixture(scope="module")
def pipeline(tiny_root: Path):
    from instantid_core.pipeline import InstantIDPipeline

    return InstantIDPipeline.from_root(tiny_root)


def test_the_tiny_checker_flags_its_pattern_file_and_diffusers_decides(checker: SafetyChecker,
                                                                       tiny_root: Path) -> None:
    written = np.asarray(Image.open(tiny_root / "safety-checker" / FLAGGED_IMAGE).convert("RGB"))
    assert np.array_equal(written, flagged_pattern())  # the fixture beside the weights is the pattern itself
    verdict = checker.check(np.stack([written, np.full_like(written, 128)]))
    assert verdict.flagged == [True, False]
    assert verdict.scores[0] > 0 > verdict.scores[1]  # the score is diffusers' (cosine - threshold): > 0 flags


def test_ordinary_tiny_outputs_stay_far_below_the_threshold(checker: SafetyChecker, pipeline,
                                                            astronaut_bytes: bytes) -> None:
    images = [pipeline.generate([astronaut_bytes], GenerateParams(prompt=f"a portrait {seed}", steps=2, width=w,
                                                                  height=h, num_images=n, seed=seed)).images
              for seed, (w, h, n) in enumerate([(64, 64, 3), (128, 64, 1)])]
    verdicts = [checker.check(batch) for batch in images]
    scores = [score for verdict in verdicts for score in verdict.scores]
    assert len(scores) == 4 and not any(flag for verdict in verdicts for flag in verdict.flagged)
    assert max(scores) < -ORDINARY_MARGIN, scores


def test_an_inpainted_pattern_is_flagged_when_the_mask_is_small(checker: SafetyChecker, pipeline,
                                                                astronaut_bytes: bytes) -> None:
    """The serve tests' recipe: the pattern as init photo, a mask over its middle 16 x 16 of 64 x 64 (inpainting
    keeps the rest); a mask over its middle half leaves an image the checker passes."""
    side = 64

    def inpainted(margin: int) -> np.ndarray:
        mask = np.zeros((side, side, 3), np.uint8)
        mask[margin:side - margin, margin:side - margin] = 255
        return pipeline.generate([astronaut_bytes], GenerateParams(prompt="x", steps=1, seed=5),
                                 init_image=_png(flagged_pattern(side)), mask_image=_png(mask)).images

    small, large = inpainted(24), inpainted(16)
    assert small.shape == (1, side, side, 3)
    assert checker.check(small).flagged == [True]
    assert checker.check(large).flagged == [False]


def test_block_withholds_flagged_images_and_refuses_a_request_with_none_left() -> None:
    images = np.stack([flagged_pattern(), np.zeros_like(flagged_pattern())])
    kept, report = apply_safety(images, [True, False], SafetyMode.block)
    assert len(kept) == 1 and np.array_equal(kept[0], images[1])
    assert report.checked and report.flagged == [True, False] and report.withheld == [0]
    with pytest.raises(UnsafeContent) as raised:
        apply_safety(images, [True, True], SafetyMode.block)
    assert raised.value.images == [0, 1] and raised.value.code == "unsafe_content"


def test_blur_blurs_only_flagged_images_past_the_checker_and_flag_writes_them_as_they_are(
        checker: SafetyChecker) -> None:
    images = np.stack([flagged_pattern(), flagged_pattern()])
    kept, report = apply_safety(images, [True, False], SafetyMode.blur)
    assert report.withheld == [] and report.mode == SafetyMode.blur
    assert np.array_equal(kept[1], images[1]) and kept[0].shape == images[0].shape
    assert np.abs(kept[0].astype(int) - images[0]).mean() > 50  # the checkerboard is gone ...
    assert checker.check(kept[0][None]).flagged == [False]  # ... so far that the checker no longer sees it
    flagged, report = apply_safety(images, [True, True], SafetyMode.flag)
    assert all(np.array_equal(a, b) for a, b in zip(flagged, images, strict=True)) and report.flagged == [True, True]
    assert blur(images[0]).dtype == np.uint8


def test_the_checker_is_resolved_and_checked_like_every_weight(tiny_root: Path, tmp_path: Path) -> None:
    assert resolve_weights(ModelSources.from_root(str(tiny_root)), parts=["face_pack"]).safety_checker is None
    broken = tmp_path / "checker"
    shutil.copytree(tiny_root / "safety-checker", broken)
    (broken / "preprocessor_config.json").unlink()
    sources = ModelSources.from_root(str(tiny_root), safety_checker=str(broken))
    with pytest.raises(WeightsError, match="safety_checker: missing preprocessor_config.json") as raised:
        resolve_weights(sources, parts=["safety_checker"])
    assert raised.value.field == "safety_checker"
    shutil.copy(tiny_root / "safety-checker" / "preprocessor_config.json", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        resolve_weights(sources, parts=["safety_checker"])


def test_the_tiny_threshold_is_what_the_concepts_carry(checker: SafetyChecker) -> None:
    assert float(checker.model.concept_embeds_weights.detach().max()) == pytest.approx(CONCEPT_THRESHOLD)


def test_safety_with_real_sources_names_its_weights_and_adds_the_safety_checker_stage() -> None:
    with pytest.raises(ValueError, match="safety needs weights.sources.safety_checker"):
        AppConfig.model_validate({"weights": {"sources": {}}, "safety": {"mode": "blur"}})
    config = AppConfig.model_validate({"weights": {"sources": {"safety_checker": "CompVis/stable-diffusion-safety-"
                                                               "checker"}}, "safety": {}})
    assert config.safety.mode == SafetyMode.block and not config.safety.allow_request_disable
    spec = AppSpec(args=config, deployments=[{"name": "SafetyChecker", "ray_actor_options": {"num_cpus": 1}}])
    assert dict(spec.stages())["SafetyChecker"]["ray_actor_options"] == {"num_cpus": 1}
    on_cpu = config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"device": "cuda",
                                                                                       "dtype": "bfloat16"}),
                                       "safety": config.safety.model_copy(update={"device": "cpu"})})
    assert (on_cpu.safety_pipeline().device, on_cpu.safety_pipeline().dtype) == ("cpu", "float32")
    assert config.safety_pipeline() == config.pipeline  # by default where the pipeline runs
    plain = AppSpec(args=AppConfig.model_validate({"weights": {"preset": "tiny"}}))
    assert "SafetyChecker" not in dict(plain.stages())
    with pytest.raises(ValueError, match="SafetyChecker runs the safety stage"):
        AppSpec.model_validate({"args": {"weights": {"preset": "tiny"}}, "deployments": [{"name": "SafetyChecker"}]})


@pytest.mark.parametrize("mode", [None, SafetyMode.blur])
def test_the_batch_jobs_writer_records_the_verdict_and_applies_the_mode(tmp_path: Path, mode: SafetyMode | None
                                                                        ) -> None:
    import json
    import pickle

    from batch.stages import WriteStage
    from instantid_core.config import Scheduler

    params = {"p": GenerateParams(prompt="x")}
    stage = WriteStage(tmp_path.as_uri(), "png", params, "2026-12-06", {"p": None}, Scheduler.euler,
                       safety_mode=mode)
    images = np.stack([flagged_pattern(64), np.zeros((64, 64, 3), np.uint8)])
    (line,) = stage({"image": ["file:///a.png"], "prompt_id": ["p"], "status": ["ok"], "message": [""],
                     "images": [pickle.dumps(images)],
                     "flagged": [json.dumps([True, False] if mode else None)], "identity": ["{}"],
                     "layout": [""]})["record"]
    record = json.loads(line)
    meta = json.loads(Path(record["metadata"].removeprefix("file://")).read_text())
    assert record["status"] == "ok" and meta["safety"] == record["safety"]
    written = [np.asarray(Image.open(uri.removeprefix("file://"))) for uri in record["outputs"]]
    if mode is None:
        assert record["safety"] == {"checked": False, "withheld": [], "reason": NOT_CONFIGURED}
        assert np.array_equal(written[0], images[0])
    else:
        assert record["safety"] == {"checked": True, "mode": "blur", "flagged": [True, False], "withheld": []}
        assert np.array_equal(written[0], blur(images[0])) and np.array_equal(written[1], images[1])


def test_the_batch_jobs_denoise_actor_checks_and_block_mode_writes_nothing_of_a_flagged_pair(
        tmp_path: Path, tiny_root: Path, astronaut_bytes: bytes) -> None:
    """The batch job's stages as its actors run them (plain classes, no Ray Data): with the config's `safety` the
    denoise actor runs the checker, and block mode records the pair `unsafe_content` and writes nothing."""
    import json

    from batch.job import _encode_prompts
    from batch.pairs import TERMINAL, BatchSettings
    from batch.stages import DenoiseStage, FaceStage, WriteStage

    mask = np.zeros((64, 64, 3), np.uint8)
    mask[24:40, 24:40] = 255
    app = AppConfig.model_validate({"weights": {"preset": "tiny", "preset_dir": str(tiny_root)},
                                    "safety": {"mode": "block"}})
    settings = BatchSettings(ModelSources.from_root(str(tiny_root)), None, app.pipeline, app=app)
    params = {"p": GenerateParams(prompt="x", steps=1)}
    (tmp_path / "a.jpg").write_bytes(astronaut_bytes)
    rows = {"image": [(tmp_path / "a.jpg").as_uri()], "prompt_id": ["p"]}
    faces = FaceStage(settings, params, {"init_image": _png(flagged_pattern(64)), "mask_image": _png(mask)})(rows)
    denoised = DenoiseStage(settings, params, _encode_prompts(settings, params), {"p": 5})(faces)
    assert json.loads(denoised["flagged"][0]) == [True]
    out = tmp_path / "out"
    (line,) = WriteStage(out.as_uri(), "png", params, "2026-12-06", {"p": 5}, app.pipeline.default_scheduler,
                         safety_mode=app.safety.mode)(denoised)["record"]
    record = json.loads(line)
    assert record["status"] == "unsafe_content" and record["status"] in TERMINAL and record["outputs"] == []
    assert record["safety"] == {"checked": True, "mode": "block", "flagged": [True], "withheld": [0]}
    assert not out.exists() or not list(out.rglob("*.*"))


def test_weights_download_puts_a_named_checker_where_the_root_layout_finds_it(tiny_root: Path,
                                                                              tmp_path: Path) -> None:
    from instantid_cli.main import main

    parts = ModelSources.from_root(str(tiny_root))
    flags = [arg for part in ("sdxl", "identitynet", "adapter", "face_pack")
             for arg in (f"--{part.replace('_', '-')}", getattr(parts, part))]
    dest = tmp_path / "weights"
    assert main(["weights", "download", str(dest), *flags, "--safety-checker", str(tiny_root / "safety-checker")]) == 0
    assert ModelSources.from_root(str(dest)).safety_checker == str(dest / "safety-checker")
    assert SafetyChecker(dest / "safety-checker").check(flagged_pattern()[None]).flagged == [True]
