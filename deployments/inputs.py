"""Input reading of the HTTP API: the request body (JSON or multipart, counted while it streams in) and each
image source (base64, `s3://` in an allowed bucket, or an allowed http(s) URL), all within the configured limits."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import FormData

from instantid_app.config import AppConfig
from instantid_app.settings import IngressSettings
from instantid_core.config import MAX_IDENTITIES, GenerateParams
from instantid_core.errors import ImageTooLarge, InputNotAllowed, InstantIDError, InvalidParameter
from instantid_core.fetch import fetch_url, read_uri
from instantid_core.storage import make_s3_client

from .errors import validation_error
from .schemas import GenerateRequest

MAX_FACE_IMAGES = 8  # photos per person (face_image, or each identity's)
IDENTITY_PART = re.compile(r"identities\[(\d)\]\.face_image")  # a multipart part holding an identity's photo


class InputReader:
    def __init__(self, config: AppConfig, settings: IngressSettings) -> None:
        self.config, self.settings = config, settings  # where inputs may come from; the live size limits
        self._s3_client: Any = None
        self._s3_lock = threading.Lock()

    async def read_image(self, source: str, field: str) -> bytes:
        """The bytes an image field names; errors name the field."""
        limit = self.settings.max_image_bytes
        try:
            if source.startswith("s3://"):
                data = await asyncio.to_thread(read_uri, source, allowed_buckets=self.config.allowed_input_buckets,
                                               s3_client=self._s3(), max_bytes=limit)
            elif source.startswith(("http://", "https://")):
                if not self.config.allow_url_inputs:
                    raise InputNotAllowed(f"{field}: fetching URLs is disabled on this server; send base64 or s3://")
                data = await asyncio.to_thread(fetch_url, source, allowed_hosts=self.config.allowed_url_hosts,
                                               max_bytes=limit)
            else:
                if len(source) > limit * 4 // 3 + 4:
                    raise ImageTooLarge(f"{field}: larger than {limit} bytes")
                try:
                    data = base64.b64decode(source, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise InvalidParameter(f"{field}: not valid base64 (or an s3:// URI)") from exc
        except InstantIDError as exc:
            exc.field = field  # the request's field, whatever the reader called it
            raise
        if len(data) > limit:
            raise ImageTooLarge(f"{field}: {len(data)} bytes, the limit is {limit}", field=field)
        return data

    def _s3(self) -> Any:
        """One S3 client for input reads, made on first use (boto3 clients are thread-safe once made)."""
        with self._s3_lock:
            if self._s3_client is None:
                self._s3_client = make_s3_client()
            return self._s3_client

    async def parse_request(self, request: Request, model: type[GenerateRequest] = GenerateRequest) -> Any:
        """The body as `model` (GenerateRequest, or a subclass such as JobRequest)."""
        body = await self.read_body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            return await self._parse_multipart(request, body, model)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise validation_error(exc) from exc

    async def read_body(self, request: Request) -> bytes:
        """The raw body within max_body_bytes. Every body, JSON or multipart, chunked or not, is counted while it
        streams in: nothing larger is ever held in memory or spooled to disk."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise ImageTooLarge(f"request body over {self.settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise ImageTooLarge(f"request body over {self.settings.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_form(self, request: Request, body: bytes, max_files: int, max_fields: int) -> FormData:
        """A multipart body already read (read_body) as a form, each part within max_image_bytes."""
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            return await Request(request.scope, replay).form(max_files=max_files, max_fields=max_fields,
                                                             max_part_size=self.settings.max_image_bytes)
        except Exception as exc:  # starlette raises several types for a broken multipart body
            if "maximum size" in str(exc):
                raise ImageTooLarge(f"an uploaded part is over {self.settings.max_image_bytes} bytes") from exc
            raise InvalidParameter(f"malformed multipart body: {exc}") from exc

    async def _parse_multipart(self, request: Request, body: bytes, model: type[GenerateRequest]) -> Any:
        form = await self.read_form(request, body, max_files=MAX_FACE_IMAGES * MAX_IDENTITIES + 3, max_fields=4)
        faces = [await f.read() for f in form.getlist("face_image") if hasattr(f, "read")]
        # The identities form: parts `identities[i].face_image` (repeated for several photos) beside `params`,
        # whose `identities` list gives each one's box and strengths.
        identity_photos: dict[int, list[str]] = {}
        for name, part in form.multi_items():
            matched = IDENTITY_PART.fullmatch(name)
            if matched and hasattr(part, "read"):
                encoded_photo = base64.b64encode(await part.read()).decode()
                identity_photos.setdefault(int(matched.group(1)), []).append(encoded_photo)
        pose = form.get("pose_image")
        try:
            params = json.loads(form.get("params") or "{}")
        except (TypeError, json.JSONDecodeError) as exc:
            raise InvalidParameter("params: not a JSON object", field="params") from exc
        if not isinstance(params, dict):
            raise InvalidParameter("params: not a JSON object", field="params")
        if not faces and not identity_photos:
            raise InvalidParameter("face_image: upload at least one file", field="face_image")
        encoded: dict[str, Any] = {"face_image": [base64.b64encode(f).decode() for f in faces]} if faces else {}
        if identity_photos:
            given = params.get("identities")
            given = given if isinstance(given, list) else [{} for _ in range(max(identity_photos) + 1)]
            missing = sorted(set(identity_photos) - set(range(len(given))))
            if missing:
                raise InvalidParameter(f"identities[{missing[0]}].face_image: params.identities has no entry "
                                       f"{missing[0]}", field=f"identities[{missing[0]}].face_image")
            # an entry without parts keeps the face_image its params give (base64 or s3://)
            encoded["identities"] = [{**entry, "face_image": identity_photos[i]}
                                     if isinstance(entry, dict) and i in identity_photos else entry
                                     for i, entry in enumerate(given)]
        if pose is not None and hasattr(pose, "read"):
            encoded["pose_image"] = base64.b64encode(await pose.read()).decode()
        for name in ("init_image", "mask_image"):  # img2img / inpainting photos
            part = form.get(name)
            if part is not None and hasattr(part, "read"):
                encoded[name] = base64.b64encode(await part.read()).decode()
        try:
            return model.model_validate({**params, **encoded})
        except ValidationError as exc:
            raise validation_error(exc) from exc


@dataclass
class RequestInputs:
    """A request's images as bytes (control images apart from the params, which carry none), read once."""

    params: GenerateParams
    faces: list[bytes]
    pose: bytes | None
    init: bytes | None
    mask: bytes | None
    control_images: list[bytes | None]
    recorded: dict[str, Any] = field(default_factory=dict)  # sidecar_record(): what the writer records
    identities: list[list[bytes]] | None = None  # the identities form: each identity's photos (`faces` is empty)

    def sidecar_record(self) -> dict[str, Any]:
        """Digests of every input image (never the images) for the sidecar, and each control's type, strength and
        image digest in place of the request's controls."""
        def digest(data: bytes | None) -> str | None:
            return hashlib.sha256(data).hexdigest() if data else None

        controls = [{**control.model_dump(mode="json", exclude={"image"}), "image_sha256": digest(data)}
                    for control, data in zip(self.params.controls, self.control_images, strict=True)]
        inputs = {"face_image_sha256": [digest(f) for f in self.faces], "pose_image_sha256": digest(self.pose),
                  "init_image_sha256": digest(self.init), "mask_image_sha256": digest(self.mask)}
        if self.identities is not None:
            inputs["identities_face_image_sha256"] = [[digest(f) for f in photos] for photos in self.identities]
        return {"inputs": inputs, "params_extra": {"controls": controls} if controls else {}}
