"""Weighted prompts `(word:1.3)` and prompts longer than 77 tokens, as the demo reads them; an unweighted short
prompt is exactly diffusers' SDXL encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from instantid_core.config import Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.errors import InvalidParameter
from instantid_core.weighting import parse_weighted_prompt

WIDTH, HEIGHT = 128, 96
# The tiny tokenizer has no merges: one token per character, so 77 tokens are ~75 characters.
HEAD = "a portrait of a woman, studio light, " * 3  # 111 characters: past the 77th token
LONG_A, LONG_B = HEAD + "red hair", HEAD + "blue sky"


@pytest.mark.parametrize(("text", "expected"), [
    ("a (red:1.3) cat", [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]),
    ("a (red:1.0) cat", [("a red cat", 1.0)]),
    ("(red) [cat]", [("red", 1.1), (" ", 1.0), ("cat", 1 / 1.1)]),
    ("((red:1.5))", [("red", 1.5 * 1.1)]),
    (r"\(literal\) \\", [("(literal) \\", 1.0)]),
    ("a (smiling man", [("a (smiling man", 1.0)]),  # unbalanced: read literally
    ("a smiling) man ]", [("a smiling) man ]", 1.0)]),
    ("( [ )", [("( [ )", 1.0)]),
    ("(x:1e3) (y:-2)", [("x:1e3", 1.1), (" ", 1.0), ("y:-2", 1.1)]),  # not a plain decimal: text at 1.1
])
def test_weight_syntax(text, expected):
    fragments = parse_weighted_prompt(text)
    assert [t for t, _ in fragments] == [t for t, _ in expected]
    assert [w for _, w in fragments] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def sdxl(tiny_root):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_root / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(sdxl, prompt, negative=None):
    with torch.inference_mode():
        embeds, negative_embeds, pooled, negative_pooled = sdxl.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative)
    return [t[0].numpy() for t in (embeds, negative_embeds, pooled, negative_pooled)]


@pytest.mark.parametrize(("prompt", "negative"), [("a photo of a man", "blurry"), ("a (smiling man", None),
                                                  ("a photo of a man", None)])
def test_unweighted_short_prompt_equals_diffusers_encode_prompt_exactly(prompt_encoder, sdxl, prompt, negative):
    ours = prompt_encoder.encode(prompt, negative or "")
    for got, want in zip((ours.prompt_embeds, ours.negative_prompt_embeds, ours.pooled, ours.negative_pooled),
                         _diffusers(sdxl, prompt, negative), strict=True):
        assert np.array_equal(got, want)


def test_weight_one_equals_the_plain_word_and_another_weight_differs(prompt_encoder):
    plain = prompt_encoder.encode("a photo of a red car", "ugly")
    neutral = prompt_encoder.encode("a photo of a (red:1.0) car", "(ugly:1.0)")
    heavy = prompt_encoder.encode("a photo of a (red:1.6) car", "ugly")
    light_negative = prompt_encoder.encode("a photo of a red car", "(ugly:0.5)")
    assert np.array_equal(plain.prompt_embeds, neutral.prompt_embeds)
    assert np.array_equal(plain.negative_prompt_embeds, neutral.negative_prompt_embeds)
    assert np.abs(heavy.prompt_embeds - plain.prompt_embeds).max() > 1e-3
    assert np.array_equal(heavy.pooled, plain.pooled)  # the pooled vector is the unweighted text's, as compel's
    assert np.abs(light_negative.negative_prompt_embeds - plain.negative_prompt_embeds).max() > 1e-3


def test_long_prompt_is_encoded_in_77_token_chunks_and_its_tail_counts(prompt_encoder, sdxl):
    first, second = prompt_encoder.encode(LONG_A, "blurry"), prompt_encoder.encode(LONG_B, "blurry")
    assert first.prompt_embeds.shape == (154, 64) and first.negative_prompt_embeds.shape == (154, 64)
    # diffusers alone truncates at 77 tokens: both prompts would be the same
    assert np.array_equal(_diffusers(sdxl, LONG_A)[0], _diffusers(sdxl, LONG_B)[0])
    assert np.abs(first.prompt_embeds[77:] - second.prompt_embeds[77:]).max() > 1e-3
    # a long negative pads the short prompt to its chunks; an empty negative stays zeros
    padded = prompt_encoder.encode("a cat", LONG_A)
    assert padded.prompt_embeds.shape == padded.negative_prompt_embeds.shape == (154, 64)
    assert not prompt_encoder.encode(LONG_A, "").negative_prompt_embeds.any()


def _request(embeds, seed=3) -> DenoiseRequest:
    kps = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    kps[30:40, 40:50] = 255
    return DenoiseRequest(prompt=embeds, face_embedding=np.random.default_rng(1).standard_normal(512).astype(
        np.float32), kps_image=kps, seed=seed, face_box=(20.0, 10.0, 90.0, 80.0))


def test_weights_and_a_long_prompts_tail_change_the_image(denoiser, prompt_encoder):
    key = BatchKey(WIDTH, HEIGHT, 3, Scheduler.euler)
    plain = denoiser([_request(prompt_encoder.encode("a photo of a red car"))], key)[0]
    neutral = denoiser([_request(prompt_encoder.encode("a photo of a (red:1.0) car"))], key)[0]
    heavy = denoiser([_request(prompt_encoder.encode("a photo of a (red:3.0) car"))], key)[0]
    assert np.array_equal(plain, neutral)
    assert np.abs(plain.astype(int) - heavy.astype(int)).mean() > 0.05  # the tiny UNet hears text faintly
    long_key = BatchKey(WIDTH, HEIGHT, 3, Scheduler.euler, text_tokens=154)
    first = denoiser([_request(prompt_encoder.encode(LONG_A))], long_key)[0]
    second = denoiser([_request(prompt_encoder.encode(LONG_B))], long_key)[0]
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 0.05


def test_a_prompt_of_another_length_than_its_batch_is_refused(denoiser, prompt_encoder):
    with pytest.raises(InvalidParameter, match="tokens") as err:
        denoiser([_request(prompt_encoder.encode(LONG_A))], BatchKey(WIDTH, HEIGHT, 2, Scheduler.euler))
    assert err.value.field == "prompt"
