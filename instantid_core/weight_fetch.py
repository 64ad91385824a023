"""Fetching one weight source to a local folder: a Hugging Face repo (snapshot_download, pinned
revisions, only the files a part loads), an s3:// prefix (cached by ETag) or a local path as it is."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from .errors import WeightsError
from .weight_layout import FETCH_PATTERNS


def fetch_source(part: str, source: str, *, offline: bool | None, cache_root: Path, client: Any,
                 patterns: list[str] | None = None) -> tuple[Path, str, int]:
    """One source to a local path: (path, revision, files downloaded); `patterns`: what to fetch of a folder
    (default the part's FETCH_PATTERNS)."""
    patterns = FETCH_PATTERNS[part] if patterns is None else patterns
    if source.startswith("s3://"):
        return _fetch_s3(part, source, offline=bool(offline), cache_root=cache_root, client=client,
                         patterns=patterns)
    if is_local(source):
        return Path(source.removeprefix("file://")).expanduser(), "local", 0  # the part's check names what is missing
    return _fetch_hf(part, source, offline=bool(offline), patterns=patterns)


def is_local(source: str) -> bool:
    return source.startswith(("/", ".", "~", "file://")) or Path(source).exists()


def _fetch_hf(part: str, source: str, *, offline: bool, patterns: list[str]) -> tuple[Path, str, int]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name

    spec, _, revision = source.partition("@")
    segments = spec.strip("/").split("/")
    if len(segments) < 2 or not all(segments) or ".." in segments:
        raise WeightsError(
            f"{part}: {source!r} is neither an existing path, an s3:// URI nor a hub id org/repo[/path][@revision]",
            field=part,
        )
    repo_id, sub = "/".join(segments[:2]), "/".join(segments[2:])
    # `sub` alone matches a file subpath; `sub/<pattern>` a folder's needed files.
    patterns = [sub, *(f"{sub}/{p}" for p in patterns)] if sub else patterns
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    before = _count_files(blobs)
    try:
        snapshot = Path(
            snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns, local_files_only=offline)
        )
    except Exception as err:  # the hub raises many types (offline, not found, gated, HTTP, incomplete cache)
        raise WeightsError(f"{part}: cannot get {source!r} from the Hugging Face hub: {err}", field=part) from err
    path = snapshot / sub if sub else snapshot
    if not path.exists():
        reason = f"{part}: no {sub!r} in {repo_id} at revision {snapshot.name} (source: {source})"
        raise WeightsError(reason, field=part)
    # Counting new blobs is how the hub cache tells what this call downloaded.
    return path, snapshot.name, max(0, _count_files(blobs) - before)


def _fetch_s3(part: str, source: str, *, offline: bool, cache_root: Path, client: Any,
              patterns: list[str]) -> tuple[Path, str, int]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = source[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    data_root = cache_root / "s3" / bucket
    # ETag records live outside the data folders (so loaders never see them); bucket names cannot start with ".".
    etag_root = cache_root / "s3" / ".etags" / bucket
    local = data_root / prefix if prefix else data_root
    if offline:
        return _cached_s3(part, source, local, etag_root, prefix)
    try:
        objects = _list_s3(client, bucket, prefix, patterns)
    except (BotoCoreError, ClientError) as err:
        raise WeightsError(f"{part}: cannot list {source}: {err}", field=part) from err
    if not objects:
        raise WeightsError(f"{part}: no objects under {source} (looked for {patterns})", field=part)
    downloaded = 0
    for key, etag, size in objects:
        if ".." in key.split("/") or key.startswith("/"):
            raise WeightsError(f"{part}: refusing S3 key {key!r} (escapes the cache folder)", field=part)
        dest, record = data_root / key, etag_root / key
        if dest.is_file() and dest.stat().st_size == size and record.is_file() and record.read_text() == etag:
            continue  # unchanged since the last download
        try:
            _download_s3(client, bucket, key, dest)
        except (BotoCoreError, ClientError, OSError) as err:
            raise WeightsError(f"{part}: cannot download s3://{bucket}/{key}: {err}", field=part) from err
        _write_atomic(record, etag.encode())  # after the data: a crash in between means one more download
        downloaded += 1
    return local, _etag_digest((key, etag) for key, etag, _ in objects), downloaded


def _list_s3(client: Any, bucket: str, prefix: str, patterns: list[str]) -> list[tuple[str, str, int]]:
    """(key, etag, size) of the needed objects: the prefix itself when it is a file, else matches under it."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if prefix and key == prefix:
                return [(key, obj["ETag"], obj["Size"])]
            rel = key[len(prefix) + 1:] if prefix else key
            if (not prefix or key.startswith(prefix + "/")) and any(fnmatch.fnmatch(rel, p) for p in patterns):
                found.append((key, obj["ETag"], obj["Size"]))
    return found


def _download_s3(client: Any, bucket: str, key: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        client.download_file(bucket, key, str(tmp))  # s3transfer: parallel ranged GETs for large files
        os.replace(tmp, dest)  # a reader never sees a half-written file under the final name
    finally:
        tmp.unlink(missing_ok=True)


def _cached_s3(part: str, source: str, local: Path, etag_root: Path, prefix: str) -> tuple[Path, str, int]:
    records = etag_root / prefix if prefix else etag_root
    files = [records] if records.is_file() else sorted(p for p in records.rglob("*") if p.is_file())
    if not local.exists() or not files:
        raise WeightsError(f"{part}: offline and {source} is not cached in {local}", field=part)
    entries = ((p.relative_to(etag_root).as_posix(), p.read_text()) for p in files if not p.name.endswith(".part"))
    return local, _etag_digest(entries), 0


def _etag_digest(entries: Any) -> str:
    text = "".join(f"{key}\0{etag}\n" for key, etag in sorted(entries))
    return "etag:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if not p.name.endswith(".incomplete")) if folder.is_dir() else 0


def materialise(src: Path, dest: Path, patterns: list[str]) -> None:
    """Link or copy `src` (a file, or the needed files of a folder) to `dest`."""
    if src.is_file():
        _link_or_copy(src, dest)
        return
    def wanted(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, p) for p in patterns)

    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(src).parts):
            continue
        plain = rel.replace(".fp16.", ".")
        # An fp16 variant is taken only when its full-precision sibling is absent (a local fp16-only folder).
        if wanted(rel) or (plain != rel and wanted(plain) and not (src / plain).is_file()):
            _link_or_copy(path, dest / rel)


def _link_or_copy(src: Path, dest: Path) -> None:
    src = src.resolve()  # hub snapshots are symlinks into blobs/: link the blob, not the symlink
    if dest.exists():
        if os.path.samefile(src, dest):
            return
        a, b = src.stat(), dest.stat()
        if a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime):  # rsync's quick check; copy2 keeps mtime
            return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
