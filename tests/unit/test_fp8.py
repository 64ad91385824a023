"""FP8 Linear layers and regional compile (issue 22): the dtype plumbing, the CPU-runnable kernel path, the fallbacks,
and a typed error where the device cannot do FP8. Speed is the GPU lease's business (bench/gpu_lease.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from instantid_core import accel as acc
from instantid_core import fp8
from instantid_core.accel import AccelSettings
from instantid_core.config import PipelineSettings, Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest, IdentityDenoiser
from testkit.tiny import tiny_denoiser

KEY = BatchKey(64, 64, steps=2, scheduler=Scheduler.euler)


def _requests(prompt_encoder) -> list[DenoiseRequest]:
    kps = np.zeros((64, 64, 3), np.uint8)
    kps[20:30, 30:40] = (255, 0, 0)
    embedding = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    return [DenoiseRequest(prompt_encoder.encode("a portrait", "blurry"), embedding, kps, seed=5)]


@pytest.mark.parametrize("backend", ["scaled_mm", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float8_linear_stores_fp8_weights_and_answers_in_the_model_dtype(backend, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    layer = fp8.Float8Linear(linear, backend)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (48, 64)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.ndim == 0
    assert layer.bias.dtype == dtype
    x = torch.randn(2, 93, 64).to(dtype)  # 186 rows: not a multiple of 16, the padded path
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 93, 48)
    reference = linear(x).float()
    error = ((out.float() - reference).norm() / reference.norm()).item()
    assert 1e-3 < error < 2**-4  # rounded to 3 mantissa bits (not a plain copy), within what e4m3 explains


def test_scaled_mm_and_emulated_backends_agree():
    torch.manual_seed(1)
    linear = nn.Linear(128, 32, bias=False).to(torch.bfloat16)
    x = torch.randn(16, 128).to(torch.bfloat16)
    kernel, emulated = fp8.Float8Linear(linear, "scaled_mm")(x), fp8.Float8Linear(linear, "emulated")(x)
    torch.testing.assert_close(kernel.float(), emulated.float(), rtol=1e-2, atol=1e-2)


def test_quantize_maps_the_largest_value_to_the_format_maximum():
    x = torch.tensor([[-3.0, 0.5, 1.5, 0.0]])
    q, scale = fp8.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.item() == pytest.approx(3.0 / 448)
    assert q.float().abs().max().item() == 448
    torch.testing.assert_close(q.float() * scale, x, rtol=2**-4, atol=0)


def test_a_float8_layer_cast_by_a_later_to_dtype_refuses_to_run():
    layer = fp8.Float8Linear(nn.Linear(32, 32), "emulated")
    layer.to(torch.float16)  # nn.Module.to casts every floating buffer, float8 ones too
    with pytest.raises(RuntimeError, match="cast to torch.float16"):
        layer(torch.randn(4, 32, dtype=torch.float16))


def test_fp8_on_a_device_without_fp8_is_a_typed_error_before_any_weights_load(tmp_path):
    missing = tmp_path / "no-weights"  # nothing is read: the check comes first
    with pytest.raises(fp8.FP8Unavailable, match="compute capability >= 8.9"):
        IdentityDenoiser(missing / "sdxl", missing / "cn", missing / "ip.bin", PipelineSettings(fp8=True))
    assert issubclass(fp8.FP8Unavailable, ValueError)
    with pytest.raises(ValueError, match="fp8_backend must be one of"):
        fp8.resolve_backend(torch.device("cpu"), "fast")


def test_switches_that_cannot_combine_are_refused_at_construction():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="fp8 cannot be combined with LoRAs"):
        AccelSettings(fp8=True, fp8_backend="emulated").check(cpu, lora=True)
    with pytest.raises(ValueError, match="exclude each other"):
        AccelSettings(compile=True, compile_regional=True).check(cpu, lora=False)
    AccelSettings(fp8=True, fp8_backend="scaled_mm").check(cpu, lora=False)  # the kernel exists on this CPU build


def test_pipeline_settings_carry_fp8_and_regional_compile_to_thetiny_denoiser():
    settings = PipelineSettings(fp8=True, compile_regional=True, inductor_tuning=True)
    accel = AccelSettings.from_settings(settings)
    assert (accel.fp8, accel.compile_regional, accel.inductor_tuning, accel.compile) == (True, True, True, False)
    assert accel.any_compile and accel.fp8_backend == "auto"
    assert AccelSettings.from_settings(PipelineSettings()) == AccelSettings()


def test_fp8_layers_replace_only_transformer_block_linears_and_keep_the_images_close(tiny_root, prompt_encoder):
    denoiser = tiny_denoiser(tiny_root)
    requests = _requests(prompt_encoder)
    before = denoiser(requests, KEY)[0]
    embedding_linear = denoiser.unet.time_embedding.linear_1
    switches = acc.apply_model_switches(denoiser.unet, denoiser.identitynet,
                                        AccelSettings(fp8=True, fp8_backend="scaled_mm"), denoiser.device)
    for model in (denoiser.unet, denoiser.identitynet):
        blocks = [m for m in model.modules() if type(m).__name__ == "Transformer2DModel"]
        assert blocks and not [m for b in blocks for m in b.modules() if fp8.eligible(m)]  # none left behind
    converted = [m for m in denoiser.unet.modules() if isinstance(m, fp8.Float8Linear)]
    assert switches["fp8_linears"] == len(converted) + sum(
        isinstance(m, fp8.Float8Linear) for m in denoiser.identitynet.modules())
    face = [p for p in denoiser.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert face and all(isinstance(p.to_k_ip, fp8.Float8Linear) for p in face)  # the adapter's face k/v too
    assert denoiser.unet.time_embedding.linear_1 is embedding_linear  # outside the blocks: untouched
    after = denoiser(requests, KEY)[0]
    assert after.shape == before.shape and np.isfinite(after).all()
    diff = np.abs(after.astype(int) - before.astype(int))
    assert 0 < diff.max() and diff.mean() < 8  # changed by FP8 rounding, not another image
    again = acc.apply_model_switches(denoiser.unet, denoiser.identitynet, AccelSettings(fp8=True), denoiser.device)
    assert again == {"fp8_linears": 0, "compiled_blocks": 0}  # once per model


def test_regional_compile_traces_every_block_whole_and_keeps_the_images(tiny_root, prompt_encoder):
    denoiser = tiny_denoiser(tiny_root)
    requests = _requests(prompt_encoder)
    before = denoiser(requests, KEY)[0]
    # backend "eager": dynamo traces each block (fullgraph: a graph break raises) and runs the graph as traced.
    accel = AccelSettings(compile_regional=True, compile_backend="eager")
    switches = acc.apply_model_switches(denoiser.unet, denoiser.identitynet, accel, denoiser.device)
    blocks = [m for model in (denoiser.unet, denoiser.identitynet) for m in model.modules()
              if type(m).__name__ == "BasicTransformerBlock"]
    assert switches["compiled_blocks"] == len(blocks) > 0
    assert all(block._compiled_call_impl is not None for block in blocks)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    after = denoiser(requests, KEY)[0]
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    assert np.abs(after.astype(int) - before.astype(int)).max() <= 1


def test_the_product_denoiser_applies_fp8_from_its_settings(tiny_root):
    denoiser = tiny_denoiser(tiny_root, fp8=True, fp8_backend="emulated")
    assert any(isinstance(m, fp8.Float8Linear) for m in denoiser.unet.modules())
