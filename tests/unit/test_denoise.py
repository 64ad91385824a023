"""IdentityDenoiser: batching, seeds, per-sample conditioning and parity with diffusers' SDXL pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from instantid_core.config import Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.errors import InvalidParameter
from testkit.tiny import write_tiny_lcm_lora

WIDTH, HEIGHT = 128, 96
KEY = BatchKey(WIDTH, HEIGHT, steps=3, scheduler=Scheduler.euler)


def _kps_image(offset: int = 0) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[30 + offset:40 + offset, 40:50] = (255, 0, 0)
    image[30:40, 70:80] = (0, 255, 0)
    return image


def _request(prompt_encoder, prompt: str, identity: int, **overrides) -> DenoiseRequest:
    """A request whose face (embedding, keypoints) and default seed derive from `identity`."""
    rng = np.random.default_rng(identity)
    fields = dict(prompt=prompt_encoder.encode(prompt), face_embedding=rng.standard_normal(512).astype(np.float32),
                  kps_image=_kps_image(identity % 5), seed=identity)
    return DenoiseRequest(**{**fields, **overrides})


@pytest.mark.parametrize("scheduler", [Scheduler.euler, Scheduler.euler_ancestral])  # deterministic, stochastic
def test_batch_of_three_different_requests_equals_each_run_alone(denoiser, prompt_encoder, scheduler):
    key = BatchKey(WIDTH, HEIGHT, steps=3, scheduler=scheduler)
    requests = [
        _request(prompt_encoder, "a portrait", 1),
        _request(prompt_encoder, "an oil painting", 2, guidance=1.0, num_images=2, adapter_strength=0.2),
        _request(prompt_encoder, "neon city", 3, identitynet_strength=1.2, face_box=(20.0, 10.0, 90.0, 80.0)),
    ]
    batched = denoiser(requests, key)
    for request, images in zip(requests, batched, strict=True):
        alone = denoiser([request], key)[0]
        assert images.shape == (request.num_images, HEIGHT, WIDTH, 3) and images.dtype == np.uint8
        # Batched convolutions round differently from single ones: equal to float32 rounding, i.e. <= 1/255.
        assert np.abs(images.astype(int) - alone.astype(int)).max() <= 1


def test_same_seed_gives_identical_images_and_another_seed_differs(denoiser, prompt_encoder):
    first = denoiser([_request(prompt_encoder, "a portrait", 11)], KEY)[0]
    again = denoiser([_request(prompt_encoder, "a portrait", 11)], KEY)[0]
    other = denoiser([_request(prompt_encoder, "a portrait", 11, seed=12)], KEY)[0]
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0


def test_images_of_one_request_use_consecutive_seeds(denoiser, prompt_encoder):
    pair = denoiser([_request(prompt_encoder, "a portrait", 20, num_images=2)], KEY)[0]
    second = denoiser([_request(prompt_encoder, "a portrait", 20, seed=21)], KEY)[0]
    assert not np.array_equal(pair[0], pair[1])
    assert np.abs(pair[1].astype(int) - second[0].astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["identitynet_strength", "adapter_strength"])
def test_each_strength_changes_the_image(denoiser, prompt_encoder, name):
    off = denoiser([_request(prompt_encoder, "a portrait", 5, **{name: 0.0})], KEY)[0]
    on = denoiser([_request(prompt_encoder, "a portrait", 5, **{name: 1.5})], KEY)[0]
    assert np.abs(off.astype(int) - on.astype(int)).mean() > 0.5


@pytest.mark.parametrize("scheduler", [s for s in Scheduler if s != Scheduler.lcm])
def test_strength_zero_equals_diffusers_sdxl_pipeline(denoiser, prompt_encoder, tiny_root, scheduler):
    request = DenoiseRequest(prompt=prompt_encoder.encode("a photo of a man", "blurry"),
                             face_embedding=np.ones(512, np.float32), kps_image=_kps_image(), seed=7, guidance=5.0,
                             identitynet_strength=0.0, adapter_strength=0.0)
    ours = denoiser([request], BatchKey(WIDTH, HEIGHT, 4, scheduler))[0][0]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_root / "sdxl")
    pipe.scheduler = denoiser.make_scheduler(scheduler)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("a photo of a man", negative_prompt="blurry", width=WIDTH, height=HEIGHT, num_inference_steps=4,
                     guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    assert np.array_equal(ours, (reference * 255).round().astype(np.uint8))


def test_identitynet_sees_the_keypoint_image_scaled_to_unit_range(denoiser, prompt_encoder):
    # The reference feeds IdentityNet the keypoint image as diffusers' control images are: float RGB in [0, 1].
    request = _request(prompt_encoder, "a portrait", 3)
    samples = denoiser.expand_samples([request])
    control = denoiser.prepare_conditioning([request], samples, KEY).control  # (2B, 3, H, W): uncond, cond
    expected = torch.from_numpy(request.kps_image.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert control.shape == (2, 3, HEIGHT, WIDTH)
    for half in control:
        torch.testing.assert_close(half.float(), expected, rtol=0, atol=1e-6)


def test_face_region_limits_identitynet_to_the_box(denoiser, prompt_encoder):
    # Keypoints far from the box: with the box on, IdentityNet's residuals outside it are zeroed, so the image
    # moves towards the strength-0 image.
    whole = denoiser([_request(prompt_encoder, "a portrait", 9, identitynet_strength=1.5)], KEY)[0]
    boxed = denoiser([_request(prompt_encoder, "a portrait", 9, identitynet_strength=1.5,
                               face_box=(0.0, 0.0, 16.0, 16.0))], KEY)[0]
    off = denoiser([_request(prompt_encoder, "a portrait", 9, identitynet_strength=0.0)], KEY)[0]
    assert np.abs(boxed.astype(int) - off.astype(int)).mean() < np.abs(whole.astype(int) - off.astype(int)).mean()


def test_bad_inputs_are_invalid_parameters(denoiser, prompt_encoder):
    good = _request(prompt_encoder, "a portrait", 1)
    with pytest.raises(InvalidParameter, match="kps_image"):
        denoiser([good], BatchKey(WIDTH + 8, HEIGHT, 2, Scheduler.euler))
    with pytest.raises(InvalidParameter, match="lcm"):
        denoiser([good], BatchKey(WIDTH, HEIGHT, 2, Scheduler.lcm))
    with pytest.raises(InvalidParameter, match="empty"):
        denoiser([], KEY)


def test_probe_is_a_forward_pass_on_the_denoisers_device(denoiser):
    denoiser.probe()  # the Denoiser replica's health check: the Resampler on one zero embedding, synchronised


def test_lcm_lora_from_a_folder_is_used_by_the_lcm_scheduler_only(denoiser, prompt_encoder, tiny_root, settings,
                                                                  tmp_path):
    from instantid_core.denoise import LCM_ADAPTER, IdentityDenoiser

    write_tiny_lcm_lora(tiny_root, tmp_path / "lcm-lora-sdxl")
    fast = IdentityDenoiser(tiny_root / "sdxl", tiny_root / "InstantID" / "ControlNetModel",
                            tiny_root / "InstantID" / "ip-adapter.bin", settings, lcm_lora=tmp_path / "lcm-lora-sdxl")
    assert LCM_ADAPTER in fast.unet.peft_config
    request = _request(prompt_encoder, "a portrait", 4, guidance=1.0)
    # Outside the LCM scheduler the LoRA is off: the same image as a denoiser without it.
    assert np.array_equal(fast([request], KEY)[0], denoiser([request], KEY)[0])
    lcm_key = BatchKey(WIDTH, HEIGHT, steps=2, scheduler=Scheduler.lcm)
    with_lora = fast([request], lcm_key)[0]
    for name, parameter in fast.unet.named_parameters():  # the same run with the LoRA's effect removed
        if "lora_B" in name:
            parameter.data.zero_()
    assert np.abs(with_lora.astype(int) - fast([request], lcm_key)[0].astype(int)).max() > 0


def test_an_lcm_lora_without_unet_weights_is_a_weights_error(tiny_root, settings, tmp_path):
    from safetensors.torch import save_file

    from instantid_core.denoise import IdentityDenoiser
    from instantid_core.errors import WeightsError

    save_file({"text_encoder.something.weight": torch.zeros(2, 2)}, tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(WeightsError, match="no LoRA weights"):
        IdentityDenoiser(tiny_root / "sdxl", tiny_root / "InstantID" / "ControlNetModel",
                         tiny_root / "InstantID" / "ip-adapter.bin", settings,
                         lcm_lora=tmp_path / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("scheduler", [Scheduler.euler_ancestral, Scheduler.dpmpp_2m_karras])  # stochastic, multistep
def test_on_step_drops_unwanted_requests_and_the_rest_match_running_alone(denoiser, prompt_encoder, scheduler):
    key = BatchKey(WIDTH, HEIGHT, steps=4, scheduler=scheduler)
    requests = [_request(prompt_encoder, "a portrait", 41, num_images=2), _request(prompt_encoder, "neon city", 42),
                _request(prompt_encoder, "an oil painting", 43)]
    calls = []

    def on_step(step: int, steps: int) -> list[bool]:
        calls.append((step, steps))
        return [True, step < 2, True]  # the second request is cancelled after step 2

    batched = denoiser(requests, key, on_step=on_step)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert batched[1] is None
    for index in (0, 2):
        alone = denoiser([requests[index]], key)[0]
        assert batched[index].shape == alone.shape
        assert np.abs(batched[index].astype(int) - alone.astype(int)).max() <= 1


def test_on_step_stops_the_call_when_no_request_is_wanted(denoiser, prompt_encoder):
    calls = []

    def on_step(step: int, steps: int) -> list[bool]:
        calls.append(step)
        return [False]

    key = BatchKey(WIDTH, HEIGHT, steps=5, scheduler=Scheduler.euler)
    assert denoiser([_request(prompt_encoder, "a portrait", 44)], key, on_step=on_step) == [None]
    assert calls == [1]
