"""The Ray Data stages of a batch run (classes: one model per actor, loaded once): face analysis, denoising with
the Denoiser's grouping (`instantid_core.batching.run_grouped`) and, with the config's `safety`, the safety checker on
the same actor, writing with the one sidecar builder and the serving app's safety modes (`apply_safety`). With the
config's `scoring`, the face actors embed the reference with the scoring recogniser and the denoise actors score
every candidate and choose as the serving app does (`run_rounds`: `best_of`, and `min_identity`'s extra rounds on the
next seeds up to `scoring.max_candidates`); the writer records what they chose."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from datetime import datetime, timezone
from typing import Any

import numpy as np

from instantid_app.cache import LRUCache
from instantid_core.config import GenerateParams, SafetyMode, Scheduler
from instantid_core.errors import ImageTooLarge, InvalidImage, NoFaceDetected, UnsafeContent
from instantid_core.images import load_image
from instantid_core.safety import NOT_CONFIGURED, SafetyReport, safety_outcome
from instantid_core.scoring import identity_record, run_rounds
from instantid_core.sidecar import identities_record
from instantid_core.storage import OutputStore

from .pairs import INPUT_PHOTO, BatchSettings, pair_id, pair_seed, resolve_models


class FaceStage:
    def __init__(self, settings: BatchSettings, params: dict[str, GenerateParams],
                 photos: dict[str, bytes] | None = None) -> None:
        from instantid_core.face import FaceAnalyzer

        self.settings = settings
        weights = resolve_models(settings)
        self.analyzer = FaceAnalyzer(weights.face_pack, settings.pipeline)
        self.scorer = _scorer(settings, weights)
        self.params = params
        self.photos = photos or {}  # --params init_image / mask_image, read once by the driver
        self.store = OutputStore("file:///")
        self.cache = LRUCache(64 * 2**20)  # pickled FaceConditions (keypoint image included), by bytes

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.conditioning import RequestPhotos, face_condition

        out: dict[str, list] = {"image": [], "prompt_id": [], "status": [], "message": [], "face": [], "layout": []}
        cache = self.cache  # one analysis per (image, output size, face index), across batches
        for image_uri, prompt_id in zip(batch["image"], batch["prompt_id"], strict=False):
            params = self.params[prompt_id]
            status, message, face, layout = "ok", "", b"", ""
            try:
                key = (image_uri, params.width, params.height, params.face_index, params.pose_face_index,
                       params.inpaint_face)
                # img2img rows and rows of several people carry photos: not cached
                face = cache.get(key) if not self.photos and not params.identities else None
                if face is None and params.identities:  # several people: the row's photo is one of them
                    data = self.store.read_bytes(image_uri)
                    people = [[self._photo(f"identities[{i}].face_image", data) or data]
                              for i in range(len(params.identities))]
                    condition = face_condition(self.analyzer, RequestPhotos([], identities=people), params,
                                               self.settings.pipeline)
                    face = pickle.dumps(condition)
                    layout = json.dumps(identities_record(
                        params, [(p.face_box, p.keypoints) for p in condition.identities],
                        [[hashlib.sha256(photo).hexdigest() for photo in photos] for photos in people]))
                elif face is None:
                    data = self.store.read_bytes(image_uri)
                    photos = RequestPhotos([data], init=self._photo("init_image", data),
                                           mask=self._photo("mask_image", data), face_names=[image_uri])
                    condition = face_condition(self.analyzer, photos, params, self.settings.pipeline)
                    if self.scorer is not None:
                        from instantid_core.scorer import reference_embedding

                        reference = reference_embedding(self.scorer, [load_image(
                            data, name=image_uri, max_pixels=self.settings.pipeline.max_image_pixels,
                            max_side=self.settings.pipeline.max_image_side)], params.face_index)
                        condition = dataclasses.replace(condition, identity_reference=reference)
                    face = pickle.dumps(condition)
                    if not self.photos:
                        cache.put(key, face)
            except NoFaceDetected as exc:
                status, message = "no_face", exc.message
            except (InvalidImage, ImageTooLarge) as exc:
                status, message = "bad_image", exc.message
            except Exception as exc:  # one bad input never stops the job: recorded, retried next run
                status, message = "error", f"{type(exc).__name__}: {exc}"
            for name, value in (("image", image_uri), ("prompt_id", prompt_id), ("status", status),
                                ("message", message), ("face", face), ("layout", layout)):
                out[name].append(value)
        return out

    def _photo(self, name: str, row_photo: bytes) -> bytes | None:
        """`init_image: "$input"` is each row's own photo (restyle it, or swap its face: inpaint_face); so is an
        identity's photo given as "$input"."""
        photo = self.photos.get(name)
        return row_photo if photo == INPUT_PHOTO else photo


