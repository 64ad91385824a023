"""Region control (enhance face region) as the official demo does it: the face-box mask on IdentityNet's residuals
(bilinear) and on the face tokens' attention output in every cross-attention layer (nearest), per sample.

The parity test rebuilds the demo's `_full` pipeline independently: diffusers' own SDXL ControlNet pipeline (the
one the demo forked) plus the demo's two changes written here from its description (IdentityNet sees only the
face tokens and its residuals are multiplied by the resized `control_mask`; a cross-attention processor with a
fixed scale that multiplies the face attention by the mask read from a holder, the way the demo's global does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from torch import nn

from instantid_core.adapter import NUM_FACE_TOKENS, load_adapter_state
from instantid_core.config import Scheduler
from instantid_core.denoise import BatchKey, DenoiseRequest
from instantid_core.regions import attention_masks, face_box_mask, latent_levels
from testkit.attention import face_attention_layer

WIDTH, HEIGHT = 128, 96
BOX = (20.7, 10.2, 90.9, 80.6)  # fractional corners: int() truncation decides the edge pixels


def _demo_mask(box, size) -> np.ndarray:
    """The demo's control_mask: a (H, W, 3) uint8 image, 255 inside the int()-truncated box."""
    height, width = size
    mask = np.zeros([height, width, 3])
    x1, y1, x2, y2 = (int(v) for v in box)
    mask[y1:y2, x1:x2] = 255
    return mask.astype(np.uint8)


def test_face_box_mask_truncates_corners_like_the_demo():
    ours = face_box_mask(BOX, (HEIGHT, WIDTH))[0].numpy()
    assert np.array_equal(ours, _demo_mask(BOX, (HEIGHT, WIDTH))[:, :, 0] / 255.0)
    assert ours[10, 20] == 1 and ours[79, 89] == 1 and ours[80, 90] == 0 and ours[9, 20] == 0
    assert torch.equal(face_box_mask(None, (4, 6)), torch.ones(1, 4, 6))


def test_masked_face_attention_matches_an_independent_computation():
    # One layer at 1/16 of an image of HEIGHT x WIDTH; three samples: two boxes and no box.
    layer = face_attention_layer()
    attention, processor, attend = layer.attention, layer.processor, layer.plain
    h, w = HEIGHT // 16, WIDTH // 16
    hidden = torch.randn(3, h * w, layer.query_dim)
    text, face = torch.randn(3, 7, layer.cross_dim), torch.randn(3, NUM_FACE_TOKENS, layer.cross_dim)
    boxes = [BOX, (0.0, 0.0, 40.0, 33.0), None]
    scales = torch.tensor([0.8, 1.2, 0.5])
    masks = torch.stack([face_box_mask(box, (HEIGHT, WIDTH)) for box in boxes])
    ours = processor(attention, hidden, torch.cat([text, face], dim=1), ip_adapter_scale=scales,
                     face_region=attention_masks(masks, [(h, w)]))

    query = attention.to_q(hidden)
    text_out = attend(query, attention.to_k(text), attention.to_v(text))
    face_out = attend(query, processor.to_k_ip(face), processor.to_v_ip(face))
    for i, box in enumerate(boxes):
        full = np.ones((HEIGHT, WIDTH)) if box is None else _demo_mask(box, (HEIGHT, WIDTH))[:, :, 0] / 255.0
        mask = torch.from_numpy(full[::16, ::16].reshape(-1, 1)).float()  # nearest: every 16th pixel, row-major
        expected = attention.to_out[0](text_out[i] + scales[i] * face_out[i] * mask)
        torch.testing.assert_close(ours[i], expected, rtol=1e-5, atol=1e-5)
    # the mask really bites: outside the box the face contributes nothing
    unmasked = processor(attention, hidden, torch.cat([text, face], dim=1), ip_adapter_scale=scales)
    assert (ours[0] - unmasked[0]).abs().max() > 1e-3


def test_every_cross_attention_resolution_gets_a_mask():
    # 200 px is a multiple of 8 but not of 16: the levels follow the UNet's stride-2 convs (ceil), not h // 2.
    assert latent_levels(200, 136, 8, 3) == [(25, 17), (13, 9), (7, 5)]
    masks = attention_masks(torch.ones(2, 1, 200, 136), latent_levels(200, 136, 8, 3))
    assert {n: m.shape for n, m in masks.items()} == {425: (2, 425, 1), 117: (2, 117, 1), 35: (2, 35, 1)}


# --- the demo's _full pipeline, rebuilt --------------------------------------------------------------------------
class _RegionHolder:
    """Where the demo keeps its region mask: one object every processor reads (fine for a one-image reference)."""

    mask: torch.Tensor | None = None


