"""A corpus of hostile or broken requests, each with the status and error code the API documents for it.

Built in code from the bundled face photo and Pillow, so every byte that is sent can be read here. Requests that
decode to a valid image without a usable face (blank CMYK, 16-bit, palette, transparent, animated) are expected to
be decoded and answered 422 `no_face`: that proves the decoder handled the mode instead of crashing.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

from testkit.api import FAST, b64


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    code: str
    json_body: Any = None  # sent with httpx `json=`
    raw_body: bytes | None = None  # sent as is, content-type application/json
    files: dict | None = None  # multipart upload
    data: dict | None = None  # multipart form fields
    method: str = "POST"
    path: str = "/v1/generate"
    params: dict = field(default_factory=dict)
    field: str | None = None  # the error's `field`, when the API names one


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def image_cases(face_jpeg: bytes) -> list[Case]:
    face = Image.open(io.BytesIO(face_jpeg)).convert("RGB")
    png, webp = encode(face, "PNG"), encode(face, "WEBP")
    gray = Image.new("RGB", (128, 128), (128, 128, 128))
    blank16 = Image.fromarray(np.full((96, 96), 30000, dtype=np.uint16))
    gif_frames = [Image.new("P", (64, 64), i) for i in (1, 2, 3)]
    gif = io.BytesIO()
    gif_frames[0].save(gif, "GIF", save_all=True, append_images=gif_frames[1:], duration=50, loop=0)
    corrupt_jpeg = face_jpeg[:600] + bytes(range(256)) * 40 + face_jpeg[-2:]

    def face_field(data: bytes, name: str, status: int, code: str) -> Case:
        return Case(name, status, code, json_body={"face_image": b64(data), "prompt": "x", **FAST},
                    field="face_image[0]" if status != 422 else None)

    return [
        face_field(b"", "zero-byte image", 415, "invalid_image"),
        face_field(face_jpeg[: len(face_jpeg) // 3], "truncated JPEG", 415, "invalid_image"),
        face_field(png[: len(png) // 2], "truncated PNG", 415, "invalid_image"),
        face_field(webp[: len(webp) // 2], "truncated WebP", 415, "invalid_image"),
        face_field(corrupt_jpeg, "corrupt JPEG body", 415, "invalid_image"),
        face_field(png[:40] + b"\x00" * 64 + png[104:], "corrupt PNG chunk", 415, "invalid_image"),
        face_field(b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\xff" * 64, "corrupt WebP", 415, "invalid_image"),
        face_field(b"GIF89a" + b"\x00" * 7, "GIF header only", 415, "invalid_image"),
        face_field(b"%PDF-1.7\n" + b"0" * 300, "a PDF", 415, "invalid_image"),
        face_field(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "an SVG", 415, "invalid_image"),
        face_field(png_declaring(100_000, 100_000), "decompression bomb header", 413, "image_too_large"),
        face_field(encode(Image.new("L", (8000, 6000)), "PNG"), "48 megapixel blank PNG", 413, "image_too_large"),
        face_field(encode(gray.convert("CMYK"), "JPEG"), "CMYK JPEG without a face", 422, "no_face"),
        face_field(encode(blank16, "PNG"), "16-bit PNG without a face", 422, "no_face"),
        face_field(encode(gray.convert("P"), "PNG"), "palette PNG without a face", 422, "no_face"),
        face_field(encode(Image.new("RGBA", (128, 128), (0, 0, 0, 0)), "PNG"), "transparent RGBA PNG", 422,
                   "no_face"),
        face_field(gif.getvalue(), "animated GIF", 422, "no_face"),
        face_field(encode(Image.new("RGB", (1, 1)), "PNG"), "1x1 image", 422, "no_face"),
        Case("text file uploaded as face.jpg", 415, "invalid_image",
             files={"face_image": ("face.jpg", b"this is not a picture\n", "image/jpeg")},
             data={"params": json.dumps({"prompt": "x", **FAST})}, field="face_image[0]"),
        Case("corrupt pose image", 415, "invalid_image",
             json_body={"face_image": b64(face_jpeg), "pose_image": b64(b"\xff\xd8\xff broken"), "prompt": "x",
                        **FAST}, field="pose_image"),
        Case("face_index beyond the faces found", 422, "no_face",
             json_body={"face_image": b64(face_jpeg), "prompt": "x", "face_index": 3, **FAST}),
    ]


def body_cases(face_b64: str, bucket: str, max_body_bytes: int, max_image_bytes: int) -> list[Case]:
    def bad(name: str, field: str, **changes: Any) -> Case:
        body = {"face_image": face_b64, "prompt": "x", **FAST, **changes}
        return Case(name, 400, "invalid_parameter", json_body=body, field=field)

    valid_text = json.dumps({"face_image": face_b64, "prompt": "x"})
    return [
        bad("unknown field", "colour", colour="red"),
        bad("steps as a string", "steps", steps="ten"),
        bad("steps a float", "steps", steps=2.5),
        bad("prompt as a number", "prompt", prompt=123),
        bad("face_image as a number", "face_image.str", face_image=42),
        bad("num_images as a list", "num_images", num_images=[]),
        bad("steps 0", "steps", steps=0),
        bad("steps 101", "steps", steps=101),
        bad("width not a multiple of 8", "width", width=65),
        bad("height too large", "height", height=8192),
        bad("negative guidance", "guidance_scale", guidance_scale=-1),
        bad("guidance above 20", "guidance_scale", guidance_scale=21),
        bad("identitynet strength 2", "identitynet_strength", identitynet_strength=2),
        bad("negative adapter strength", "adapter_strength", adapter_strength=-0.1),
        bad("5 images", "num_images", num_images=5),
        bad("negative seed", "seed", seed=-1),
        bad("seed above 64 bits", "seed", seed=2**70),
        bad("negative face_index", "face_index", face_index=-1),
        bad("unknown style", "style", style="Cubism-9000"),
        bad("unknown scheduler", "scheduler", scheduler="nonexistent"),
        bad("10,000-character prompt", "prompt", prompt="a" * 10_000),
        bad("empty prompt", "prompt", prompt=""),
        bad("output format bmp", "output.format", output={"format": "bmp"}),
        bad("output prefix escaping the base", "output.prefix", output={"prefix": "../../etc"}),
        bad("nine face images", "face_image", face_image=[face_b64] * 9),
        bad("text that is not base64", "face_image[0]", face_image="%%% not base64 %%%"),
        bad("a data: URL instead of base64", "face_image[0]", face_image="data:image/png;base64,AAAA"),
        Case("missing face_image", 400, "invalid_parameter", json_body={"prompt": "x"}, field="face_image"),
        Case("JSON array body", 400, "invalid_parameter", json_body=[1, 2, 3]),
        Case("not JSON", 400, "invalid_parameter", raw_body=b"{not json"),
        Case("NaN guidance", 400, "invalid_parameter",
             raw_body=valid_text[:-1].encode() + b', "guidance_scale": NaN}', field="guidance_scale"),
        Case("Infinity strength", 400, "invalid_parameter",
             raw_body=valid_text[:-1].encode() + b', "adapter_strength": Infinity}', field="adapter_strength"),
        Case("non-UTF-8 body", 400, "invalid_parameter", raw_body=b'{"prompt": "\xff\xfe\xfa", "face_image": "x"}'),
        Case("deeply nested JSON", 400, "invalid_parameter", raw_body=b"[" * 20_000 + b"]" * 20_000),
        Case("body over the limit", 413, "image_too_large", raw_body=b"A" * (max_body_bytes + 1)),
        Case("image part over the limit", 413, "image_too_large",
             files={"face_image": ("big.jpg", b"\xff\xd8" + b"\0" * (max_image_bytes + 1), "image/jpeg")},
             data={"params": json.dumps({"prompt": "x"})}),
        Case("multipart without params", 400, "invalid_parameter",
             files={"face_image": ("f.jpg", b"\xff\xd8\xff", "image/jpeg")}),
        Case("multipart params not JSON", 400, "invalid_parameter",
             files={"face_image": ("f.jpg", b"\xff\xd8\xff", "image/jpeg")}, data={"params": "{oops"}, field="params"),
        Case("multipart without a file", 400, "invalid_parameter", data={"params": "{}"}),
        Case("s3 URI to a missing key", 404, "input_not_found",
             json_body={"face_image": f"s3://{bucket}/no/such/face.jpg", "prompt": "x"}),
        Case("s3 URI in a bucket not allowed", 403, "input_not_allowed",
             json_body={"face_image": "s3://someone-elses-bucket/face.jpg", "prompt": "x"}),
        Case("http URL with URL fetching off", 403, "input_not_allowed",
             json_body={"face_image": "http://127.0.0.1:1/face.jpg", "prompt": "x"}),
        Case("inline is not a boolean", 400, "invalid_parameter",
             json_body={"face_image": face_b64, "prompt": "x"}, params={"inline": "perhaps"}, field="inline"),
        Case("job id with symbols", 400, "invalid_parameter", method="GET", path="/v1/jobs/abc$def", field="job_id"),
        Case("job id escaping the route", 404, "not_found", method="GET", path="/v1/jobs/..%2F..%2Fsecrets"),
        Case("unknown route", 404, "not_found", method="GET", path="/v2/everything"),
        Case("wrong method", 405, "method_not_allowed", method="DELETE", path="/v1/generate"),
        Case("unknown job id", 404, "job_not_found", method="GET", path="/v1/jobs/0123456789abcdef"),
        Case("job submit with a bad body", 400, "invalid_parameter", path="/v1/jobs",
             json_body={"face_image": face_b64, "prompt": "x", "steps": -3}, field="steps"),
    ]


def send(client: httpx.Client, case: Case) -> httpx.Response:
    kwargs: dict = {"params": case.params}
    if case.raw_body is not None:
        kwargs.update(content=case.raw_body, headers={"content-type": "application/json"})
    elif case.files is not None or case.data is not None:
        # httpx sends multipart only when there are files; a file-less form still has to be multipart here.
        kwargs.update(files=case.files or {"unused": ("", b"", "text/plain")}, data=case.data)
    elif case.json_body is not None:
        kwargs["json"] = case.json_body
    return client.request(case.method, case.path, **kwargs)


def check(case: Case, response: httpx.Response) -> str | None:
    """None if the answer is the documented one, else what differs."""
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return f"{case.name}: {response.status_code} with a non-JSON body {response.text[:200]!r}"
    problems = []
    if response.status_code != case.status:
        problems.append(f"status {response.status_code} (expected {case.status})")
    if error.get("code") != case.code:
        problems.append(f"code {error.get('code')!r} (expected {case.code!r})")
    if not error.get("message"):
        problems.append("no message")
    if case.field is not None and error.get("field") != case.field:
        problems.append(f"field {error.get('field')!r} (expected {case.field!r})")
    return f"{case.name}: {', '.join(problems)}; body {response.text[:300]}" if problems else None
