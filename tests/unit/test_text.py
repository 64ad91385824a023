"""PromptEncoder: diffusers' SDXL prompt encoding, styles applied before encoding."""

from __future__ import annotations

import numpy as np

from instantid_core.config import Style
from instantid_core.styles import apply_style, builtin_styles


def test_embeddings_have_sdxl_shapes_and_depend_on_the_prompt(prompt_encoder):
    cat, dog = prompt_encoder.encode("a cat"), prompt_encoder.encode("a dog")
    assert cat.prompt_embeds.shape == (77, 64) and cat.pooled.shape == (32,)
    assert cat.prompt_embeds.dtype == np.float32
    assert not np.allclose(cat.prompt_embeds, dog.prompt_embeds)


def test_empty_negative_prompt_is_zeros_as_sdxl_config_asks(prompt_encoder):
    embeds = prompt_encoder.encode("a cat", "")
    assert not embeds.negative_prompt_embeds.any() and not embeds.negative_pooled.any()
    assert prompt_encoder.encode("a cat", "blurry").negative_prompt_embeds.any()


def test_style_template_wraps_prompt_and_extends_negative():
    prompt, negative = apply_style(builtin_styles(), Style.watercolor, "a cat", "blurry")
    assert "a cat" in prompt and prompt != "a cat"
    assert negative.endswith("blurry") and len(negative) > len("blurry")
    assert apply_style(builtin_styles(), Style.none, "a cat", "") == ("a cat", "")


def test_style_changes_the_encoding(prompt_encoder):
    plain = prompt_encoder.encode("a cat", "", Style.none)
    styled = prompt_encoder.encode("a cat", "", Style.neon)
    assert not np.allclose(plain.prompt_embeds, styled.prompt_embeds)