class _DemoFaceAttention(nn.Module):
    """The demo's decoupled cross-attention: face tokens attended separately, the result multiplied by the region
    mask resized nearest by the ratio of image pixels to this layer's tokens, added with a fixed scale."""

    def __init__(self, hidden_size, cross_dim, scale, holder):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, hidden_size, bias=False)
        self.scale, self.holder = scale, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        batch = hidden_states.shape[0]
        text, face = encoder_hidden_states[:, :-NUM_FACE_TOKENS], encoder_hidden_states[:, -NUM_FACE_TOKENS:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        query, key, value = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        head_dim = key.shape[-1] // attn.heads

        def heads(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        def merge(x):
            return x.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        out = merge(F.scaled_dot_product_attention(heads(query), heads(key), heads(value)))
        face_out = merge(F.scaled_dot_product_attention(heads(query), heads(self.to_k_ip(face)),
                                                        heads(self.to_v_ip(face))))
        if self.holder.mask is not None:
            h, w = self.holder.mask.shape
            ratio = (h * w / query.shape[1]) ** 0.5
            mask = F.interpolate(self.holder.mask[None, None], scale_factor=1 / ratio, mode="nearest")
            face_out = face_out * mask.reshape(1, -1, 1)
        out = attn.to_out[1](attn.to_out[0](out + self.scale * face_out))
        return out / attn.rescale_output_factor


class _DemoSelfAttention(nn.Module):
    """Self-attention as diffusers' SDPA processor computes it, as a Module (no weights) like the demo's."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class _DemoIdentityNet(ControlNetModel):
    """IdentityNet as the demo's pipeline calls it: the face tokens (the last 16 of what the pipeline passes) as
    its text, residuals times the control mask resized bilinearly to (h // scale, w // scale)."""

    control_mask: torch.Tensor | None = None  # (1, 1, H, W)

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, **kwargs):
        down, mid = super().forward(sample, timestep, encoder_hidden_states[:, -NUM_FACE_TOKENS:],
                                    controlnet_cond, conditioning_scale, **kwargs)
        if self.control_mask is not None:
            height, width = self.control_mask.shape[-2:]

            def resized(residual):
                scale = height // residual.shape[-2]
                return F.interpolate(self.control_mask, (height // scale, width // scale), mode="bilinear")

            down = [residual * resized(residual) for residual in down]
            mid = mid * resized(mid)
        return down, mid


@pytest.fixture(scope="module")
def demo_pipeline(tiny_root):
    identitynet = _DemoIdentityNet.from_pretrained(tiny_root / "InstantID" / "ControlNetModel")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_root / "sdxl", controlnet=identitynet)
    pipe.set_progress_bar_config(disable=True)
    holder = _RegionHolder()
    processors = {}
    for name in pipe.unet.attn_processors:
        if name.endswith("attn1.processor"):
            processors[name] = _DemoSelfAttention()
        else:
            layer = pipe.unet.get_submodule(name.removesuffix(".processor"))
            processors[name] = _DemoFaceAttention(layer.to_k.out_features, layer.to_k.in_features, 0.8, holder)
    pipe.unet.set_attn_processor(processors)
    # The demo's loading: every processor in order in a ModuleList, the published state dict loaded into it.
    nn.ModuleList(pipe.unet.attn_processors.values()).load_state_dict(
        load_adapter_state(tiny_root / "InstantID" / "ip-adapter.bin")["ip_adapter"])
    return pipe, holder


def _kps_image() -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[30:40, 40:50] = (255, 0, 0)
    image[30:40, 70:80] = (0, 255, 0)
    return image


@pytest.mark.parametrize("box", [BOX, None], ids=["enhance_face_region", "whole_image"])
def test_image_equals_the_demos_full_pipeline_with_its_control_mask(denoiser, prompt_encoder, demo_pipeline, box):
    pipe, holder = demo_pipeline
    embedding = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    prompt = prompt_encoder.encode("a portrait of a man", "blurry")
    request = DenoiseRequest(prompt=prompt, face_embedding=embedding, kps_image=_kps_image(), seed=5, guidance=5.0,
                             identitynet_strength=0.8, adapter_strength=0.8, face_box=box)
    key = BatchKey(WIDTH, HEIGHT, 4, Scheduler.euler)
    ours = denoiser([request], key)[0][0]

    with torch.inference_mode():
        face = torch.from_numpy(embedding).reshape(1, 1, 512)
        tokens = denoiser.resampler(torch.cat([torch.zeros_like(face), face]))  # the demo's CFG face embeds

        def tensor(array):
            return torch.from_numpy(array)[None]

        if box is None:
            pipe.controlnet.control_mask, holder.mask = None, None
        else:
            mask = torch.from_numpy(_demo_mask(box, (HEIGHT, WIDTH))).float()[:, :, 0] / 255.0
            pipe.controlnet.control_mask, holder.mask = mask[None, None], mask
        pipe.scheduler = denoiser.make_scheduler(Scheduler.euler)
        reference = pipe(
            prompt_embeds=torch.cat([tensor(prompt.prompt_embeds), tokens[1:]], dim=1),
            negative_prompt_embeds=torch.cat([tensor(prompt.negative_prompt_embeds), tokens[:1]], dim=1),
            pooled_prompt_embeds=tensor(prompt.pooled), negative_pooled_prompt_embeds=tensor(prompt.negative_pooled),
            image=Image.fromarray(_kps_image()), controlnet_conditioning_scale=0.8, width=WIDTH, height=HEIGHT,
            num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="np",
        ).images[0]
    reference = (reference * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - reference.astype(int)).max() <= 1  # float32 rounding
    if box is not None:  # and the region control changed the image
        whole = denoiser([DenoiseRequest(**{**request.__dict__, "face_box": None})], key)[0][0]
        assert np.abs(whole.astype(int) - ours.astype(int)).mean() > 0.5
