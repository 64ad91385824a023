"""Rules about a request that need no model (the Ingress and the CLI apply them before any stage runs)."""

from __future__ import annotations

import secrets

from .config import GenerateParams
from .errors import InvalidParameter


def draw_seed() -> int:
    """A fresh seed for a request that gave none; reported back so the image can be reproduced."""
    return secrets.randbits(62)


def check_init_inputs(params: GenerateParams, has_init: bool, has_mask: bool, init_name: str = "init_image",
                      mask_name: str = "mask_image") -> None:
    """img2img fields that need an init photo, checked before any photo is analysed."""
    if has_init:
        return
    for given, name in ((has_mask, mask_name), (params.inpaint_face, "inpaint_face"),
                        (params.strength is not None, "strength")):
        if given:
            raise InvalidParameter(f"{name} needs an init image ({init_name})", field=name)
