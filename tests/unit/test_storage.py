"""OutputStore and read_uri against a real filesystem and a real S3 API (moto's server on loopback)."""

from __future__ import annotations

import io
import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from instantid_core.errors import InputNotAllowed, InputNotFound, InvalidParameter, StorageError
from instantid_core.fetch import read_uri
from instantid_core.storage import OutputStore, encode_image

NOW = datetime(2024, 5, 6, 12, 30, tzinfo=timezone.utc)


def _image(seed: int, fmt: str = "png") -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    return encode_image(rgb, fmt)


def _keys(client, bucket: str) -> list[str]:
    return sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_encode_image_round_trips_size_and_png_pixels(fmt: str, magic: bytes) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    data = encode_image(rgb, fmt, quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert data.startswith(magic) and decoded.shape == (16, 24, 3)
    if fmt == "png":
        assert np.array_equal(decoded, rgb)


def test_file_store_writes_documented_keys_and_sidecar(tmp_path: Path) -> None:
    store = OutputStore(f"file://{tmp_path}/out")
    images = [_image(0), _image(1)]
    stored = store.write_request("req-1", images, "png", {"seed": np.int64(7)}, prefix="tenant-a", now=NOW)

    folder = tmp_path / "out" / "tenant-a" / "2024-05-06" / "req-1"
    assert stored.image_uris == [f"file://{folder}/0.png", f"file://{folder}/1.png"]
    assert stored.meta_uri == f"file://{folder}/meta.json"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "meta.json"]  # no temp files left
    assert (folder / "1.png").read_bytes() == images[1]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["request_id"] == "req-1" and meta["images"] == stored.image_uris


def test_s3_store_writes_documented_keys_with_sidecar_last(s3_client, s3_bucket: str) -> None:
    puts: list[str] = []
    # before-parameter-build sees the API parameters (Key); before-call only the serialised request.
    s3_client.meta.events.register("before-parameter-build.s3.PutObject",
                                   lambda params, **_: puts.append(params["Key"]))
    store = OutputStore(f"s3://{s3_bucket}/outputs", s3_client=s3_client)
    images = [_image(0, "jpeg"), _image(1, "jpeg"), _image(2, "jpeg")]

    stored = store.write_request("req-2", images, "jpeg", {"prompt": "a cat"}, now=NOW)

    folder = "outputs/2024-05-06/req-2"
    assert _keys(s3_client, s3_bucket) == [f"{folder}/{i}.jpg" for i in range(3)] + [f"{folder}/meta.json"]
    assert puts[-1] == f"{folder}/meta.json" and len(puts) == 4
    assert stored.image_uris[2] == f"s3://{s3_bucket}/{folder}/2.jpg"
    head = s3_client.head_object(Bucket=s3_bucket, Key=f"{folder}/2.jpg")
    assert head["ContentType"] == "image/jpeg"
    assert s3_client.get_object(Bucket=s3_bucket, Key=f"{folder}/2.jpg")["Body"].read() == images[2]
    assert json.loads(store.read_bytes(stored.meta_uri))["prompt"] == "a cat"


def test_s3_failure_mid_upload_leaves_no_sidecar_and_no_orphan_images(s3_client, s3_bucket: str) -> None:
    calls, lock = [], threading.Lock()

    def fail_second_put(params, **_) -> None:
        with lock:
            calls.append(params["Key"])
            if len(calls) == 2:
                raise ConnectionError("injected: S3 went away")

    s3_client.meta.events.register("before-parameter-build.s3.PutObject", fail_second_put)
    store = OutputStore(f"s3://{s3_bucket}/outputs", s3_client=s3_client)

    with pytest.raises(StorageError, match="req-3"):
        store.write_request("req-3", [_image(0), _image(1), _image(2)], "png", {}, now=NOW)

    assert len(calls) == 3  # the other images did upload before the failure was handled...
    assert _keys(s3_client, s3_bucket) == []  # ...and were deleted; no sidecar was written


def test_file_failure_mid_write_leaves_no_sidecar_and_no_orphan_images(tmp_path: Path) -> None:
    folder = tmp_path / "2024-05-06" / "req-4"
    (folder / "1.png").mkdir(parents=True)  # a folder where image 1 must go: its rename fails
    store = OutputStore(str(tmp_path))

    with pytest.raises(StorageError):
        store.write_request("req-4", [_image(0), _image(1)], "png", {}, now=NOW)

    assert sorted(p.name for p in folder.iterdir()) == ["1.png"]  # only the obstacle: no 0.png, no meta.json


