"""OutputStore: generated images plus a JSON sidecar on file:// or s3://, and reads of job state.

A request's sidecar (`meta.json`) is its commit marker: it is written after every image, and a failed request
leaves neither sidecar nor images behind. User-supplied inputs are read by `instantid_core.fetch` instead, which
only reads allow-listed buckets and hosts.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from instantid_core.errors import (
    ImageTooLarge,
    InputNotAllowed,
    InputNotFound,
    InvalidParameter,
    StorageError,
)

# name -> (Pillow format, file extension, content type)
_FORMATS = {
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "jpg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}
_PNG_COMPRESS_LEVEL = 3  # ~25% faster than Pillow's 6 on 1024px images for a few % more bytes
_MAX_PARALLEL_PUTS = 4  # a request has at most 4 images; upload them concurrently to cut latency
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "Forbidden"}


def make_s3_client() -> Any:
    """An S3 client on boto3's default credential chain (AWS_ENDPOINT_URL honoured by boto3) with standard retries.
    SigV4 throughout: boto3 would presign with the deprecated SigV2 in us-east-1, which newer regions refuse."""
    config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60,
                    signature_version="s3v4")
    return boto3.client("s3", config=config)


def encode_image(array_uint8_hwc: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encode an image array to PNG, JPEG or WebP bytes.

    Args:
        array_uint8_hwc: `(H, W, 3)` RGB (also `(H, W)`, `(H, W, 1)` gray or `(H, W, 4)` RGBA) uint8 array.
        fmt: `png`, `jpeg` (or `jpg`) or `webp`.
        quality: 1..100, used by JPEG and WebP.

    Returns:
        The encoded bytes.

    Raises:
        InvalidParameter: unknown format or quality out of range.
        ValueError: the array is not uint8 with a supported shape.
    """
    pil_format = _format(fmt)[0]
    if not 1 <= quality <= 100:
        raise InvalidParameter(f"quality must be in [1, 100], got {quality}", field="quality")
    array = array_uint8_hwc
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    image = Image.fromarray(np.ascontiguousarray(array))
    if pil_format == "JPEG" and image.mode == "RGBA":
        image = image.convert("RGB")  # JPEG has no alpha channel
    options = {"compress_level": _PNG_COMPRESS_LEVEL} if pil_format == "PNG" else {"quality": quality}
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class StoredOutput:
    """Where one request's outputs landed."""

    image_uris: list[str]
    meta_uri: str


@dataclass(frozen=True)
class _Loc:
    """One object: `scheme` is `s3` (bucket + key) or `file` (key is an absolute filesystem path)."""

    scheme: str
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        # Not Path.as_uri(): percent-encoding would make the URI differ from what _parse_uri reads back.
        return f"s3://{self.bucket}/{self.key}" if self.scheme == "s3" else f"file://{self.key}"


