"""Extra tiny models the tests write next to the tiny preset."""

from __future__ import annotations

from pathlib import Path


def write_tiny_lcm_lora(tiny_root: Path, folder: Path) -> None:
    """A random (non-zero) LoRA on the tiny UNet's attention projections, saved as diffusers saves LoRAs (what an
    LCM-LoRA folder holds)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_root / "sdxl" / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=layers)


def tiny_denoiser(root: Path, settings=None, **accel):
    """An IdentityDenoiser on the tiny preset at `root` with `settings` (default PipelineSettings()) and speed
    switches `accel` over the ones the settings carry."""
    from instantid_core.accel import AccelSettings
    from instantid_core.config import PipelineSettings
    from instantid_core.denoise import IdentityDenoiser

    settings = settings or PipelineSettings()
    return IdentityDenoiser(root / "sdxl", root / "InstantID" / "ControlNetModel",
                            root / "InstantID" / "ip-adapter.bin", settings,
                            accel=AccelSettings.from_settings(settings, **accel))
