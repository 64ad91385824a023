"""Style presets as data: the built-in YAML, the operator's additions through config, the demo's "(No style)"."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from instantid_core.config import GenerateParams, PipelineSettings, Style
from instantid_core.errors import InvalidParameter
from instantid_core.styles import apply_style, builtin_styles, load_styles, read_styles_file
from instantid_core.text import PromptEncoder


def test_every_built_in_name_is_in_the_yaml_and_wraps_the_prompt():
    styles = builtin_styles()
    assert set(styles) == {style.value for style in Style}
    prompt, negative = apply_style(styles, "Watercolor", "a cat", "blurry")
    assert "a cat" in prompt and prompt != "a cat" and negative.endswith(", noise blurry")
    assert apply_style(styles, "No style", "a cat", "") == ("a cat", "")


def test_the_demos_no_style_spelling_is_accepted():
    assert GenerateParams(prompt="x", style="(No style)").style == "No style"
    assert GenerateParams(prompt="x", style=Style.neon).style == "Neon"
    assert apply_style(builtin_styles(), "(No style)", "a cat", "ugly") == ("a cat", "ugly")


def test_operators_add_and_replace_styles_through_config(tmp_path, tiny_root, prompt_encoder):
    extra = tmp_path / "styles.yaml"
    extra.write_text("Claymation:\n  prompt: 'claymation figure of {prompt}'\n  negative: photo\n"
                     "Neon:\n  prompt: '{prompt}, pink neon'\n")
    settings = PipelineSettings(styles_file=str(extra),
                                styles={"Pixel": {"prompt": "pixel art of {prompt}", "negative": "smooth"}})
    styles = load_styles(settings)
    assert styles["Claymation"].prompt == "claymation figure of {prompt}"
    assert styles["Neon"].prompt == "{prompt}, pink neon" and styles["Neon"].negative == ""
    assert styles["Pixel"].negative == "smooth" and "Watercolor" in styles  # built-ins stay
    encoder = PromptEncoder(tiny_root / "sdxl", settings)
    clay = encoder.encode("a cat", "", "Claymation")
    assert np.array_equal(clay.prompt_embeds, prompt_encoder.encode("claymation figure of a cat").prompt_embeds)
    with pytest.raises(InvalidParameter, match="Claymation. is not one of: No style, ") as err:
        prompt_encoder.encode("a cat", "", "Claymation")  # not configured on this encoder
    assert err.value.field == "style"


def test_a_broken_styles_file_names_the_file_and_the_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("Oops:\n  prompt: 'no placeholder'\n")
    with pytest.raises(InvalidParameter, match=r"bad\.yaml.*Oops.*\{prompt\}"):
        read_styles_file(bad)
    with pytest.raises(ValidationError, match="prompt"):
        PipelineSettings(styles={"Oops": {"prompt": "no placeholder"}})
