"""The IP-Adapter half of InstantID: the Resampler (face embedding -> 16 tokens) and the decoupled
cross-attention processors (`out = attn(text) + scale * mask * attn(face tokens)`; the face-box mask is
`regions`' region control).

The Resampler is diffusers' own `IPAdapterPlusImageProjection`, built by diffusers' converter from the published
`image_proj` weights. What diffusers lacks is a per-sample scale: its processors keep `.scale` on the module, so a
shared pipeline cannot serve concurrent requests with different strengths. Ours hold weights only and take the scale
as a `(batch,)` tensor through `cross_attention_kwargs`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn

from .errors import WeightsError
from .regions import AttentionMasks

NUM_FACE_TOKENS = 16
# A further identity's face tokens (B, 16, C), its per-sample strength (B,) and its region masks (issue 23).
OtherFaces = tuple[torch.Tensor, torch.Tensor, AttentionMasks]
ADAPTER_KEYS = ("image_proj", "ip_adapter")


def load_adapter_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read the published `ip-adapter.bin` (a torch file with `image_proj` and `ip_adapter`)."""
    try:
        # mmap: tensors are paged in as the Resampler and the K/V projections copy them, so the file is read once
        # and never held whole beside them (legacy non-zip pickles cannot be mmapped).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises many types for a corrupt file; the caller needs the file name
        raise WeightsError(f"adapter: cannot read {path}: {exc}") from exc
    missing = [key for key in ADAPTER_KEYS if key not in state]
    if missing:
        raise WeightsError(f"adapter: {path} has no {', '.join(missing)} key (found {sorted(state)})")
    return state


def build_resampler(unet: UNet2DConditionModel, image_proj: dict[str, torch.Tensor]) -> IPAdapterPlusImageProjection:
    """The Resampler, with dims inferred from the weights by diffusers' own converter."""
    # low_cpu_mem_usage=False: load_state_dict(strict=True), so a missing or extra key is an error, not a silent skip.
    return unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)


_FUSED = FusedAttnProcessor2_0()


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor that accepts (and ignores) the per-sample adapter scale, so self-attention
    layers receive the same `cross_attention_kwargs` without a warning per call. After `accel.fuse_qkv` it runs
    diffusers' fused-projection variant (one q/k/v GEMM)."""

    reads_fused_projections = True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_adapter_scale: torch.Tensor | None = None, face_region: AttentionMasks | None = None,
                 other_faces: list[OtherFaces] | None = None) -> torch.Tensor:
        if attn.fused_projections:
            return _FUSED(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IdentityAttnProcessor(nn.Module):
    """Decoupled cross-attention: the last NUM_FACE_TOKENS of `encoder_hidden_states` are face tokens, attended
    with their own `to_k_ip`/`to_v_ip` and added with a per-sample scale before the output projection."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int = NUM_FACE_TOKENS) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_kv_ip: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """One GEMM for the face keys and values; to_k_ip/to_v_ip become views into it (see accel.fuse_qkv)."""
        from .accel import fuse_linears

        self.to_kv_ip = fuse_linears([self.to_k_ip, self.to_v_ip])

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 ip_adapter_scale: torch.Tensor | None = None, face_region: AttentionMasks | None = None,
                 other_faces: list[OtherFaces] | None = None) -> torch.Tensor:
        """`ip_adapter_scale`: (B,) strength of the face tokens per sample; `face_region`: per-sample face-box
        masks by token count (see `regions.attention_masks`), multiplied into the face tokens' attention output
        at this layer's resolution; None leaves it unmasked. `other_faces`: further identities, each added the
        same way with its own tokens, strength and region: `sum_k scale_k * mask_k * attn(face_tokens_k)`."""
        # Same operations, in the same order, as AttnProcessor2_0 for the text part: at scale 0 the output is
        # bit-identical to plain SDXL attention.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        text_states = encoder_hidden_states[:, : -self.num_tokens]  # (B, 77, C)
        face_states = encoder_hidden_states[:, -self.num_tokens:]  # (B, 16, C)
        batch_size, sequence_length, _ = text_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        if attn.fused_projections:
            key, value = attn.to_kv(text_states).chunk(2, dim=-1)
        else:
            key = attn.to_k(text_states)
            value = attn.to_v(text_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if ip_adapter_scale is not None:
            hidden_states = hidden_states + self.face_attention(attn, query, face_states, ip_adapter_scale,
                                                                face_region)
        for tokens, scale, region in other_faces or ():  # issue 23: identities 2..K, each in its own region
            hidden_states = hidden_states + self.face_attention(attn, query, tokens, scale, region)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def face_attention(self, attn: Attention, query: torch.Tensor, face_states: torch.Tensor, scale: torch.Tensor,
                       region: AttentionMasks | None) -> torch.Tensor:
        """`scale * mask * attn(face tokens)`: (B, N, C) for query (B, heads, N, d), face_states (B, 16, C)."""
        batch_size, heads, _, head_dim = query.shape
        if self.to_kv_ip is not None:
            face_key, face_value = self.to_kv_ip(face_states).chunk(2, dim=-1)
        else:
            face_key, face_value = self.to_k_ip(face_states), self.to_v_ip(face_states)
        face_key = face_key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, heads, 16, d)
        face_value = face_value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        face_hidden = F.scaled_dot_product_attention(query, face_key, face_value, dropout_p=0.0, is_causal=False)
        face_hidden = face_hidden.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        face_hidden = face_hidden.to(query.dtype)
        if region is not None:
            face_hidden = face_hidden * region[face_hidden.shape[1]]  # (B, N, C) * (B, N, 1)
        return scale.to(face_hidden.dtype).view(batch_size, 1, 1) * face_hidden  # one strength per sample


def install_identity_adapter(unet: UNet2DConditionModel, ip_adapter: dict[str, torch.Tensor]) -> None:
    """Give every cross-attention layer an IdentityAttnProcessor loaded from the published `ip_adapter` weights.

    Keys are `{position}.to_k_ip.weight` with `position` the processor's index in `unet.attn_processors`, the
    order the reference training code enumerated them in. Done once at load time.
    """
    processors: dict[str, nn.Module | AttnProcessor2_0] = {}
    loaded = set()
    for position, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            processors[name] = SelfAttnProcessor()
            continue
        attention: Attention = unet.get_submodule(name.removesuffix(".processor"))
        processor = IdentityAttnProcessor(attention.to_k.out_features, attention.to_k.in_features)
        weights = {key: ip_adapter.get(f"{position}.{key}.weight") for key in ("to_k_ip", "to_v_ip")}
        if any(value is None for value in weights.values()):
            raise WeightsError(f"adapter: ip_adapter has no {position}.to_k_ip/to_v_ip weights for {name}")
        processor.load_state_dict({f"{key}.weight": value for key, value in weights.items()})
        loaded.update(f"{position}.{key}.weight" for key in weights)
        processors[name] = processor.to(device=unet.device, dtype=unet.dtype)
    extra = set(ip_adapter) - loaded
    if extra:
        raise WeightsError(f"adapter: ip_adapter weights do not match this UNet (unused: {sorted(extra)[:4]})")
    unet.set_attn_processor(processors)
