"""The run's manifest: JSONL parts under `{output}/manifest/` (S3 has no append), and the pairs a dead run wrote
but never recorded (read back from their sidecars)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from datetime import datetime, timezone

from instantid_core.storage import OutputStore

from .pairs import pair_id


class Manifest:
    """JSONL parts under `{output}/manifest/` (S3 has no append), plus `summary.json` at the end."""

    def __init__(self, store: OutputStore, flush_every: int = 8, flush_seconds: float = 5.0) -> None:
        self.store, self.flush_every, self.flush_seconds = store, flush_every, flush_seconds
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.pending: list[dict] = []
        self.parts = 0
        self.last_flush = time.monotonic()

    def load(self) -> dict[tuple[str, str], dict]:
        """The newest record per (image, prompt) over all earlier runs."""
        latest: dict[tuple[str, str], dict] = {}
        for uri in sorted(self.store.list_uris(f"{self.store.base_uri.rstrip('/')}/manifest/")):
            for line in self.store.read_bytes(uri).decode().splitlines():
                if line.strip():
                    record = json.loads(line)
                    latest[(record["image"], record["prompt_id"])] = record
        return latest

    def add(self, record: dict) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.flush_every or time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            body = "".join(json.dumps(r) + "\n" for r in self.pending).encode()
            self.store.write_bytes(f"manifest/part-{self.run_id}-{self.parts:05d}.jsonl", body, "application/x-ndjson")
            self.parts += 1
            self.pending = []
        self.last_flush = time.monotonic()


def recover_written(store: OutputStore, pairs: Iterable[tuple[str, str]], day: str) -> dict[tuple[str, str], dict]:
    """Pairs whose sidecar exists (written, but the run died before its manifest part was flushed): one listing of
    the day's folder, then a read of each sidecar found (not one request per pair)."""
    base = store.base_uri.rstrip("/")
    written = {uri.removeprefix(f"{base}/") for uri in store.list_uris(f"{base}/{day}/") if uri.endswith("/meta.json")}
    found = {}
    for image_uri, prompt_id in pairs:
        request_id = pair_id(image_uri, prompt_id)
        meta_key = f"{day}/{request_id}/meta.json"
        if meta_key in written:
            meta = store.get_json(meta_key)
            found[(image_uri, prompt_id)] = {"image": image_uri, "prompt_id": prompt_id, "status": "ok",
                                             "request_id": request_id, "outputs": meta.get("images", []),
                                             "metadata": f"{base}/{meta_key}",
                                             **{key: meta[key] for key in ("safety", "identity") if key in meta}}
    return found