class OutputStore:
    """Writes request outputs under a base URI and reads/writes small objects (job state, inputs).

    Args:
        base_uri: `s3://bucket/prefix`, `file:///abs/path` or a plain local path.
        s3_client: a boto3 S3 client; default `make_s3_client()`, created on first S3 use.

    Relative keys given to the helpers are joined to the base and must not escape it (`..`, absolute paths
    are refused). Full `s3://` / `file://` URIs are used as given: the helpers are for trusted, configured
    locations; untrusted user URIs go through `instantid_core.fetch.read_uri`.
    """

    def __init__(self, base_uri: str, *, s3_client: Any = None) -> None:
        base = parse_location(base_uri)
        if base.scheme == "file":
            base = _Loc("file", "", str(Path(base.key).expanduser().resolve()))
        elif not base.bucket:
            raise InvalidParameter(f"output URI {base_uri!r} names no bucket", field="output_uri")
        self._base = _Loc(base.scheme, base.bucket, base.key.strip("/") if base.scheme == "s3" else base.key)
        self._client = s3_client
        self._client_lock = threading.Lock()  # boto3's default session is not safe to create clients from threads

    @property
    def base_uri(self) -> str:
        """The normalised base URI (`s3://bucket/prefix` or `file:///abs/path`)."""
        return self._base.uri.rstrip("/")

    def write_request(
        self,
        request_id: str,
        images: list[bytes],
        fmt: str,
        meta: dict[str, Any],
        *,
        prefix: str | None = None,
        now: datetime | None = None,
    ) -> StoredOutput:
        """Write a request's encoded images, then its `meta.json` sidecar.

        Keys: `{base}/{prefix?}/{yyyy-mm-dd}/{request_id}/{index}.{png|jpg|webp}` and `.../{request_id}/meta.json`.
        The sidecar holds `meta` plus `request_id`, `format`, `images` (their URIs) and `created_at`.

        Args:
            request_id: one path segment of `[A-Za-z0-9._=-]`, e.g. a UUID.
            images: encoded image bytes, in output order.
            fmt: `png`, `jpeg`/`jpg` or `webp` (decides the extension and content type).
            meta: JSON-serialisable request metadata (numpy scalars, enums, datetimes, pydantic models allowed).
            prefix: optional sub-folder(s) under the base, e.g. a tenant name.
            now: timestamp for the date folder; default the current UTC time.

        Returns:
            The image URIs and the sidecar URI.

        Raises:
            InvalidParameter: bad request_id, prefix or format.
            StorageError: a write failed; images already written for this request were deleted (best effort).
        """
        _, ext, content_type = _format(fmt)
        now = now or datetime.now(timezone.utc)
        folder = self._request_folder(request_id, prefix, now)
        image_locs = [self._join(f"{folder}/{i}.{ext}") for i in range(len(images))]
        meta_loc = self._join(f"{folder}/meta.json")
        image_uris = [loc.uri for loc in image_locs]
        sidecar = {**meta, "request_id": request_id, "format": ext, "images": image_uris, "created_at": now.isoformat()}
        body = _dumps(sidecar)  # before any write: a meta that cannot be serialised leaves nothing to clean up
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(_MAX_PARALLEL_PUTS, len(images)))) as pool:
                futures = [pool.submit(self._put, loc, data, content_type)
                           for loc, data in zip(image_locs, images, strict=True)]
            # Leaving the pool waited for every upload, so none can land after the cleanup below.
            for future in futures:
                future.result()
            self._put(meta_loc, body, "application/json")
        except Exception as err:
            # Sidecar first: a stale one from an earlier attempt must not outlive its images.
            self._delete([meta_loc, *image_locs])
            raise StorageError(f"could not write outputs of request {request_id} to {meta_loc.uri}: {err}") from err
        return StoredOutput(image_uris=image_uris, meta_uri=meta_loc.uri)

    def request_meta_uri(self, request_id: str, *, prefix: str | None = None, now: datetime | None = None) -> str:
        """The sidecar URI write_request would write for this id now (to refuse a reused id before any work)."""
        folder = self._request_folder(request_id, prefix, now or datetime.now(timezone.utc))
        return self._join(f"{folder}/meta.json").uri

    @staticmethod
    def _request_folder(request_id: str, prefix: str | None, now: datetime) -> str:
        _check_segment("request_id", request_id)
        prefix_parts = _check_key("prefix", prefix) if prefix else []
        return "/".join([*prefix_parts, now.strftime("%Y-%m-%d"), request_id])

    def put_json(self, key_or_uri: str, obj: Any) -> str:
        """Write `obj` as JSON (atomically: temp file + rename locally, one PutObject on S3); returns its URI."""
        loc = self._resolve(key_or_uri)
        try:
            self._put(loc, _dumps(obj), "application/json")
        except (OSError, BotoCoreError, ClientError) as err:
            raise StorageError(f"could not write {loc.uri}: {err}") from err
        return loc.uri

    def write_bytes(self, key_or_uri: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Write raw bytes atomically (as put_json does); returns the object's URI."""
        loc = self._resolve(key_or_uri)
        try:
            self._put(loc, data, content_type)
        except (OSError, BotoCoreError, ClientError) as err:
            raise StorageError(f"could not write {loc.uri}: {err}") from err
        return loc.uri

    def get_json(self, key_or_uri: str) -> Any:
        """Read a JSON object; InputNotFound when it does not exist."""
        loc = self._resolve(key_or_uri)
        try:
            return json.loads(self._get(loc))
        except ValueError as err:
            raise StorageError(f"{loc.uri} is not valid JSON: {err}") from err

    def read_bytes(self, key_or_uri: str) -> bytes:
        """Read an object's bytes; InputNotFound when it does not exist."""
        return self._get(self._resolve(key_or_uri))

    def presigned_url(self, uri: str, ttl_s: int) -> str:
        """A GET URL for an s3:// object that works without credentials for `ttl_s` seconds (SigV4, signed here
        with the store's credentials: no call to S3). InvalidParameter for anything but an s3:// object."""
        loc = self._resolve(uri)
        if loc.scheme != "s3":
            raise InvalidParameter(f"only s3:// objects have presigned URLs, got {uri[:200]!r}", field="uri")
        return self._s3().generate_presigned_url("get_object", Params={"Bucket": loc.bucket, "Key": loc.key},
                                                 ExpiresIn=ttl_s)

    def exists(self, key_or_uri: str) -> bool:
        """Whether the object (not a folder) exists."""
        loc = self._resolve(key_or_uri)
        if loc.scheme == "file":
            return Path(loc.key).is_file()
        try:
            self._s3().head_object(Bucket=loc.bucket, Key=loc.key)
            return True
        except ClientError as err:
            if _error_code(err) in _NOT_FOUND_CODES:
                return False
            raise StorageError(f"could not check {loc.uri}: {err}") from err
        except BotoCoreError as err:
            raise StorageError(f"could not check {loc.uri}: {err}") from err

    def list_uris(self, prefix_uri: str) -> list[str]:
        """Sorted URIs of every object whose key starts with the prefix (S3 semantics; recursive)."""
        loc = self._resolve(prefix_uri, allow_empty=True)
        if loc.scheme == "file":
            root = Path(loc.key)
            top = root if root.is_dir() else root.parent
            files = top.rglob("*") if top.is_dir() else []
            return sorted(
                f"file://{path}"
                for path in files
                if path.is_file() and str(path).startswith(loc.key) and not path.name.startswith(".")
            )
        try:
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=loc.key)
            return sorted(f"s3://{loc.bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", []))
        except (BotoCoreError, ClientError) as err:
            raise StorageError(f"could not list {loc.uri}: {err}") from err

    # -- internals -------------------------------------------------------------------------------------------

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = make_s3_client()
            return self._client

    def _join(self, key: str) -> _Loc:
        if self._base.scheme == "file":
            return _Loc("file", "", f"{self._base.key.rstrip('/')}/{key}")
        return _Loc("s3", self._base.bucket, f"{self._base.key}/{key}" if self._base.key else key)

    def _resolve(self, key_or_uri: str, *, allow_empty: bool = False) -> _Loc:
        if "://" in key_or_uri:
            loc = parse_location(key_or_uri)
            return _Loc("file", "", str(Path(loc.key).expanduser().resolve())) if loc.scheme == "file" else loc
        if allow_empty and not key_or_uri:
            base = self._base
            return _Loc(base.scheme, base.bucket, f"{base.key.rstrip('/')}/" if base.key else "")
        loc = self._join("/".join(_check_key("key", key_or_uri)))
        # A listing prefix keeps its trailing slash: "jobs/a/" must not match "jobs/ab/...".
        return _Loc(loc.scheme, loc.bucket, loc.key + "/") if allow_empty and key_or_uri.endswith("/") else loc

    def _put(self, loc: _Loc, data: bytes, content_type: str) -> None:
        if loc.scheme == "s3":
            self._s3().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, ContentType=content_type)
            return
        path = Path(loc.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique hidden temp name in the same folder, then an atomic rename: readers never see a partial file.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _get(self, loc: _Loc) -> bytes:
        if loc.scheme == "s3":
            return s3_get(self._s3(), loc.bucket, loc.key)
        try:
            return Path(loc.key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise InputNotFound(f"{loc.uri} does not exist") from err
        except OSError as err:
            raise StorageError(f"could not read {loc.uri}: {err}") from err

    def _delete(self, locs: list[_Loc]) -> None:
        """Best effort: a cleanup failure must not hide the error that caused it."""
        for loc in locs:
            if loc.scheme == "file":
                try:
                    Path(loc.key).unlink(missing_ok=True)
                except OSError:
                    pass
        s3_keys = [{"Key": loc.key} for loc in locs if loc.scheme == "s3"]
        if s3_keys:
            try:
                self._s3().delete_objects(Bucket=locs[0].bucket, Delete={"Objects": s3_keys, "Quiet": True})
            except Exception:  # noqa: BLE001 - best effort, see docstring
                pass


def s3_get(client: Any, bucket: str, key: str, *, max_bytes: int | None = None) -> bytes:
    uri = f"s3://{bucket}/{key}"
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        if max_bytes is not None and response["ContentLength"] > max_bytes:
            response["Body"].close()
            raise ImageTooLarge(f"{uri} has {response['ContentLength']} bytes, the limit is {max_bytes}", field="uri")
        return response["Body"].read()
    except ClientError as err:
        code = _error_code(err)
        if code in _NOT_FOUND_CODES:
            raise InputNotFound(f"{uri} does not exist ({code})", field="uri") from err
        if code in _DENIED_CODES:
            raise InputNotAllowed(f"access to {uri} is denied ({code})", field="uri") from err
        raise StorageError(f"could not read {uri}: {err}") from err
    except BotoCoreError as err:
        raise StorageError(f"could not read {uri}: {err}") from err


def parse_location(uri: str) -> _Loc:
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return _Loc("s3", bucket, key)
    if "://" in uri and not uri.startswith("file://"):
        raise InvalidParameter(f"unsupported URI scheme in {uri[:200]!r}; use s3:// or file://", field="uri")
    return _Loc("file", "", uri.removeprefix("file://"))


def _check_segment(name: str, value: str) -> None:
    if not isinstance(value, str) or not _SAFE_SEGMENT.fullmatch(value):  # the first-character rule refuses ".."
        raise InvalidParameter(
            f"{name} must be 1-128 characters of [A-Za-z0-9._=-] starting with a letter or digit, got {value!r}",
            field=name,
        )


def check_prefix(value: str, name: str = "prefix") -> str:
    """Validate an output sub-prefix before any work is done; raises InvalidParameter naming the problem."""
    _check_key(name, value)
    return value


def _check_key(name: str, value: str) -> list[str]:
    """Split a relative key into segments, refusing absolute paths and `..` (path traversal)."""
    if value.startswith(("/", "\\")) or "\\" in value:
        raise InvalidParameter(f"{name} must be a relative path, got {value!r}", field=name)
    parts = value.strip("/").split("/")
    for part in parts:
        _check_segment(name, part)
    return parts


def _format(fmt: str) -> tuple[str, str, str]:
    try:
        return _FORMATS[fmt.lower()]
    except (KeyError, AttributeError):
        raise InvalidParameter(f"format must be one of png, jpeg, webp; got {fmt!r}", field="format") from None


def _error_code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "model_dump"):  # pydantic models, e.g. GenerateParams
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, indent=2, sort_keys=True).encode()
