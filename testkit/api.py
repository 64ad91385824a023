"""What requests to the app are made of, and reading what it wrote back from S3."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

FACE = Path(__file__).resolve().parents[1] / "instantid_core" / "data" / "astronaut.jpg"  # the bundled photo
FAST = {"steps": 2, "width": 64, "height": 64}  # the cheapest request the parameters allow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image) -> bytes:
    """A PIL image as PNG bytes (lossless: what a caller uploads of an image a test made)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_pixels(data: bytes) -> np.ndarray:
    """An encoded image's RGB pixels, (H, W, 3) uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def s3_read(uri: str) -> bytes:
    """The bytes of an s3://bucket/key object (boto3 as configured by the environment)."""
    import boto3

    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_keys(bucket: str, prefix: str = "") -> list[str]:
    """Every key under `prefix` in `bucket`, sorted."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def post(app, body: dict, timeout: float = 180, **kwargs):
    """POST /v1/generate to a served app (anything with a `url`, e.g. testkit.serve.ServedApp) with a JSON body;
    `kwargs` go to httpx.post (params, headers)."""
    import httpx

    return httpx.post(f"{app.url}/v1/generate", json=body, timeout=timeout, **kwargs)
