"""The face side of a request: photo bytes -> `FaceCondition` (embedding, keypoint image, face box, output size),
for one face, several photos of it, a pose photo, a pose preset or keypoints, the identities form, and img2img /
inpainting. The one path from uploaded photos to the denoiser's face input (the pipeline, the FaceAnalysis
deployment, the batch job's face actors).

Kept apart from `pipeline` so that the CPU face stage imports no diffusion code (diffusers, compel) at start.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from PIL import Image

from . import img2img
from .config import MAX_SIDE, GenerateParams, IdentityParams, PipelineSettings
from .errors import InvalidParameter, NoFaceDetected
from .face import FaceAnalyzer, FaceInfo, draw_kps, map_kps_to_output
from .handoff import FaceCondition, IdentityFace
from .images import bucket_size, load_image, resize_like_reference
from .poses import PosePreset, place_face
from .request_rules import check_init_inputs


class FaceCache(Protocol):
    """Where `face_condition` keeps analyses: (sha256 of the photo's bytes, face index) -> FaceInfo."""

    def get(self, key: tuple[str, int | None]) -> FaceInfo | None: ...

    def __setitem__(self, key: tuple[str, int | None], value: FaceInfo) -> None: ...


def output_size(params: GenerateParams, photo_size: tuple[int, int], buckets: bool = True) -> tuple[int, int]:
    """The requested size (validated by GenerateParams); else, from the pose/face photo, the SDXL bucket of the
    nearest aspect ratio (`buckets`, so that requests without a size can share a batch) or the reference's exact
    rule."""
    if params.width is not None and params.height is not None:
        return params.width, params.height
    return bucket_size(*photo_size) if buckets else resize_like_reference(*photo_size)


def condition_from_faces(faces: list[FaceInfo], params: GenerateParams, pose: FaceInfo | None = None, *,
                         buckets: bool = True, size: tuple[int, int] | None = None,
                         place=map_kps_to_output) -> FaceCondition:
    """The denoiser's face input from face analyses alone: the mean embedding of `faces`, the keypoint image and
    face box of `pose` (or the first face) mapped to the output size (each FaceInfo knows its photo's size).

    `size` fixes the output size (img2img: the init photo's), `place` maps the pose photo's points onto it."""
    embedding = np.mean(np.stack([face.embedding for face in faces]), axis=0).astype(np.float32)
    layout = pose if pose is not None else faces[0]
    width, height = size if size is not None else output_size(params, layout.image_size, buckets)
    placed = place_face(params.pose.preset if params.pose else None, params.pose.box if params.pose else None,
                        params.keypoints, (width, height))
    if placed is not None:  # a pose preset or explicit points: no photo decides where the face goes
        kps, box = placed
    else:
        kps = place(layout.kps, layout.image_size, (width, height))
        box = _box(layout, (width, height), place)
    kps_image = np.asarray(draw_kps((width, height), kps), dtype=np.uint8)
    return FaceCondition(embedding, kps_image, box, width, height, float(layout.det_score))


def _box(face: FaceInfo, size: tuple[int, int], place=map_kps_to_output) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = face.bbox
    corners = place(np.array([[x1, y1], [x2, y2]], np.float32), face.image_size, size)
    return float(corners[0, 0]), float(corners[0, 1]), float(corners[1, 0]), float(corners[1, 1])


@dataclass(frozen=True)
class RequestPhotos:
    """One request's photos as bytes, and the names its error messages give them (the API's field names by
    default; the CLI passes file paths)."""

    faces: list[bytes]
    pose: bytes | None = None
    init: bytes | None = None  # img2img / inpainting
    mask: bytes | None = None
    face_names: list[str] | None = None  # default face_image[i]
    pose_name: str = "pose_image"
    init_name: str = "init_image"
    mask_name: str = "mask_image"
    identities: list[list[bytes]] | None = None  # issue 23: each identity's photos (then `faces` is empty)


def face_condition(analyzer: FaceAnalyzer, photos: RequestPhotos, params: GenerateParams, settings: PipelineSettings,
                   cache: FaceCache | None = None) -> FaceCondition:
    """Photo bytes -> FaceCondition: each photo decoded within the settings' limits and analysed (or its analysis
    taken from `cache`, keyed by the bytes' sha256 and the face index), then `condition_from_faces`. The one path
    from uploaded photos to the denoiser's face input (pipeline, FaceAnalysis deployment, batch job).

    The cache holds analyses (a few KB each), not keypoint images: one photo serves every output size.

    With `init_image` (img2img / inpainting, see `with_init_photo`) the keypoints come from the pose photo, else
    from the init photo's face when it has one, else from the first face photo; `params.pose_face_index` picks
    the pose (or init) photo's face."""
    if params.identities is not None:
        return identities_condition(analyzer, photos, params, settings, cache)
    if not photos.faces:
        raise InvalidParameter("at least one face image is required", field="face_image")
    names = photos.face_names or [f"face_image[{i}]" for i in range(len(photos.faces))]
    init_image, mask_image, init_name, mask_name = photos.init, photos.mask, photos.init_name, photos.mask_name
    check_init_inputs(params, init_image is not None, mask_image is not None, init_name, mask_name)

    placing = params.pose is not None or params.keypoints is not None
    placed_by = "pose" if params.pose is not None else "keypoints"
    if placing and photos.pose is not None:
        raise InvalidParameter("pose: a pose preset or keypoints replace the pose photo; give one of them",
                               field=placed_by)
    if placing and init_image is not None:
        raise InvalidParameter("pose: img2img and inpainting take the face's place from the init photo (or a pose "
                               "photo), not from a preset or keypoints", field=placed_by)
    wanted = [(data, name, params.face_index if i == 0 else None)
              for i, (data, name) in enumerate(zip(photos.faces, names, strict=True))]
    if photos.pose is not None:
        wanted.append((photos.pose, photos.pose_name, params.pose_face_index))
    analyses = _analyze_photos(analyzer, wanted, settings, cache)
    faces, pose = (analyses[:-1], analyses[-1]) if photos.pose is not None else (analyses, None)
    if init_image is None:
        return condition_from_faces(faces, params, pose, buckets=settings.size_buckets)

    def load(data: bytes, name: str) -> Image.Image:
        return load_image(data, name=name, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)

    init = load(init_image, init_name)
    mask = load(mask_image, mask_name) if mask_image is not None else None
    init_face = None
    if pose is None or params.inpaint_face:
        try:
            init_face = analyzer.analyze(init, face_index=params.pose_face_index, name=init_name)
        except NoFaceDetected:
            if params.inpaint_face or params.pose_face_index is not None:
                raise  # the init photo's face is what was asked for
    return with_init_photo(faces, params, pose, init, init_face, mask, mask_name, max_side=MAX_SIDE)


def _analyze_photos(analyzer: FaceAnalyzer, wanted: list[tuple[bytes, str, int | None]], settings: PipelineSettings,
                    cache: FaceCache | None) -> list[FaceInfo]:
    """(bytes, name, face index) -> FaceInfo each, from `cache` (sha256 of the bytes, face index) or analysed."""
    keys = [(hashlib.sha256(data).hexdigest(), face_index) for data, _, face_index in wanted]
    known = {key: cache.get(key) for key in keys} if cache is not None else {}
    # Every photo not analysed before is decoded first: a broken file is reported before any analysis runs.
    decoded = {key: load_image(data, name=name, max_pixels=settings.max_image_pixels, max_side=settings.max_image_side)
               for key, (data, name, _) in zip(keys, wanted, strict=True) if known.get(key) is None}
    analyses = []
    for key, (_, name, face_index) in zip(keys, wanted, strict=True):
        face = known.get(key)
        if face is None:
            face = known[key] = analyzer.analyze(decoded[key], face_index=face_index, name=name)
            if cache is not None:
                cache[key] = face
        analyses.append(face)
    return analyses


def identities_condition(analyzer: FaceAnalyzer, photos: RequestPhotos, params: GenerateParams,
                         settings: PipelineSettings, cache: FaceCache | None = None) -> FaceCondition:
    """The `identities` form (issue 23): each identity's photos analysed and averaged, placed by its box, pose or
    keypoints, or else on the next face, left to right, of the pose photo (one identity: its largest face, as the
    single-face form); regions must not overlap. One identity gives the single-face form's FaceCondition.

    Raises:
        InvalidParameter: the field named `identities[i].<field>` (a box outside the output or overlapping
            another, keypoints outside the output, an identity with no place), or `identities` with an init image.
        NoFaceDetected: a photo without a face, or a pose photo with fewer faces than identities to place on it.
    """
    identities = params.identities or []
    groups = photos.identities or []
    if len(groups) != len(identities):
        raise InvalidParameter(f"identities: {len(identities)} given, photos for {len(groups)}", field="identities")
    if photos.init is not None or photos.mask is not None or params.inpaint_face:
        raise InvalidParameter("identities: img2img and inpainting take one face; not with identities",
                               field="identities")
    for i, group in enumerate(groups):
        if not group:
            raise InvalidParameter(f"identities[{i}].face_image: give at least one photo",
                                   field=f"identities[{i}].face_image")
    wanted = [(data, f"identities[{i}].face_image[{j}]", None) for i, group in enumerate(groups)
              for j, data in enumerate(group)]
    analyses = iter(_analyze_photos(analyzer, wanted, settings, cache))
    faces = [[next(analyses) for _ in group] for group in groups]
    unplaced = [i for i, who in enumerate(identities) if who.box is None and who.pose is None and who.keypoints is None]
    pose_faces: list[FaceInfo] = []
    if photos.pose is not None:
        if len(identities) == 1:  # the single-face form's rule: the largest face
            pose_faces = _analyze_photos(analyzer, [(photos.pose, photos.pose_name, None)], settings, cache)
        else:
            image = load_image(photos.pose, name=photos.pose_name, max_pixels=settings.max_image_pixels,
                               max_side=settings.max_image_side)
            pose_faces = analyzer.analyze_all(image, name=photos.pose_name)
        if len(pose_faces) < len(unplaced):
            raise NoFaceDetected(f"{photos.pose_name}: {len(pose_faces)} face(s) found for {len(unplaced)} "
                                 "identities without a box", field=photos.pose_name)
    elif len(identities) > 1 and unplaced:
        field = f"identities[{unplaced[0]}].box"
        raise InvalidParameter(f"{field}: with several identities each needs a box, pose or keypoints, or a pose "
                               "photo to take its face from", field=field)
    first = pose_faces[0] if pose_faces else faces[0][0]
    width, height = output_size(params, first.image_size, settings.size_buckets)
    next_pose_face = iter(pose_faces)
    placed: list[IdentityFace] = []
    for i, (who, own) in enumerate(zip(identities, faces, strict=True)):
        kps, box = _place_identity(i, who, (width, height))
        if kps is None:
            layout = next(next_pose_face) if pose_faces else own[0]
            kps = map_kps_to_output(layout.kps, layout.image_size, (width, height))
            box = who.box or _box(layout, (width, height))
        embedding = np.mean(np.stack([face.embedding for face in own]), axis=0).astype(np.float32)
        kps_image = np.asarray(draw_kps((width, height), kps), dtype=np.uint8)
        placed.append(IdentityFace(embedding, kps_image, np.asarray(kps, np.float32), tuple(float(v) for v in box)))
    _check_no_overlap([p.face_box for p in placed])
    return FaceCondition(placed[0].embedding, placed[0].kps_image, placed[0].face_box, width, height,
                         float(first.det_score), identities=tuple(placed))


def _place_identity(index: int, who: IdentityParams, size: tuple[int, int]
                    ) -> tuple[np.ndarray | None, tuple[float, float, float, float] | None]:
    """An identity's keypoints and region from its box, pose or keypoints (place_face's rules); (None, None) when
    it gives none. Errors name `identities[index].<field>`."""
    def placing(preset, box, keypoints, what: str | None = None):
        try:
            return place_face(preset, box, keypoints, size)
        except InvalidParameter as exc:
            field = what or exc.field
            message = f"{field}:{exc.message.split(':', 1)[1]}" if what else exc.message
            raise InvalidParameter(f"identities[{index}].{message}", field=f"identities[{index}].{field}") from None

    if who.box is not None:
        placing(PosePreset.frontal, who.box, None, "box")  # the region lies inside the output
    if who.pose is not None:
        kps, box = placing(who.pose.preset, who.pose.box, who.keypoints)
    elif who.keypoints is not None:
        kps, box = placing(None, None, who.keypoints)
    elif who.box is not None:  # a box alone: a frontal face fills it
        kps, box = placing(PosePreset.frontal, who.box, None, "box")
    else:
        return None, None
    return kps, who.box or box


def _check_no_overlap(boxes: list[tuple[float, float, float, float]]) -> None:
    """Regions must not overlap: where two did, one pixel would get two identities."""
    for j, (x1, y1, x2, y2) in enumerate(boxes):
        for i, (a1, b1, a2, b2) in enumerate(boxes[:j]):
            if min(x2, a2) > max(x1, a1) and min(y2, b2) > max(y1, b1):
                raise InvalidParameter(f"identities[{j}].box: overlaps identities[{i}].box ({list(boxes[j])} and "
                                       f"{list(boxes[i])}); regions must be apart", field=f"identities[{j}].box")


def with_init_photo(faces: list[FaceInfo], params: GenerateParams, pose: FaceInfo | None, init: Image.Image,
                    init_face: FaceInfo | None, mask_photo: Image.Image | None, mask_name: str = "mask_image", *,
                    max_side: int = MAX_SIDE) -> FaceCondition:
    """img2img / inpainting: the output size follows the init photo unless width/height are given
    (`img2img.init_size`); the keypoints come from `pose`, else the init photo's face, else the first face photo;
    the mask from `mask_photo` (resized to the init photo when its size differs) and/or the init photo's face box,
    dilated (`params.inpaint_face`)."""
    size = ((params.width, params.height) if params.width is not None and params.height is not None
            else img2img.init_size(init.size, max_side))
    if pose is None and init_face is not None:  # the init photo's points follow its own framing
        condition = condition_from_faces(faces, params, init_face, size=size, place=img2img.map_points)
    else:
        condition = condition_from_faces(faces, params, pose, size=size)
    mask = None
    if mask_photo is not None:
        mask = img2img.prepare_mask(mask_photo, size, init.size)
        img2img.check_mask(mask, mask_name)
    if params.inpaint_face and init_face is not None:
        face_mask = img2img.face_box_mask_image(_box(init_face, size, img2img.map_points), size)
        mask = face_mask if mask is None else np.maximum(mask, face_mask)
    return replace(condition, init_image=img2img.prepare_init(init, size), mask=mask)
