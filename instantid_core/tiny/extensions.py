"""Tiny preset members for the extensions: a style LoRA (diffusers and kohya files), extra ControlNets (canny,
depth, pose) and a depth estimator, each random and tiny but in its published on-disk layout.

- `loras/tiny-style.safetensors`: diffusers/peft keys (`unet.<module>.lora_A.weight`), as `save_lora_weights`
  writes them; `loras/tiny-style-kohya.safetensors`: the same weights under kohya/sd-scripts SDXL names
  (`lora_unet_input_blocks_4_1_..._to_q.lora_down.weight` + `.alpha`), so both key formats load through diffusers.
- `controlnets/{canny,depth,pose}/`: `ControlNetModel.from_unet` folders, as diffusers/controlnet-*-sdxl-1.0 are.
- `depth-estimator/`: a Depth Anything model (`DepthAnythingForDepthEstimation` + `DPTImageProcessor` config), as
  LiheYoung/depth-anything-small-hf is laid out, for transformers' `depth-estimation` pipeline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from ..config import CONTROLNETS_DIR, DEPTH_ESTIMATOR_DIR, LORAS_DIR

TINY_STYLE = "tiny-style"
TINY_STYLE_KOHYA = "tiny-style-kohya"
CONTROL_TYPES = ("canny", "depth", "pose")  # all written; ModelSources.from_root registers canny and depth
LORA_RANK = 4
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections, as most style LoRAs train


def write_tiny_extensions(root: Path, unet: UNet2DConditionModel, *, seed: int = 0) -> None:
    """Write the LoRA files, the three ControlNets and the depth estimator under `root`."""
    write_tiny_lora(root / LORAS_DIR, unet, seed=seed + 10)
    for offset, name in enumerate(CONTROL_TYPES):
        write_tiny_controlnet(root / CONTROLNETS_DIR / name, unet, seed=seed + 20 + offset)
    write_tiny_depth_estimator(root / DEPTH_ESTIMATOR_DIR, seed=seed + 30)


def tiny_lora_state(unet: UNet2DConditionModel, *, seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA weights for `unet` under diffusers/peft names (`<module>.lora_A.weight`, no prefix)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(name.endswith(f".{t}") for t in LORA_TARGETS):
            continue
        if ".attn1." not in name and ".attn2." not in name:
            continue
        # lora_B is random too (peft zero-initialises it): a fresh LoRA would change nothing.
        state[f"{name}.lora_A.weight"] = torch.randn(LORA_RANK, module.in_features, generator=generator) * 0.3
        state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, LORA_RANK, generator=generator) * 0.3
    return state


def write_tiny_lora(folder: Path, unet: UNet2DConditionModel, *, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_lora_state(unet, seed=seed)
    # diffusers' own writer: the `unet.` prefix and file layout every diffusers-trained LoRA has.
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                                weight_name=f"{TINY_STYLE}.safetensors")
    save_file(kohya_state(state, unet), str(folder / f"{TINY_STYLE_KOHYA}.safetensors"))


def kohya_state(state: dict[str, torch.Tensor], unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The same LoRA under kohya/sd-scripts SDXL names: SGM block names (`input_blocks.N.1`), underscores,
    `lora_down`/`lora_up` and an `alpha` per module (alpha = rank: scale 1, as the diffusers file has)."""
    out = {}
    for key, tensor in state.items():
        module, _, kind = key.rpartition(".lora_")
        sgm = _sgm_name(module, unet.config.layers_per_block)
        stem = "lora_unet_" + sgm.replace(".", "_")
        out[f"{stem}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(LORA_RANK))
    return out


def _sgm_name(module: str, layers_per_block: int) -> str:
    """diffusers UNet module name -> the original (SGM) name, for attention modules (`attentions.J` = index 1)."""
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if match:
        kind, level, layer, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if kind == "down_blocks":
            return f"input_blocks.{1 + level * (layers_per_block + 1) + layer}.1.{rest}"
        return f"output_blocks.{level * (layers_per_block + 1) + layer}.1.{rest}"
    match = re.match(r"mid_block\.attentions\.0\.(.*)", module)
    if match:
        return f"middle_block.1.{match.group(1)}"
    raise ValueError(f"no SGM name for {module}")


def write_tiny_controlnet(folder: Path, unet: UNet2DConditionModel, *, seed: int) -> None:
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    # As for IdentityNet: from_unet zero-initialises the output convs; a trained ControlNet's are not.
    # Its conditioning embedding is made strong, so the map's content (not only its presence) shows in the image.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
        for conv in controlnet.controlnet_cond_embedding.modules():
            if isinstance(conv, torch.nn.Conv2d):  # He-initialised, no bias: the output follows the map
                conv.weight.normal_(0.0, (2.0 / conv.weight[0].numel()) ** 0.5)
                conv.bias.zero_()
        controlnet.controlnet_cond_embedding.conv_out.weight.mul_(10.0)  # an embedding of the map's size ~1
    controlnet.save_pretrained(folder)


def write_tiny_depth_estimator(folder: Path, *, seed: int) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, patch_size=14,
                                 neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16, head_hidden_size=8)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    # Depth Anything's published preprocessor_config.json, at a small input size (56 = 4 patches of 14). Written
    # as JSON: transformers' DPTImageProcessor class needs torchvision, its loader falls back to the PIL one.
    processor = {
        "image_processor_type": "DPTImageProcessor", "do_resize": True, "size": {"height": 56, "width": 56},
        "keep_aspect_ratio": True, "ensure_multiple_of": 14, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_pad": False,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
