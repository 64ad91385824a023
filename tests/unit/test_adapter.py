"""Decoupled cross-attention with per-sample scales, and the published adapter weights loading exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from instantid_core.adapter import (
    NUM_FACE_TOKENS,
    IdentityAttnProcessor,
    build_resampler,
    install_identity_adapter,
    load_adapter_state,
)
from instantid_core.errors import WeightsError


def _attention_and_inputs(batch: int = 3):
    torch.manual_seed(0)
    attention = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    processor = IdentityAttnProcessor(hidden_size=32, cross_attention_dim=24)
    torch.nn.init.normal_(processor.to_k_ip.weight)
    torch.nn.init.normal_(processor.to_v_ip.weight)
    hidden = torch.randn(batch, 10, 32)
    text = torch.randn(batch, 7, 24)
    face = torch.randn(batch, NUM_FACE_TOKENS, 24)
    return attention, processor, hidden, text, face


def test_adapter_scale_zero_matches_plain_attention_exactly():
    attention, processor, hidden, text, face = _attention_and_inputs()
    plain = AttnProcessor2_0()(attention, hidden, text)
    ours = processor(attention, hidden, torch.cat([text, face], dim=1), ip_adapter_scale=torch.zeros(3))
    assert torch.equal(ours, plain)


def test_adapter_scale_changes_the_output():
    attention, processor, hidden, text, face = _attention_and_inputs()
    states = torch.cat([text, face], dim=1)
    low = processor(attention, hidden, states, ip_adapter_scale=torch.full((3,), 0.1))
    high = processor(attention, hidden, states, ip_adapter_scale=torch.full((3,), 1.0))
    assert (low - high).abs().max() > 1e-3


def test_per_sample_scales_in_one_batch_equal_separate_calls():
    attention, processor, hidden, text, face = _attention_and_inputs()
    states = torch.cat([text, face], dim=1)
    scales = torch.tensor([0.0, 0.5, 1.2])
    batched = processor(attention, hidden, states, ip_adapter_scale=scales)
    for i in range(3):
        alone = processor(attention, hidden[i:i + 1], states[i:i + 1], ip_adapter_scale=scales[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_resampler_loads_every_published_weight(tiny_root):
    from diffusers import UNet2DConditionModel

    state = load_adapter_state(tiny_root / "InstantID" / "ip-adapter.bin")
    unet = UNet2DConditionModel.from_pretrained(tiny_root / "sdxl" / "unet")
    resampler = build_resampler(unet, state["image_proj"])
    assert sum(p.numel() for p in resampler.parameters()) == sum(t.numel() for t in state["image_proj"].values())
    tokens = resampler(torch.randn(2, 1, 512))
    assert tokens.shape == (2, NUM_FACE_TOKENS, unet.config.cross_attention_dim)


def test_cross_attention_layers_get_the_published_ip_weights(tiny_root):
    from diffusers import UNet2DConditionModel

    state = load_adapter_state(tiny_root / "InstantID" / "ip-adapter.bin")
    unet = UNet2DConditionModel.from_pretrained(tiny_root / "sdxl" / "unet")
    install_identity_adapter(unet, state["ip_adapter"])
    names = list(unet.attn_processors)
    for key, tensor in state["ip_adapter"].items():
        position, name = int(key.split(".")[0]), key.split(".")[1]
        processor = unet.attn_processors[names[position]]
        assert names[position].endswith("attn2.processor")
        assert torch.equal(getattr(processor, name).weight, tensor)


def test_adapter_file_without_published_keys_is_reported(tmp_path):
    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {}}, path)
    with pytest.raises(WeightsError, match="ip_adapter"):
        load_adapter_state(path)


def test_ip_weights_for_another_unet_are_rejected(tiny_root):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_root / "sdxl" / "unet")
    with pytest.raises(WeightsError, match="to_k_ip"):
        install_identity_adapter(unet, {"999.to_k_ip.weight": torch.zeros(1)})