class DenoiseStage:
    def __init__(self, settings: BatchSettings, params: dict[str, GenerateParams], prompts: dict[str, Any],
                 base_seed: dict[str, int | None]) -> None:
        from instantid_core.denoise import IdentityDenoiser

        weights = resolve_models(settings)
        self.denoiser = IdentityDenoiser.from_weights(weights, settings.pipeline)
        self.settings, self.params, self.prompts, self.base_seed = settings, params, prompts, base_seed
        # With `scoring`, candidates are scored here, between rounds: a min_identity round needs the denoiser, and a
        # batch actor has no per-request GPU thread to keep free (the serving app scores on the CPU FaceAnalysis).
        # The GPU waits for one recogniser pass per candidate, against a whole denoising run per candidate.
        self.scorer = _scorer(settings, weights)
        self.max_candidates = settings.app.scoring.max_candidates if self.scorer is not None else 0
        self.checker = None
        if settings.app is not None and settings.app.safety is not None:
            from instantid_core.safety import SafetyChecker

            if weights.safety_checker is None:  # AppConfig requires it of real sources; the tiny preset has one
                raise ValueError("safety: no safety_checker weights were resolved")
            # On the denoiser's device: one CLIP vision pass per image next to a whole denoising run.
            self.checker = SafetyChecker(weights.safety_checker, settings.pipeline)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.batching import run_grouped
        from instantid_core.pipeline import denoise_request

        rows = len(batch["image"])
        images: list[bytes] = [b""] * rows
        flagged: list[str] = ["null"] * rows  # JSON per row: the checker's verdict per image, null when none ran
        identity: list[str] = ["{}"] * rows  # JSON per row: the manifest's `identity` entry, {} when none was scored
        status, message = list(batch["status"]), list(batch["message"])
        work, faces, params, seeds, rows_of_work = [], [], [], [], []
        for i in range(rows):
            if status[i] != "ok":
                continue
            prompt_id, image_uri = batch["prompt_id"][i], batch["image"][i]
            seed = pair_seed(image_uri, prompt_id, self.base_seed[prompt_id])
            face, pair_params = pickle.loads(batch["face"][i]), self.params[prompt_id]
            work.append(denoise_request(face, self.prompts[prompt_id], self.denoiser.loras.with_presets(pair_params),
                                        seed, self.settings.pipeline.default_scheduler))
            faces.append(face)
            params.append(pair_params)
            seeds.append(seed)
            rows_of_work.append(i)

        def run_round(pairs: list[int], first_seeds: list[int]) -> list[np.ndarray | Exception]:
            # Pairs sharing size/steps/scheduler/LoRA set run as one GPU batch (split when out of device memory); an
            # error is recorded on its pairs (retried next run) and the job goes on.
            return run_grouped(self.denoiser, [(dataclasses.replace(work[p][0], seed=s), work[p][1])
                                               for p, s in zip(pairs, first_seeds, strict=True)], catch=(Exception,))

        def score(pair: int, candidates: np.ndarray) -> list[float | None] | None:
            if params[pair].identities:  # several people: no one reference face to score against
                return None
            return self.scorer.score(candidates, faces[pair].identity_reference, faces[pair].face_box)

        outcomes = run_rounds(run_round, seeds, params, score if self.scorer is not None else None,
                              self.max_candidates, self.scorer is not None and self.scorer.same_model)
        for i, outcome in zip(rows_of_work, outcomes, strict=True):
            if isinstance(outcome, Exception):
                status[i], message[i] = "error", f"{type(outcome).__name__}: {outcome}"
                continue
            kept, report = outcome
            images[i], identity[i] = pickle.dumps(kept), json.dumps(identity_record(report))
            if self.checker is not None:  # the returned images only, as the serving app checks them
                flagged[i] = json.dumps(self.checker.check(kept).flagged)
        return {"image": batch["image"], "prompt_id": batch["prompt_id"], "status": status, "message": message,
                "images": images, "flagged": flagged, "identity": identity, "layout": batch["layout"]}


