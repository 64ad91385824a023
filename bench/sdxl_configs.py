"""Published architecture configs (public numbers, no weights) for full-size models built without downloads.

SDXL base 1.0 (`stabilityai/stable-diffusion-xl-base-1.0`: unet/, vae/, text_encoder/, text_encoder_2/, scheduler/)
and InstantID (`InstantX/InstantID`: ControlNetModel/ = `ControlNetModel.from_unet(unet)` with the default
conditioning embedding, ip-adapter.bin = Resampler + per-layer `to_k_ip`/`to_v_ip`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from instantid_core.tiny.models import SDXL_SCHEDULER_CONFIG

UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    upcast_attention=None, resnet_time_scale_shift="default", addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, conv_in_kernel=3, conv_out_kernel=3,
)

VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)

# CLIP ViT-L/14 text tower (penultimate layer feeds the UNet: 768 of its 2048 context channels).
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

# OpenCLIP ViT-bigG/14 text tower with projection (1280 context channels + the 1280-d pooled embedding).
TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)

SCHEDULER = dict(SDXL_SCHEDULER_CONFIG)

# InstantID's Resampler (ip-adapter.bin `image_proj`): published dims.
RESAMPLER = dict(dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=2048,
                 ff_mult=4)

# Parameter counts of the published checkpoints, to check the configs above build the same architecture.
PUBLISHED_PARAMS = dict(unet=2_567_463_684, vae=83_653_863, text_encoder=123_060_480, text_encoder_2=694_659_840,
                        identitynet=1_251_014_160)


@dataclass(frozen=True)
class Architecture:
    """Configs of every model the benchmark writes; `PUBLISHED` is SDXL + InstantID, `SHRUNK` keeps every depth
    (10-layer transformers, 70 decoupled-attention layers, 4 VAE levels, 4 Resampler blocks) at tiny widths, so the
    writer and the published layout can be checked on a CPU in seconds."""

    unet: dict
    vae: dict
    text_encoder: dict
    text_encoder_2: dict
    resampler: dict


PUBLISHED = Architecture(UNET, VAE, TEXT_ENCODER, TEXT_ENCODER_2, RESAMPLER)
SHRUNK = Architecture(
    unet=UNET | dict(block_out_channels=(40, 80, 160), norm_num_groups=8, cross_attention_dim=96,
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 64),
    vae=VAE | dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=8),
    text_encoder=TEXT_ENCODER | dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     projection_dim=32),
    text_encoder_2=TEXT_ENCODER_2 | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, projection_dim=64),
    resampler=RESAMPLER | dict(dim=64, heads=1, output_dim=96),
)


def build_unet(arch: Architecture = PUBLISHED) -> UNet2DConditionModel:
    return UNet2DConditionModel(**arch.unet)


def build_identitynet(unet: UNet2DConditionModel) -> ControlNetModel:
    return ControlNetModel.from_unet(unet)  # default conditioning embedding (16, 32, 96, 256), as published


def build_vae(arch: Architecture = PUBLISHED) -> AutoencoderKL:
    return AutoencoderKL(**arch.vae)


def build_text_encoders(arch: Architecture = PUBLISHED) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    return (CLIPTextModel(CLIPTextConfig(**arch.text_encoder)),
            CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2)))


def resampler_state_dict(generator: torch.Generator | None, device: torch.device | str = "cpu",
                         arch: Architecture = PUBLISHED) -> dict[str, torch.Tensor]:
    """Random Resampler weights under the published `image_proj` key names (diffusers' converter infers the dims
    back from the shapes: heads = to_q rows // 64)."""
    dims = arch.resampler
    dim, out, ff = dims["dim"], dims["output_dim"], dims["ff_mult"] * dims["dim"]
    inner = dims["heads"] * dims["dim_head"]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device) / shape[-1] ** 0.5

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device)

    state = {
        "latents": rand(1, dims["num_queries"], dim),
        "proj_in.weight": rand(dim, dims["embedding_dim"]), "proj_in.bias": zeros(dim),
        "proj_out.weight": rand(out, dim), "proj_out.bias": zeros(out),
        "norm_out.weight": ones(out), "norm_out.bias": zeros(out),
    }
    for i in range(dims["depth"]):
        attn, mlp = f"layers.{i}.0", f"layers.{i}.1"
        state.update({
            f"{attn}.norm1.weight": ones(dim), f"{attn}.norm1.bias": zeros(dim),
            f"{attn}.norm2.weight": ones(dim), f"{attn}.norm2.bias": zeros(dim),
            f"{attn}.to_q.weight": rand(inner, dim), f"{attn}.to_kv.weight": rand(2 * inner, dim),
            f"{attn}.to_out.weight": rand(dim, inner),
            f"{mlp}.0.weight": ones(dim), f"{mlp}.0.bias": zeros(dim),
            f"{mlp}.1.weight": rand(ff, dim), f"{mlp}.3.weight": rand(dim, ff),
        })
    return state


def ip_adapter_state_dict(unet: UNet2DConditionModel, generator: torch.Generator | None,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random `to_k_ip`/`to_v_ip` for every cross-attention processor, keyed by its position in
    `unet.attn_processors` (the published ip-adapter.bin layout: odd positions, 1..139 for SDXL)."""
    state = {}
    for position, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        rows, cols = attention.to_k.out_features, attention.to_k.in_features
        for key in ("to_k_ip", "to_v_ip"):
            state[f"{position}.{key}.weight"] = torch.randn(rows, cols, generator=generator, device=device) / cols**0.5
    return state