@pytest.mark.parametrize(
    "request_id, prefix",
    [("../escape", None), ("a/b", None), ("/abs", None), ("..", None), ("", None),
     ("ok", "../up"), ("ok", "a/../../b"), ("ok", "/abs"), ("ok", "a\\b")],
)
def test_path_traversal_is_refused(tmp_path: Path, request_id: str, prefix: str | None) -> None:
    store = OutputStore(str(tmp_path / "out"))
    with pytest.raises(InvalidParameter):
        store.write_request(request_id, [_image(0)], "png", {}, prefix=prefix, now=NOW)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_helper_keys_cannot_escape_the_base(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    for key in ("../x.json", "/etc/x.json", "jobs/../../x.json"):
        with pytest.raises(InvalidParameter):
            store.put_json(key, {})


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_json_and_bytes_helpers_round_trip(backend: str, tmp_path: Path, request) -> None:
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        store = OutputStore(f"s3://{bucket}/state", s3_client=request.getfixturevalue("s3_client"))
    else:
        store = OutputStore(str(tmp_path / "state"))
    uri = store.put_json("jobs/j1/state.json", {"done": 3})
    store.put_json("jobs/j10/state.json", {"done": 0})

    assert store.get_json("jobs/j1/state.json") == {"done": 3} == store.get_json(uri)
    assert store.exists(uri) and not store.exists("jobs/j1/other.json")
    assert store.list_uris("jobs/j1/") == [uri]
    assert len(store.list_uris("jobs/")) == 2 and len(store.list_uris("")) == 2
    with pytest.raises(InputNotFound):
        store.read_bytes("jobs/missing.json")


def test_read_uri_reads_only_allowed_buckets(s3_client, s3_bucket: str) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="faces/a.png", Body=b"face")
    assert read_uri(f"s3://{s3_bucket}/faces/a.png", allowed_buckets=[s3_bucket], s3_client=s3_client) == b"face"

    with pytest.raises(InputNotAllowed, match=s3_bucket):
        read_uri(f"s3://{s3_bucket}/faces/a.png", allowed_buckets=["other-bucket"], s3_client=s3_client)
    with pytest.raises(InputNotAllowed):
        read_uri(f"s3://{s3_bucket}/faces/a.png", allowed_buckets=None, s3_client=s3_client)
    for uri in ("file:///etc/passwd", "/etc/passwd", "https://example.com/a.png"):
        with pytest.raises(InputNotAllowed):
            read_uri(uri, allowed_buckets=[s3_bucket], s3_client=s3_client)


def test_read_uri_missing_key_is_input_not_found(s3_client, s3_bucket: str) -> None:
    with pytest.raises(InputNotFound, match="faces/missing.png"):
        read_uri(f"s3://{s3_bucket}/faces/missing.png", allowed_buckets=[s3_bucket], s3_client=s3_client)


def test_s3_store_finds_the_endpoint_through_boto3s_own_environment(s3_client, s3_bucket: str) -> None:
    store = OutputStore(f"s3://{s3_bucket}/")  # no client: boto3's default chain + AWS_ENDPOINT_URL
    stored = store.write_request("req-5", [_image(0)], "webp", {}, now=NOW)
    assert stored.meta_uri == f"s3://{s3_bucket}/2024-05-06/req-5/meta.json"
    assert _keys(s3_client, s3_bucket) == ["2024-05-06/req-5/0.webp", "2024-05-06/req-5/meta.json"]


def test_request_meta_uri_is_where_write_request_puts_the_sidecar(tmp_path: Path) -> None:
    store = OutputStore(tmp_path.as_uri())
    expected = store.request_meta_uri("req-9", prefix="tenant-a", now=NOW)
    assert not store.exists(expected)  # what the Ingress checks before a caller's x-request-id may be used
    stored = store.write_request("req-9", [encode_image(np.zeros((8, 8, 3), np.uint8), "png")], "png", {},
                                 prefix="tenant-a", now=NOW)
    assert stored.meta_uri == expected and store.exists(expected)
    with pytest.raises(InvalidParameter):
        store.request_meta_uri("../escape")