class WriteStage:
    def __init__(self, output_uri: str, fmt: str, params: dict[str, GenerateParams], day: str,
                 base_seed: dict[str, int | None], default_scheduler: Scheduler,
                 safety_mode: SafetyMode | None = None) -> None:
        self.store = OutputStore(output_uri)
        self.fmt, self.params, self.base_seed = fmt, params, base_seed
        self.safety_mode = safety_mode  # the config's safety.mode; None: no checker ran
        self.default_scheduler = default_scheduler
        self.now = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from instantid_core.sidecar import build_sidecar
        from instantid_core.storage import encode_image

        records = []
        for i in range(len(batch["image"])):
            image_uri, prompt_id = batch["image"][i], batch["prompt_id"][i]
            record = {"image": image_uri, "prompt_id": prompt_id, "status": batch["status"][i],
                      "request_id": pair_id(image_uri, prompt_id)}
            if record["status"] == "ok":
                try:
                    arrays = pickle.loads(batch["images"][i])
                    height, width = arrays.shape[1:3]
                    seed = pair_seed(image_uri, prompt_id, self.base_seed[prompt_id])
                    flagged = json.loads(batch["flagged"][i])
                    record.update(json.loads(batch["identity"][i]))  # the denoise actor's choice, when it scored
                    kept, safety = safety_outcome(arrays, flagged, self.safety_mode, NOT_CONFIGURED)
                    record["safety"] = safety.model_dump(mode="json", exclude_none=True)
                    meta = build_sidecar(self.params[prompt_id], seed=seed, width=width, height=height,
                                         inputs={"face": [image_uri]}, default_scheduler=self.default_scheduler,
                                         prompt_id=prompt_id,
                                         safety=record["safety"], **({"identities": json.loads(batch["layout"][i])}
                                                                     if batch["layout"][i] else {}),
                                         **({"identity": record["identity"]} if "identity" in record else {}))
                    stored = self.store.write_request(record["request_id"],
                                                      [encode_image(a, self.fmt) for a in kept], self.fmt, meta,
                                                      now=self.now)
                    record.update(outputs=stored.image_uris, metadata=stored.meta_uri)
                except UnsafeContent as exc:  # block mode, every image flagged: nothing written (a rerun: the same)
                    record.update(status="unsafe_content", message=exc.message, outputs=[], safety=SafetyReport(
                        checked=True, mode=self.safety_mode, flagged=[True] * len(exc.images),
                        withheld=exc.images).model_dump(mode="json", exclude_none=True))
                except Exception as exc:
                    record.update(status="error", message=f"{type(exc).__name__}: {exc}")
            else:
                record["message"] = batch["message"][i]
            records.append(json.dumps(record))
        return {"record": records}


def _scorer(settings: BatchSettings, weights: Any) -> Any:
    """The identity scorer when the job's config has `scoring` (loaded once per actor), else None."""
    if settings.app is None or settings.app.scoring is None:
        return None
    from instantid_core.scorer import scorer_for

    return scorer_for(weights.face_pack, weights.scoring_face_pack, settings.pipeline)
