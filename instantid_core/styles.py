"""Prompt style presets as data: the built-in `styles.yaml` next to this module, extended or overridden by the
operator's `PipelineSettings.styles_file` and inline `PipelineSettings.styles` (later wins).

A style wraps the user's prompt in its template (`{prompt}` marks where it goes) and puts its negative words before
the user's negative prompt. The demo spells the empty style "(No style)"; both spellings name it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from .config import NO_STYLE, PipelineSettings, StylePreset, canonical_style
from .errors import InvalidParameter

BUILTIN_STYLES = Path(__file__).with_name("styles.yaml")
_PRESETS = TypeAdapter(dict[str, StylePreset])


def read_styles_file(path: str | Path) -> dict[str, StylePreset]:
    """A YAML mapping of name -> {prompt, negative}.

    Raises:
        InvalidParameter: unreadable file, not YAML, or an entry without `{prompt}` (named, with the file): a
            broken config, reported when the prompt stage starts (the CLI: before any model loads).
    """
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return {canonical_style(name): preset for name, preset in _PRESETS.validate_python(data).items()}
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise InvalidParameter(f"styles_file: cannot read {path}: {reason}", field="styles_file") from exc


@cache
def builtin_styles() -> dict[str, StylePreset]:
    return read_styles_file(BUILTIN_STYLES)


def load_styles(settings: PipelineSettings | None = None) -> dict[str, StylePreset]:
    """Built-in presets, then the operator's file, then the operator's inline presets."""
    styles = dict(builtin_styles())
    if settings is not None and settings.styles_file:
        styles.update(read_styles_file(settings.styles_file))
    if settings is not None:
        styles.update({canonical_style(name): preset for name, preset in settings.styles.items()})
    return styles


def apply_style(styles: dict[str, StylePreset], name: str, prompt: str, negative_prompt: str) -> tuple[str, str]:
    """The style's template around the prompt, its negative words before the user's.

    Raises:
        InvalidParameter: no style of that name (the message lists the names).
    """
    preset = styles.get(canonical_style(str(getattr(name, "value", name))))
    if preset is None:
        raise InvalidParameter(f"style {name!r} is not one of: {', '.join(styles)}", field="style")
    negative = " ".join(part for part in (preset.negative, negative_prompt) if part)
    return preset.prompt.replace("{prompt}", prompt), negative


__all__ = ["NO_STYLE", "apply_style", "builtin_styles", "load_styles", "read_styles_file"]
