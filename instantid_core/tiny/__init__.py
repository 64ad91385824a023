"""The tiny preset: randomly initialised, tiny models in exactly the published on-disk layouts (written by
`instantid_core.tiny.models`), for tests, the demo and benchmarks on CPU.

This module only checks and places the preset; the writer, which needs diffusers and transformers, is imported when
a preset is actually written. Every serving replica resolves its weights through here, and the stages that run no
diffusion model (face analysis, the safety checker) would otherwise import diffusers at start for nothing (~5 s of
CPU each).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

# Written into `.complete`; bumped when the preset gains members, so a folder written by an older version (e.g.
# without the LoRAs and ControlNets of issue 14, SDXL's fp16 files, the safety checker of issue 24 or the scoring pack
# of issue 26) is rewritten rather than served without them.
PRESET_VERSION = "5"


def _current(root: Path) -> bool:
    marker = root / ".complete"
    return marker.is_file() and marker.read_text().strip() == PRESET_VERSION


def ensure_tiny_preset(root: Path) -> Path:
    """Write the tiny preset to `root` unless it is already there; safe when several processes race.

    Each writer builds the preset in its own temporary folder and renames it into place; the preset is seeded, so
    whichever rename wins, every process sees the same weights.
    """
    root = Path(root)
    if _current(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    from .models import write_tiny_preset  # heavy; see the module docstring

    write_tiny_preset(staging)
    (staging / ".complete").write_text(PRESET_VERSION)
    try:
        staging.rename(root)
    except OSError:  # another process won the race (or an old, incomplete or outdated folder is in the way)
        if not _current(root):
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return root
