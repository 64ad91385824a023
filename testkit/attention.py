"""One small cross-attention layer with the face-token processor, and attention computed the plain way: for tests
that hold the processor to an independent computation (tests/unit/test_regions.py, tests/unit/test_identities.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from instantid_core.adapter import IdentityAttnProcessor


@dataclass(frozen=True)
class FaceAttentionLayer:
    attention: Attention
    processor: IdentityAttnProcessor
    heads: int
    dim_head: int
    query_dim: int
    cross_dim: int

    def plain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per head: softmax(q k^T / sqrt(d)) v, for (B, N, heads * d) inputs."""
        q, k, v = (x.view(x.shape[0], -1, self.heads, self.dim_head).transpose(1, 2) for x in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / self.dim_head ** 0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(q.shape[0], -1, self.heads * self.dim_head)


def face_attention_layer(seed: int = 0) -> FaceAttentionLayer:
    """A seeded layer whose face-token projections are random (an untrained adapter's are not zero either)."""
    torch.manual_seed(seed)
    heads, dim_head, query_dim, cross_dim = 2, 16, 32, 24
    attention = Attention(query_dim=query_dim, cross_attention_dim=cross_dim, heads=heads, dim_head=dim_head).eval()
    processor = IdentityAttnProcessor(hidden_size=query_dim, cross_attention_dim=cross_dim)
    nn.init.normal_(processor.to_k_ip.weight)
    nn.init.normal_(processor.to_v_ip.weight)
    return FaceAttentionLayer(attention, processor, heads, dim_head, query_dim, cross_dim)
