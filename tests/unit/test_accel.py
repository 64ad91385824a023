"""Speed switches of the denoiser: each keeps the images (to float32 rounding), and warm-up compiles ahead of time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid_core.accel import AccelSettings
from instantid_core.config import PipelineSettings, Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from testkit.tiny import tiny_denoiser

WIDTH, HEIGHT = 96, 64
KEY = BatchKey(WIDTH, HEIGHT, steps=3, scheduler=Scheduler.euler)


def _requests(prompt_encoder) -> list[DenoiseRequest]:
    rng = np.random.default_rng(3)
    kps = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    kps[20:30, 30:40] = (255, 0, 0)
    return [
        DenoiseRequest(prompt_encoder.encode("a portrait", "blurry"), rng.standard_normal(512).astype(np.float32),
                       kps, seed=5, num_images=2, adapter_strength=1.2),
        DenoiseRequest(prompt_encoder.encode("an oil painting"), rng.standard_normal(512).astype(np.float32), kps,
                       seed=9, identitynet_strength=1.2, face_box=(10.0, 5.0, 60.0, 50.0)),
    ]


@torch.inference_mode()
def _noise(denoiser: IdentityDenoiser, requests: list[DenoiseRequest]) -> torch.Tensor:
    """One guided noise prediction (IdentityNet + UNet) on fixed inputs, in float."""
    cond = denoiser.prepare_conditioning(requests, denoiser.expand_samples(requests), KEY)
    latents = torch.randn(2 * 3, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0))
    return denoiser.predict_noise(latents, torch.tensor(500.0), cond, use_cfg=True)


def _assert_same_images(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=False):
        assert x.shape == y.shape
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # float32 rounding: at most one uint8 level


def test_fused_qkv_gives_the_same_images_as_separate_projections(tiny_root, denoiser, prompt_encoder):
    fused = tiny_denoiser(tiny_root, fuse_qkv=True)
    attentions = [m for m in fused.unet.modules() if hasattr(m, "fused_projections") and hasattr(m, "to_q")]
    assert attentions and all(m.fused_projections for m in attentions)
    self_attn = next(m for m in attentions if not m.is_cross_attention)
    # The separate weights are views into the fused one: fusing costs no memory.
    assert self_attn.to_k.weight.untyped_storage().data_ptr() == self_attn.to_qkv.weight.untyped_storage().data_ptr()
    assert all(m.processor.to_kv_ip is not None for m in attentions if m.is_cross_attention)
    requests = _requests(prompt_encoder)
    torch.testing.assert_close(_noise(fused, requests), _noise(denoiser, requests), rtol=1e-5, atol=1e-5)
    _assert_same_images(fused(requests, KEY), denoiser(requests, KEY))


def test_channels_last_gives_the_same_images(tiny_root, denoiser, prompt_encoder):
    nhwc = tiny_denoiser(tiny_root, channels_last=True)
    assert nhwc.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    requests = _requests(prompt_encoder)
    torch.testing.assert_close(_noise(nhwc, requests), _noise(denoiser, requests), rtol=1e-5, atol=1e-5)
    _assert_same_images(nhwc(requests, KEY), denoiser(requests, KEY))


def test_warmup_runs_every_size_and_batch_and_compiled_steps_match_eager(tiny_root, denoiser, prompt_encoder,
                                                                        tmp_path):
    # Dynamo with the eager backend: the same tracing (one full graph per step) without minutes of C++ compiling.
    settings = PipelineSettings(warmup_sizes=[(WIDTH, HEIGHT)], warmup_batch_sizes=[1, 3], compile=True,
                                compile_cache_dir=str(tmp_path / "cache"))
    compiled = tiny_denoiser(tiny_root, settings, compile_backend="eager", compile_vae=True)
    assert set(compiled.warmup_seconds) == {"96x64/b1", "96x64/b3"}
    assert (tmp_path / "cache").is_dir()
    requests = _requests(prompt_encoder)  # 3 images at 96x64: a warmed shape
    _assert_same_images(compiled(requests, KEY), denoiser(requests, KEY))


def test_bfloat16_denoiser_runs_guided_steps(tiny_root, prompt_encoder):
    # A float32 guidance tensor once promoted half-precision latents to float32 after the first guided step.
    half = tiny_denoiser(tiny_root, PipelineSettings(dtype="bfloat16"))
    images = half(_requests(prompt_encoder), KEY)
    assert [i.shape for i in images] == [(2, HEIGHT, WIDTH, 3), (1, HEIGHT, WIDTH, 3)]
    assert images[0].std() > 1.0


def test_impossible_switches_fail_at_construction(tiny_root):
    with pytest.raises(ValueError, match="sdpa_backend"):
        AccelSettings(sdpa_backend="flash").check(torch.device("cpu"), lora=False)
    with pytest.raises(ValueError, match="lcm_lora"):
        AccelSettings(fuse_qkv=True).check(torch.device("cpu"), lora=True)
    with pytest.raises(ValueError, match="sdpa_backend"):
        tiny_denoiser(tiny_root, sdpa_backend="cudnn")


def test_settings_switches_reach_the_accel_settings():
    settings = PipelineSettings(channels_last=True, fuse_qkv=True, compile=True, compile_mode="reduce-overhead",
                                compile_cache_dir="/tmp/x")
    accel = AccelSettings.from_settings(settings, compile_vae=True)
    assert (accel.channels_last, accel.fuse_qkv, accel.compile, accel.compile_mode, accel.compile_cache_dir,
            accel.compile_vae) == (True, True, True, "reduce-overhead", "/tmp/x", True)
    assert AccelSettings.from_settings(PipelineSettings()) == AccelSettings()
    assert not AccelSettings(compile=True, compile_mode="max-autotune").uses_cudagraphs(torch.device("cpu"))
    assert AccelSettings(compile=True, compile_mode="max-autotune").uses_cudagraphs(torch.device("cuda"))
