"""The tiny preset is written in the published layouts and loads through the published loaders."""

from __future__ import annotations

import json

import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline

from instantid_core.tiny.models import CROSS_ATTENTION_DIM, write_tiny_preset

SDXL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def test_sdxl_folder_has_the_published_layout_and_loads_with_from_pretrained(tiny_root):
    sdxl = tiny_root / "sdxl"
    index = json.loads((sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert all(part in index for part in SDXL_PARTS)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (sdxl / tokenizer).iterdir()}
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == CROSS_ATTENTION_DIM
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8  # SDXL's VAE downsampling kept


def test_identitynet_is_a_controlnet_made_from_the_unet(tiny_root):
    identitynet = ControlNetModel.from_pretrained(tiny_root / "InstantID" / "ControlNetModel")
    unet_config = json.loads((tiny_root / "sdxl" / "unet" / "config.json").read_text())
    assert list(identitynet.config.block_out_channels) == unet_config["block_out_channels"]
    assert identitynet.config.addition_embed_type == "text_time"


def test_ip_adapter_bin_has_the_published_top_level_keys(tiny_root):
    state = torch.load(tiny_root / "InstantID" / "ip-adapter.bin", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert state["image_proj"]["latents"].shape[1] == 16
    assert state["image_proj"]["proj_in.weight"].shape[1] == 512
    assert state["image_proj"]["proj_out.weight"].shape[0] == CROSS_ATTENTION_DIM
    assert all(key.split(".")[1] in {"to_k_ip", "to_v_ip"} for key in state["ip_adapter"])


def test_tiny_preset_is_small_and_deterministic(tmp_path):
    first, second = write_tiny_preset(tmp_path / "a"), write_tiny_preset(tmp_path / "b")
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    assert size < 50 * 2**20
    for name in ("sdxl/unet/diffusion_pytorch_model.safetensors", "InstantID/ControlNetModel/config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
