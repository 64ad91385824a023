"""IdentityDenoiser: SDXL UNet + IdentityNet + Resampler + VAE + scheduler, over a batch of independent requests.

One call takes requests that share size, steps, scheduler and number of identities (`BatchKey`); everything else
(prompt, seed, guidance, strengths, number of images, face-region masking) is per sample. Identities after the first
(`Conditioning.other_identities`) each get an IdentityNet pass whose residuals are masked to their region and
summed, and their own face tokens in every cross-attention layer, masked the same way (`adapter.face_attention`).
Every sample draws its noise from its own seeded generator, so a batched result equals the same requests run one
by one.

Speed switches (fused projections, channels_last, SDPA backend, torch.compile, CUDA graphs) live in `accel` and are
applied once here, at construction; with all of them off (the default) nothing in the computation changes.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import accel as acc
from . import identity, img2img
from .adapter import build_resampler, install_identity_adapter, load_adapter_state
from .config import PipelineSettings, Scheduler
from .controls import ExtraControlNets
from .denoise_types import BatchKey, Conditioning, DenoiseRequest, IdentityConditioning, StepCallback
from .errors import InvalidParameter, WeightsError
from .handoff import PromptEmbeds
from .loras import LoraLibrary, LoraSet
from .regions import attention_masks, face_box_mask, latent_levels, residual_mask
from .weight_layout import ResolvedWeights, load_variant

SCHEDULERS: dict[Scheduler, tuple[type[SchedulerMixin], dict]] = {
    Scheduler.euler: (EulerDiscreteScheduler, {}),
    Scheduler.euler_ancestral: (EulerAncestralDiscreteScheduler, {}),
    Scheduler.dpmpp_2m_karras: (DPMSolverMultistepScheduler, {"use_karras_sigmas": True,
                                                                "algorithm_type": "dpmsolver++"}),
    Scheduler.ddim: (DDIMScheduler, {}),
    Scheduler.unipc: (UniPCMultistepScheduler, {}),
    Scheduler.lcm: (LCMScheduler, {}),
}
LCM_ADAPTER = "lcm"
log = logging.getLogger(__name__)

# Scheduler attributes that hold per-sample state between steps (multistep solvers keep earlier model outputs):
# sliced with the latents when a request leaves the batch.
_SCHEDULER_SAMPLE_STATE = ("model_outputs", "last_sample", "sample", "prev_derivative")


@dataclass
class _Samples:
    """Per-sample tensors of one call: requests expanded by num_images."""

    seeds: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)  # index of the request each sample belongs to


class IdentityDenoiser:
    """The GPU stage of InstantID: PromptEmbeds + face embedding + keypoint image -> uint8 images."""

    @classmethod
    def from_weights(cls, weights: ResolvedWeights, settings: PipelineSettings, *,
                     accel: acc.AccelSettings | None = None) -> IdentityDenoiser:
        """The denoiser of a resolved weights folder (SDXL, IdentityNet, adapter and the LCM-LoRA when present)."""
        return cls(weights.sdxl, weights.identitynet, weights.adapter, settings, lcm_lora=weights.lcm_lora,
                   accel=accel, loras=weights.loras, controlnets=weights.controlnets,
                   depth_estimator=weights.depth_estimator, lora_presets=weights.lora_presets)

    def __init__(self, sdxl_dir: Path, identitynet_dir: Path, adapter_path: Path, settings: PipelineSettings,
                 lcm_lora: Path | None = None, *, accel: acc.AccelSettings | None = None,
                 loras: Mapping[str, Path] | None = None, controlnets: Mapping[str, Path] | None = None,
                 depth_estimator: Path | None = None, lora_presets: Mapping[str, dict] | None = None) -> None:
        """Load the models and apply the speed switches.

        Args:
            accel: every speed switch; default `AccelSettings.from_settings(settings)` (the switches that
                `PipelineSettings` carries). When `settings.warmup_sizes` is set, the constructor returns only
                after a warm-up call per size and batch size (compiled shapes exist before the replica is ready).
            loras: the LoRA registry (name -> .safetensors file), loaded on first use (`loras.LoraLibrary`).
            controlnets: extra ControlNets by type (canny/depth/pose -> folder), loaded here once.
            depth_estimator: the transformers depth model that turns a photo into the `depth` control's map.
        """
        self.settings = settings
        self.device = torch.device(settings.device)
        self.accel = accel if accel is not None else acc.AccelSettings.from_settings(settings)
        self.accel.check(self.device, lora=lcm_lora is not None or bool(loras))
        self.dtype = getattr(torch, settings.dtype)
        def load(cls: Any, folder: Path) -> Any:  # the fp16 files when the dtype is half and they are there
            return cls.from_pretrained(folder, torch_dtype=self.dtype, variant=load_variant(folder, settings.dtype))

        self.unet = load(UNet2DConditionModel, sdxl_dir / "unet")
        self.identitynet = load(ControlNetModel, identitynet_dir)
        self.vae = load(AutoencoderKL, sdxl_dir / "vae")
        if self.dtype == torch.float16 and self.vae.config.force_upcast:
            self.vae.to(torch.float32)  # SDXL's VAE overflows in fp16; decided once here, not per call
        adapter = load_adapter_state(adapter_path)
        self.resampler = build_resampler(self.unet, adapter["image_proj"]).to(dtype=self.dtype)
        install_identity_adapter(self.unet, adapter["ip_adapter"])
        self.lcm_enabled = lcm_lora is not None
        if lcm_lora is not None:
            load_lcm_lora(self.unet, lcm_lora)
        for module in (self.unet, self.identitynet, self.vae, self.resampler):
            module.to(self.device).eval().requires_grad_(False)
        self.loras = LoraLibrary(self.unet, loras or {}, max_loaded=settings.max_loaded_loras,
                                 resident=[LCM_ADAPTER] if self.lcm_enabled else (), presets=lora_presets)
        self.controls = ExtraControlNets(controlnets or {}, depth_estimator, device=self.device, dtype=self.dtype)
        self.apply_accel()
        self.scheduler_config = dict(EulerDiscreteScheduler.load_config(sdxl_dir / "scheduler"))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.control_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True,
                                                   do_normalize=False)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # One forward at a time: requests from concurrent callers meet in batches, not in interleaved kernels,
        # and the LCM LoRA toggle is scoped to the call that asked for it.
        self._lock = threading.Lock()
        # Inductor keeps CUDA graph trees per thread: with CUDA graphs every call runs on this one thread, whatever
        # thread the caller (e.g. asyncio.to_thread in the Serve replica) is on.
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="denoiser")
                        if self.accel.uses_cudagraphs(self.device) else None)
        self.warmup_seconds: dict[str, float] = {}
        if settings.warmup_sizes:
            self.warmup_seconds = self.warm_up(settings.warmup_sizes, settings.warmup_batch_sizes)

    def apply_accel(self) -> None:
        """The speed switches, once; with all off, `_step`/`_decode_latents` are the plain eager methods."""
        accel = self.accel
        if accel.channels_last:
            acc.to_channels_last(self.unet, self.identitynet)
        if accel.fuse_qkv:
            acc.fuse_qkv(self.unet)
            acc.fuse_qkv(self.identitynet)
        acc.apply_model_switches(self.unet, self.identitynet, accel, self.device)  # FP8 layers, regional compile
        if accel.any_compile:
            shapes = 2 * max(len(self.settings.warmup_sizes), 1) * max(len(self.settings.warmup_batch_sizes), 1)
            acc.configure_compile(accel, shapes)
        self._step = acc.compile_fn(self.predict_noise, accel) if accel.compile else self.predict_noise
        self._decode_latents = acc.compile_fn(self.decode_latents, accel) if accel.compile_vae else self.decode_latents
        self._mark_step = accel.uses_cudagraphs(self.device)
        log.info("IdentityDenoiser on %s (%s): %s", self.device, self.settings.dtype, accel.describe())

    def warm_up(self, sizes: Iterable[tuple[int, int]], batch_sizes: Iterable[int],
                steps: int = 1) -> dict[str, float]:
        """Run one short guided call per (width, height) x batch size, so every compiled shape exists before the
        replica reports ready. Returns seconds per `"{w}x{h}/b{batch}"`.

        Batch size counts images (samples), as the denoiser batches them. Only the guided path (guidance > 1) is
        warmed: a batch whose samples are all unguided compiles on first use.
        """
        config = self.unet.config
        text_dim = config.cross_attention_dim
        pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        rng = np.random.default_rng(0)
        prompt = PromptEmbeds(*(np.zeros(shape, np.float32) for shape in
                                [(77, text_dim), (77, text_dim), (pooled_dim,), (pooled_dim,)]))
        scheduler = Scheduler(self.settings.default_scheduler)
        if scheduler == Scheduler.lcm and not self.lcm_enabled:
            scheduler = Scheduler.euler
        seconds = {}
        for width, height in sizes:
            for batch in batch_sizes:
                request = DenoiseRequest(prompt=prompt, face_embedding=rng.standard_normal(512).astype(np.float32),
                                         kps_image=np.zeros((height, width, 3), np.uint8), seed=0, num_images=batch)
                started = time.perf_counter()
                self([request], BatchKey(width, height, steps, scheduler))
                seconds[f"{width}x{height}/b{batch}"] = time.perf_counter() - started
        if self.accel.any_compile and self.accel.compile_cache_dir:
            acc.save_mega_cache(Path(self.accel.compile_cache_dir).expanduser().resolve())
        log.info("warm-up done: %s", {name: round(s, 2) for name, s in seconds.items()})
        return seconds

    # --- public entry -------------------------------------------------------------------------------------------
    def __call__(self, requests: list[DenoiseRequest], key: BatchKey,
                 on_step: StepCallback | None = None) -> list[np.ndarray | None]:
        """Run a batch; returns, per request, a (num_images, H, W, 3) uint8 array.

        Args:
            on_step: called after every denoising step with (step, steps); a request it answers False for leaves
                the batch at once (its samples are no longer computed, its result is None); when no request is
                left the call stops without decoding. Progress reports and cancellation ride on it.
        """
        if self._worker is not None:
            return self._worker.submit(self._run, requests, key, on_step).result()
        return self._run(requests, key, on_step)

    @torch.inference_mode()
    def probe(self) -> None:
        """A tiny forward pass on the device (the Resampler on one zero embedding), synchronised, so a lost or
        broken device raises here: a health check, not a warm-up."""
        zero = torch.zeros(1, 1, self.resampler.proj_in.in_features, device=self.device, dtype=self.dtype)
        self.resampler(zero).float().sum().item()

    def close(self) -> None:
        """Stop the CUDA-graph worker thread, if any (the models stay loaded)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    @torch.inference_mode()
    def _run(self, requests: list[DenoiseRequest], key: BatchKey,
             on_step: StepCallback | None = None) -> list[np.ndarray | None]:
        self.check_inputs(requests, key)
        samples = self.expand_samples(requests)
        # cuDNN's autotuner is a process-wide flag: switched on for our forward only, and restored after it.
        benchmark = torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=True) \
            if self.accel.cudnn_benchmark else contextlib.nullcontext()
        with self._lock, benchmark, self.lora_scope(key.scheduler, key.loras):
            # One generator per sample, drawn from in the reference's order: the init photo's latent (img2img,
            # inpainting), then the starting noise, then the stochastic schedulers' steps.
            generators = self.generators(samples)
            cond = self.prepare_conditioning(requests, samples, key, generators)
            scheduler = self.make_scheduler(key.scheduler)
            scheduler.set_timesteps(key.steps, device=self.device)
            if cond.init_latents is not None:
                img2img.skip_steps(scheduler, key.steps, key.strength)
            noise = self.initial_noise(generators, key)
            latents = noise * scheduler.init_noise_sigma
            if cond.init_latents is not None:  # img2img / inpainting: start from the photo, keep its unmasked part
                cond = replace(cond, noise=noise)
                latents = img2img.start_latents(scheduler, cond.init_latents, cond.noise, latents, key.strength)
            latents = self.denoise(latents, cond, scheduler, generators, on_step, samples)
            images = self.decode(latents) if samples.owner else None
        return [img2img.keep_outside_mask(images[[i for i, owner in enumerate(samples.owner) if owner == r]],
                                          requests[r]) if r in samples.owner else None
                for r in range(len(requests))]

    # --- stages -------------------------------------------------------------------------------------------------
    def check_inputs(self, requests: list[DenoiseRequest], key: BatchKey) -> None:
        if not requests:
            raise InvalidParameter("requests must not be empty", field="requests")
        for name, side in (("width", key.width), ("height", key.height)):
            if side % 8:
                raise InvalidParameter(f"{name} must be a multiple of 8, got {side}", field=name)
        if key.steps < 1:
            raise InvalidParameter(f"steps must be >= 1, got {key.steps}", field="steps")
        if not 0 < key.strength <= 1:
            raise InvalidParameter(f"strength must be in (0, 1], got {key.strength}", field="strength")
        if key.scheduler == Scheduler.lcm and not self.lcm_enabled:
            raise InvalidParameter("scheduler 'lcm' needs an LCM-LoRA in the model sources (lcm_lora)",
                                   field="scheduler")
        self.loras.check(key.loras)
        for request in requests:
            if request.kps_image.shape != (key.height, key.width, 3):
                raise InvalidParameter(f"kps_image has shape {request.kps_image.shape}, expected "
                                       f"{(key.height, key.width, 3)}", field="kps_image")
            if request.prompt.prompt_embeds.shape[0] != key.text_tokens or (
                    request.prompt.negative_prompt_embeds.shape != request.prompt.prompt_embeds.shape):
                raise InvalidParameter(f"prompt embeddings have {request.prompt.prompt_embeds.shape[0]} tokens "
                                       f"(negative {request.prompt.negative_prompt_embeds.shape[0]}), the batch "
                                       f"{key.text_tokens}", field="prompt")
            if request.face_embedding.shape != (self.resampler.proj_in.in_features,):
                raise InvalidParameter(f"face_embedding has shape {request.face_embedding.shape}",
                                       field="face_embedding")
            for control in request.controls:
                if control.type not in self.controls.models or control.image.shape != (key.height, key.width, 3):
                    raise InvalidParameter(f"controls: no {control.type.value} ControlNet for a "
                                           f"{control.image.shape} map", field="controls")
            img2img.check_request(request, key)
            if 1 + len(request.other_identities) != key.identities or (
                    request.other_identities and request.face_box is None):
                raise InvalidParameter(f"identities: the request has {1 + len(request.other_identities)}, the batch "
                                       f"{key.identities}, each with its region", field="identities")
            for other in request.other_identities:
                if other.kps_image.shape != (key.height, key.width, 3) or other.face_embedding.shape != (
                        self.resampler.proj_in.in_features,):
                    raise InvalidParameter("identities: a keypoint image or face embedding of the wrong shape",
                                           field="identities")

    @staticmethod
    def expand_samples(requests: list[DenoiseRequest]) -> _Samples:
        samples = _Samples()
        for index, request in enumerate(requests):
            for image in range(request.num_images):
                samples.seeds.append((request.seed + image) % 2**63)  # image i of a request uses seed + i
                samples.owner.append(index)
        return samples

    @staticmethod
    def generators(samples: _Samples) -> list[torch.Generator]:
        """A CPU generator per sample seeded with its seed, as the reference passes `torch.Generator().manual_seed`."""
        return [torch.Generator("cpu").manual_seed(seed) for seed in samples.seeds]

    def prepare_conditioning(self, requests: list[DenoiseRequest], samples: _Samples, key: BatchKey,
                             generators: list[torch.Generator] | None = None) -> Conditioning:
        """Per-sample tensors laid out [uncond samples..., cond samples...], as diffusers' pipelines do.
        `generators`: the samples' own (init photo latents are sampled from them); default fresh ones."""
        per_sample = [requests[owner] for owner in samples.owner]
        generators = generators if generators is not None else self.generators(samples)

        def stack(values: list[np.ndarray], dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.from_numpy(np.stack(values)).to(self.device, dtype)

        def scalars(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=self.device, dtype=torch.float32)

        text = torch.cat([stack([r.prompt.negative_prompt_embeds for r in per_sample]),
                          stack([r.prompt.prompt_embeds for r in per_sample])])  # (2B, T, C)
        pooled = torch.cat([stack([r.prompt.negative_pooled for r in per_sample]),
                            stack([r.prompt.pooled for r in per_sample])])  # (2B, P)
        face = stack([r.face_embedding.astype(np.float32) for r in per_sample])[:, None, :]  # (B, 1, 512)
        negative_face = identity.negative_faces([r.negative_face_noise for r in per_sample], samples.seeds,
                                                face)  # zeros (the reference), or the noise asked for
        face_tokens = self.resampler(torch.cat([negative_face, face]))  # (2B, 16, C): negative face = uncond
        size = (key.height, key.width)
        time_ids = torch.tensor([size + (0, 0) + size], device=self.device, dtype=self.dtype).repeat(len(text), 1)
        # As PIL images, like the reference pipeline: diffusers scales PIL input to [0, 1] but takes numpy input
        # as already scaled, so uint8 arrays would reach IdentityNet as 0..255.
        control = self.control_processor.preprocess(
            [Image.fromarray(r.kps_image) for r in per_sample], height=key.height, width=key.width
        ).to(self.device, self.dtype)  # (B, 3, H, W) in [0, 1]
        strength = scalars([r.identitynet_strength for r in per_sample]).to(self.dtype)[:, None, None, None]
        return Conditioning(
            **self.prepare_face_region(per_sample, size),
            text=text, face_tokens=face_tokens, unet_states=torch.cat([text, face_tokens], dim=1),
            added={"text_embeds": pooled, "time_ids": time_ids}, control=torch.cat([control, control]),
            identitynet_scale=torch.cat([strength, strength]),  # (2B, 1, 1, 1)
            adapter_scale=torch.cat([scalars([r.adapter_strength for r in per_sample])] * 2),
            guidance=scalars([r.guidance for r in per_sample])[:, None, None, None],
            extra_controls=self.controls.conditioning([r.controls for r in per_sample], size, self.control_processor),
            identity_window=identity.windows([(r.identity_start, r.identity_end) for r in per_sample]),
            **img2img.prepare_init_latents(self.vae, per_sample, size, self.vae_scale_factor, self.dtype,
                                           generators),
            other_identities=tuple(self.prepare_other_identity(per_sample, k, negative_face, size)
                                   for k in range(key.identities - 1)),
        )

    def prepare_other_identity(self, per_sample: list[DenoiseRequest], k: int, negative_face: torch.Tensor,
                               size: tuple[int, int]) -> IdentityConditioning:
        """Identity k + 2 of every sample (issue 23): face tokens (its negative face is the first identity's),
        keypoint images, strengths and region masks, laid out as Conditioning's."""
        others = [r.other_identities[k] for r in per_sample]
        face = torch.from_numpy(np.stack([o.face_embedding.astype(np.float32) for o in others]))
        face = face.to(self.device, self.dtype)[:, None, :]  # (B, 1, 512)
        control = self.control_processor.preprocess(
            [Image.fromarray(o.kps_image) for o in others], height=size[0], width=size[1]
        ).to(self.device, self.dtype)  # (B, 3, H, W) in [0, 1]
        strength = torch.tensor([o.identitynet_strength for o in others], device=self.device,
                                dtype=torch.float32).to(self.dtype)[:, None, None, None]
        adapter = torch.tensor([o.adapter_strength for o in others], device=self.device, dtype=torch.float32)
        masks = torch.stack([face_box_mask(o.face_box, size, device=self.device, dtype=self.dtype) for o in others])
        masks = torch.cat([masks, masks])  # (2B, 1, H, W): uncond, cond
        levels = latent_levels(*size, self.vae_scale_factor, len(self.unet.config.block_out_channels))
        return IdentityConditioning(
            face_tokens=self.resampler(torch.cat([negative_face, face])), control=torch.cat([control, control]),
            identitynet_scale=torch.cat([strength, strength]), adapter_scale=torch.cat([adapter, adapter]),
            region_masks=masks, attention_masks=attention_masks(masks, levels))

    def prepare_face_region(self, per_sample: list[DenoiseRequest], size: tuple[int, int]) -> dict:
        """Region control (`regions`): per-sample face-box masks at image size for IdentityNet's residuals and by
        token count for the cross-attention layers, both CFG halves; None when no sample has a box."""
        if all(r.face_box is None for r in per_sample):
            return dict(region_masks=None, attention_masks=None)
        masks = torch.stack([face_box_mask(r.face_box, size, device=self.device, dtype=self.dtype)
                             for r in per_sample])  # (B, 1, H, W)
        masks = torch.cat([masks, masks])  # (2B, 1, H, W): uncond, cond
        levels = latent_levels(*size, self.vae_scale_factor, len(self.unet.config.block_out_channels))
        return dict(region_masks=masks, attention_masks=attention_masks(masks, levels))

    def make_scheduler(self, name: Scheduler) -> SchedulerMixin:
        """A fresh scheduler per call: schedulers keep step state, so they are never shared between calls."""
        cls, overrides = SCHEDULERS[name]
        return cls.from_config({**self.scheduler_config, **overrides})

    def initial_noise(self, generators: list[torch.Generator], key: BatchKey) -> torch.Tensor:
        """Each sample's starting noise from its generator (unscaled: text-to-image starts from it times the
        scheduler's init_noise_sigma, img2img adds it to the init latents)."""
        shape = (len(generators), self.unet.config.in_channels, key.height // self.vae_scale_factor,
                 key.width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generators, device=self.device, dtype=self.dtype)

    def prepare_latents(self, generators: list[torch.Generator], key: BatchKey,
                        scheduler: SchedulerMixin) -> torch.Tensor:
        return self.initial_noise(generators, key) * scheduler.init_noise_sigma

    def denoise(self, latents: torch.Tensor, cond: Conditioning, scheduler: SchedulerMixin,
                generators: list[torch.Generator], on_step: StepCallback | None = None,
                samples: _Samples | None = None) -> torch.Tensor:
        """The denoising loop. With `on_step`, requests it no longer wants leave the batch after a step: their
        samples are dropped from the latents, the conditioning, the generators, the scheduler's per-sample state
        and `samples` (updated in place); the loop stops when no sample is left."""
        use_cfg = bool((cond.guidance > 1.0).any())
        steps = len(scheduler.timesteps)
        with acc.sdpa_context(self.accel.sdpa_backend):
            for index, t in enumerate(scheduler.timesteps):
                step_cond = identity.at_step(cond, index, steps)  # cond itself when every window is [0, 1]
                latents = self.denoise_step(latents, t, step_cond, scheduler, generators, use_cfg)
                if cond.inpaint_mask is not None:
                    latents = img2img.keep_unmasked_latents(latents, cond, scheduler, index)
                if on_step is None or samples is None:
                    continue
                wanted = list(on_step(index + 1, steps))
                keep = [i for i, owner in enumerate(samples.owner) if wanted[owner]]
                if len(keep) == len(samples.owner):
                    continue
                latents, cond = self.select_samples(keep, latents, cond, scheduler)
                generators[:] = [generators[i] for i in keep]
                samples.seeds[:] = [samples.seeds[i] for i in keep]
                samples.owner[:] = [samples.owner[i] for i in keep]
                if not keep:
                    break
        return latents

    @staticmethod
    def select_samples(keep: list[int], latents: torch.Tensor, cond: Conditioning,
                       scheduler: SchedulerMixin) -> tuple[torch.Tensor, Conditioning]:
        """Keep only samples `keep` of a running batch: latents and scheduler state are (B, ...), conditioning is
        (2B, ...) laid out [uncond..., cond...] or (B, ...) (every tensor in `cond` is per sample)."""
        count = latents.shape[0]
        one = torch.tensor(keep, dtype=torch.long, device=latents.device)
        two = torch.cat([one, one + count])

        def pick(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] in (count, 2 * count):
                return value[(one if value.shape[0] == count else two).to(value.device)]
            if isinstance(value, dict):
                return {name: pick(item) for name, item in value.items()}
            if isinstance(value, list | tuple):
                return type(value)(pick(item) for item in value)
            if is_dataclass(value):  # an IdentityConditioning
                return replace(value, **{f.name: pick(getattr(value, f.name)) for f in fields(value)})
            return value

        for name in _SCHEDULER_SAMPLE_STATE:
            state = getattr(scheduler, name, None)
            if isinstance(state, list):
                setattr(scheduler, name, [item[one] if isinstance(item, torch.Tensor) and item.ndim
                                          and item.shape[0] == count else item for item in state])
            elif isinstance(state, torch.Tensor) and state.ndim and state.shape[0] == count:
                setattr(scheduler, name, state[one])
        return latents[one], Conditioning(**{f.name: pick(getattr(cond, f.name)) for f in fields(cond)})

    def denoise_step(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, scheduler: SchedulerMixin,
                     generators: list[torch.Generator], use_cfg: bool) -> torch.Tensor:
        """One scheduler step: model input, noise prediction (the compiled part when `compile`), CFG, step."""
        guidance = cond.guidance
        model_input = torch.cat([latents] * 2) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        # Both CFG halves go through IdentityNet: running it on the conditional half only would change the image.
        noise = self._step(model_input, t, cond, use_cfg)
        if use_cfg:
            uncond, text = noise.chunk(2)
            # A sample with guidance <= 1 runs unguided, as it would alone. The scale takes the noise's dtype, as a
            # Python float does in diffusers' pipelines: a float32 tensor would promote fp16/bf16 latents to float32.
            scale = guidance.to(noise.dtype)
            noise = torch.where(guidance > 1.0, uncond + scale * (text - uncond), text)
        # Only stochastic schedulers take a generator (UniPC's step() has no such argument), as in diffusers'
        # prepare_extra_step_kwargs.
        extra = {"generator": generators} if _takes_generator(scheduler) else {}
        return scheduler.step(noise, t, latents, return_dict=False, **extra)[0]

    def predict_noise(self, model_input: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      use_cfg: bool) -> torch.Tensor:
        """One UNet + IdentityNet evaluation. IdentityNet sees only the face tokens (plus pooled text and time
        ids); the UNet sees text + face tokens, the face part scaled per sample."""
        pick = (lambda x: x) if use_cfg else (lambda x: x[x.shape[0] // 2:])  # cond half only when unguided
        added = {name: pick(value) for name, value in cond.added.items()}
        down, mid = self.identitynet(
            model_input, t, encoder_hidden_states=pick(cond.face_tokens), controlnet_cond=pick(cond.control),
            conditioning_scale=pick(cond.identitynet_scale), added_cond_kwargs=added, return_dict=False,
        )
        if cond.region_masks is not None:  # region control: the demo's control_mask, per sample
            masks = pick(cond.region_masks)
            down = [residual * residual_mask(masks, residual) for residual in down]
            mid = mid * residual_mask(masks, mid)
        for other in cond.other_identities:  # issue 23: IdentityNet once per identity, masked to its region, summed
            other_down, other_mid = self.identitynet(
                model_input, t, encoder_hidden_states=pick(other.face_tokens), controlnet_cond=pick(other.control),
                conditioning_scale=pick(other.identitynet_scale), added_cond_kwargs=added, return_dict=False,
            )
            masks = pick(other.region_masks)
            down = [d + r * residual_mask(masks, r) for d, r in zip(down, other_down, strict=True)]
            mid = mid + other_mid * residual_mask(masks, other_mid)
        region = cond.attention_masks
        attention_kwargs = {"ip_adapter_scale": pick(cond.adapter_scale),
                            "face_region": None if region is None else {n: pick(m) for n, m in region.items()}}
        if cond.other_identities:
            attention_kwargs["other_faces"] = [
                (pick(o.face_tokens), pick(o.adapter_scale), {n: pick(m) for n, m in o.attention_masks.items()})
                for o in cond.other_identities]
        if cond.extra_controls:  # canny/depth/pose ControlNets, on the text embeddings, scaled per sample
            down, mid = self.controls.add_residuals(down, mid, model_input, t, pick(cond.text), added,
                                                    cond.extra_controls, pick)
        return self.unet(
            model_input, t, encoder_hidden_states=pick(cond.unet_states),
            cross_attention_kwargs=attention_kwargs, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        if self._mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        image = self._decode_latents(latents)
        image = self.image_processor.postprocess(image.float(), output_type="np")  # (B, H, W, 3) in [0, 1]
        return (image * 255).round().astype(np.uint8)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode: (B, 4, h, w) latents -> (B, 3, H, W) images in [-1, 1].

        One image at a time (diffusers' VAE slicing, done here): the decoder's full-resolution activations dominate
        a batch's peak memory, and per image they do not grow with the batch. Above `vae_tile_above_pixels`,
        diffusers' tiled decode (overlapping tiles, blended) keeps one image's memory bounded too."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        pixels = latents.shape[-1] * latents.shape[-2] * self.vae_scale_factor ** 2
        limit = self.settings.vae_tile_above_pixels
        decode = self.vae.tiled_decode if limit is not None and pixels > limit else self.vae.decode
        return torch.cat([decode(sample, return_dict=False)[0] for sample in latents.split(1)])

    def lora_scope(self, scheduler: Scheduler, loras: LoraSet = ()) -> contextlib.AbstractContextManager:
        """The call's LoRA set (and the LCM-LoRA for the LCM scheduler) is active only inside the call that asked
        for it (under the call lock); outside, every adapter is off."""
        lcm = [(LCM_ADAPTER, 1.0)] if scheduler == Scheduler.lcm else []
        return self.loras.activate(loras, extra=lcm)

    def preload_loras(self, names: list[str]) -> None:
        """Load LoRA adapters ahead of their first forward (the Serve replica's multiplexed loader)."""
        with self._lock:
            self.loras.load(names)


def load_lcm_lora(unet: UNet2DConditionModel, path: Path) -> None:
    """Load an LCM-LoRA (a .safetensors file or a folder with one; diffusers or kohya keys) onto the UNet,
    disabled: `lora_scope` turns it on for calls that ask for the LCM scheduler.

    Raises:
        WeightsError: the file has no LoRA weights for this UNet (diffusers would only log a warning).
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    folder, name = (path, None) if path.is_dir() else (path.parent, path.name)
    # diffusers' own reader: finds the weights file in a folder and converts kohya/SGM key names.
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(folder), weight_name=name)
    unet.load_lora_adapter(state, network_alphas=alphas, adapter_name=LCM_ADAPTER, prefix="unet")
    if LCM_ADAPTER not in (getattr(unet, "peft_config", None) or {}):
        raise WeightsError(f"lcm_lora: {path} holds no LoRA weights for the SDXL UNet", field="lcm_lora")
    unet.disable_lora()


def _takes_generator(scheduler: SchedulerMixin) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters
