"""A thread-safe LRU cache bounded in bytes, for stage results (face analyses by image hash, prompt embeddings by
strings).

Hand-written rather than cachetools.LRUCache(getsizeof=...): the same 30 lines plus the lock that cachetools leaves
to the caller, and no new dependency for a replica that only needs get/put.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import numpy as np

V = TypeVar("V")


def nbytes(value: Any) -> int:
    """Approximate memory of a cached value: arrays and bytes by their buffers, dataclasses and sequences by their
    parts (what dominates a face analysis or prompt embeddings); anything else by sys.getsizeof."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, bytes | bytearray):
        return len(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, list | tuple):
        return sum(nbytes(item) for item in value)
    return sys.getsizeof(value)


class LRUCache(Generic[V]):
    """Least recently used entries go first once the values' sizes add up to more than `max_bytes` (0 disables
    the cache; a single value larger than the bound is not kept)."""

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int] = nbytes) -> None:
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self.bytes = 0
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                return None
            self._items.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        size = self.sizeof(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    __setitem__ = put

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def resize(self, max_bytes: int) -> None:
        """A new bound, applied live (user_config): the least recently used entries beyond it are dropped."""
        with self._lock:
            self.max_bytes = max_bytes
            while self._items and self.bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)
