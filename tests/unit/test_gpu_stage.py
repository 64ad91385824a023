"""The denoiser under GPU conditions, proven on the CPU with the real types: out-of-memory split-and-retry,
VAE decode one image at a time and tiled above a size, default sizes from SDXL buckets, byte-bounded caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantid_app.cache import LRUCache, nbytes
from instantid_core.conditioning import RequestPhotos, face_condition
from instantid_core.config import GenerateParams, PipelineSettings, Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from instantid_core.errors import GPUMemoryError
from instantid_core.images import bucket_size, size_buckets
from instantid_core.memory import run_splitting

WIDTH, HEIGHT = 64, 64
KEY = BatchKey(WIDTH, HEIGHT, steps=2, scheduler=Scheduler.euler)


def _request(prompt_encoder, identity: int, num_images: int = 1) -> DenoiseRequest:
    rng = np.random.default_rng(identity)
    return DenoiseRequest(prompt=prompt_encoder.encode("a portrait"),
                          face_embedding=rng.standard_normal(512).astype(np.float32),
                          kps_image=np.zeros((HEIGHT, WIDTH, 3), np.uint8), seed=identity, num_images=num_images)


@pytest.fixture
def tight(tiny_root, monkeypatch) -> IdentityDenoiser:
    """A denoiser whose forward pass raises torch.OutOfMemoryError for batches of more than one sample, as a full
    GPU raises it (patched in here: product code has no fault switch)."""
    tight = IdentityDenoiser(tiny_root / "sdxl", tiny_root / "InstantID" / "ControlNetModel",
                             tiny_root / "InstantID" / "ip-adapter.bin", PipelineSettings())
    real_step = tight._step

    def step(model_input, t, cond, use_cfg):
        samples = model_input.shape[0] // (2 if use_cfg else 1)
        if samples > 1:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {samples} samples in the batch)")
        return real_step(model_input, t, cond, use_cfg)

    monkeypatch.setattr(tight, "_step", step)
    return tight


def test_the_injected_fault_raises_the_real_out_of_memory_type_at_the_forward_pass(tight, prompt_encoder):
    requests = [_request(prompt_encoder, 1), _request(prompt_encoder, 2)]
    with pytest.raises(torch.OutOfMemoryError, match="2 samples"):
        tight(requests, KEY)


def test_a_batch_out_of_memory_is_split_and_every_request_that_fits_alone_gets_its_images(
        tight, denoiser, prompt_encoder):
    requests = [_request(prompt_encoder, 1), _request(prompt_encoder, 2, num_images=2), _request(prompt_encoder, 3)]
    calls = []

    def run(batch, on_step):
        calls.append(len(batch))
        return tight(batch, KEY, on_step)

    results = run_splitting(run, requests, lambda r: f"{WIDTH}x{HEIGHT} with {r.num_images} image(s)", "cpu")
    assert calls == [3, 1, 2, 1, 1]  # the batch, its first half, the second half, then that half's halves
    assert isinstance(results[1], GPUMemoryError) and results[1].code == "gpu_memory"
    assert "64x64 with 2 image(s)" in results[1].message
    for index in (0, 2):  # the others: the same images as without any memory pressure
        alone = denoiser([requests[index]], KEY)[0]
        assert np.abs(results[index].astype(int) - alone.astype(int)).max() <= 1
    # Afterwards the denoiser serves a request that fits as before (nothing left half-done).
    assert tight([requests[0]], KEY)[0].shape == (1, HEIGHT, WIDTH, 3)


def test_split_halves_keep_the_per_request_on_step_answers(tight, prompt_encoder):
    requests = [_request(prompt_encoder, i) for i in range(4)]
    wanted = [True, False, True, True]  # the second request's caller left

    results = run_splitting(lambda batch, on_step: tight(batch, KEY, on_step), requests, str, "cpu",
                            on_step=lambda step, steps: wanted)
    assert [r is None for r in results] == [False, True, False, False]


def test_vae_decodes_a_batch_one_image_at_a_time_and_tiles_large_images(tiny_root, denoiser):
    latents = torch.randn(2, 4, 48, 40, generator=torch.Generator().manual_seed(0))
    sliced = denoiser.decode_latents(latents)
    together = denoiser.vae.decode(latents / denoiser.vae.config.scaling_factor, return_dict=False)[0]
    assert sliced.shape == (2, 3, 384, 320)
    torch.testing.assert_close(sliced, together, atol=1e-4, rtol=1e-4)
    tiled = IdentityDenoiser(tiny_root / "sdxl", tiny_root / "InstantID" / "ControlNetModel",
                             tiny_root / "InstantID" / "ip-adapter.bin",
                             PipelineSettings(vae_tile_above_pixels=64 * 64))
    assert tiled.vae.tile_sample_min_size < 384  # the tiny VAE's tiles are smaller than this image: it tiles
    out = tiled.decode_latents(latents)
    assert out.shape == sliced.shape
    assert not torch.equal(out, sliced)  # blended tiles, not the plain decode ...
    assert (out - sliced).abs().mean() < 0.1  # ... of nearly the same image


def test_default_sizes_are_few_sdxl_buckets_by_nearest_aspect_ratio():
    buckets = size_buckets()
    assert (1280, 1280) in buckets and (1280, 960) in buckets and (960, 1280) in buckets
    assert all(max(size) == 1280 and size[0] % 64 == 0 and size[1] % 64 == 0 for size in buckets)
    assert len(buckets) == 11
    assert bucket_size(4000, 3000) == bucket_size(1600, 1190) == (1280, 960)  # 4:3 and nearly 4:3 share a size
    assert bucket_size(1080, 1920) == (704, 1280)
    assert bucket_size(500, 500) == (1280, 1280)


def test_face_condition_caches_the_analysis_not_the_keypoint_image(prompt_encoder, tiny_root, astronaut_bytes):
    from instantid_core.face import FaceAnalyzer, FaceInfo

    settings = PipelineSettings()
    analyzer = FaceAnalyzer(tiny_root / "antelopev2", settings)
    cache: LRUCache[FaceInfo] = LRUCache(1 << 20)
    small = face_condition(analyzer, RequestPhotos([astronaut_bytes]), GenerateParams(prompt="x", width=64, height=64),
                           settings, cache=cache)
    (key,) = cache.keys()
    analysis = cache.get(key)
    assert isinstance(analysis, FaceInfo) and nbytes(analysis) < 4096  # a few KB, whatever the output size
    marked = FaceInfo(analysis.embedding + 1, analysis.kps, analysis.bbox, analysis.det_score, analysis.image_size)
    cache.put(key, marked)
    large = face_condition(analyzer, RequestPhotos([astronaut_bytes]),
                           GenerateParams(prompt="x", width=256, height=128), settings, cache=cache)
    assert large.kps_image.shape == (128, 256, 3) and small.kps_image.shape == (64, 64, 3)
    np.testing.assert_allclose(large.embedding, marked.embedding)  # the analysis came from the cache
    assert len(cache) == 1


def test_cache_is_bounded_in_bytes_dropping_the_least_recently_used():
    cache: LRUCache[np.ndarray] = LRUCache(3000)
    for name in "abc":
        cache.put(name, np.zeros(1000, np.uint8))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", np.zeros(1000, np.uint8))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.bytes == 3000
    cache.put("huge", np.zeros(5000, np.uint8))  # larger than the whole bound: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
