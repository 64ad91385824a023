"""Per-request LoRAs: named LoRA files, loaded into the UNet on first use through diffusers/peft, kept in a bounded
LRU, and active only inside the forward pass that asked for them.

    registry (name -> file)  --LoraLibrary.check-->  400 for an unknown name
    first use                --LoraLibrary.load-->   peft adapter on the UNet (422 if the file is not a LoRA for it)
    one forward              --LoraLibrary.activate(set)--> set_adapters(names, scales) ... disable_lora()

A LoRA set (names and scales, sorted) is part of the batch key: requests with different sets never share a
forward, so activating the set for the whole batch is exact. peft keeps adapter state on the UNet's modules, so
activation is a scope entered under the denoiser's call lock (one forward at a time) and always undone: outside it
every adapter is disabled and the UNet computes exactly its base weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .config import MAX_LORAS_PER_REQUEST, GenerateParams, LoraWeight
from .errors import InstantIDError, InvalidParameter

log = logging.getLogger(__name__)


class InvalidLora(InstantIDError):
    """A registered LoRA file is not a LoRA for this UNet (wrong keys or shapes, not a safetensors file): the
    request is refused and the UNet is left as it was."""

    code = "invalid_lora"


LoraSet = tuple[tuple[str, float], ...]  # sorted (name, scale) pairs; () is no LoRA


def lora_set(loras: Sequence[LoraWeight]) -> LoraSet:
    """The batch-key form of a request's LoRAs: sorted, scale-0 entries dropped (a LoRA at scale 0 adds exactly
    nothing, so such a request batches, and computes, as one without it)."""
    return tuple(sorted((lora.name, float(lora.scale)) for lora in loras if lora.scale != 0.0))


def lora_set_id(loras: Sequence[LoraWeight] | LoraSet) -> str:
    """The multiplexed model id of a LoRA set: the names that must be loaded (scales do not change what a
    replica holds). Empty for no LoRA."""
    pairs = loras if isinstance(loras, tuple) else lora_set(loras)
    return "+".join(sorted({name for name, _ in pairs}))


class LoraLibrary:
    """The LoRAs one UNet can take: a registry of files, an LRU of loaded peft adapters, activation per forward.

    Not thread-safe by itself: `load` and `activate` mutate the UNet's adapter state, so the caller holds its
    forward lock around them (IdentityDenoiser does).
    """

    def __init__(self, unet, registry: Mapping[str, Path], *, max_loaded: int = 8,
                 resident: Sequence[str] = (), presets: Mapping[str, dict] | None = None) -> None:
        """Args:
            unet: the diffusers UNet (peft adapters are added to it).
            registry: name -> resolved local .safetensors file.
            max_loaded: most adapters kept loaded; the least recently used is deleted beyond that.
            resident: adapters already on the UNet that are never evicted (the LCM-LoRA).
            presets: name -> {scheduler, steps, guidance} a LoRA was trained for (`with_presets`).
        """
        if max_loaded < MAX_LORAS_PER_REQUEST:
            raise ValueError(f"max_loaded must be >= {MAX_LORAS_PER_REQUEST} (one request's LoRAs)")
        self.unet = unet
        self.registry = dict(registry)
        self.max_loaded = max_loaded
        self.resident = tuple(resident)
        self.presets = {name: preset for name, preset in (presets or {}).items() if preset}
        # An OrderedDict LRU (cachetools is not a dependency of the core): name -> peft adapter name.
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self.load_seconds: dict[str, float] = {}

    def with_presets(self, params: GenerateParams) -> GenerateParams:
        """`params` with the scheduler, steps and guidance it left unset taken from the first of its LoRAs that
        has a preset (a few-step LoRA is then a name away); set values are kept."""
        for lora in params.loras:
            preset = self.presets.get(lora.name)
            if preset and lora.scale != 0.0:
                unset = {k: v for k, v in preset.items() if getattr(params, k) is None}
                return params.model_copy(update=unset)
        return params

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def check(self, pairs: LoraSet | Sequence[LoraWeight], field: str = "loras") -> None:
        """Raises InvalidParameter naming the first unregistered LoRA."""
        names = [p[0] for p in pairs] if isinstance(pairs, tuple) else [lora.name for lora in pairs]
        for index, name in enumerate(names):
            if name not in self.registry:
                known = ", ".join(sorted(self.registry)) or "none"
                raise InvalidParameter(f"{field}[{index}].name: unknown LoRA {name!r} (registered: {known})",
                                       field=f"{field}[{index}].name")

    def load(self, names: Sequence[str]) -> None:
        """Load each adapter not yet loaded (evicting the least recently used beyond `max_loaded`).

        Raises:
            InvalidParameter: a name is not registered.
            InvalidLora: the file is not a LoRA for this UNet; the UNet is left as it was.
        """
        import time

        for name in names:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                continue
            self.check(((name, 1.0),))
            started = time.perf_counter()
            adapter = _adapter_name(name)
            _load_adapter(self.unet, self.registry[name], adapter, name)
            self._loaded[name] = adapter
            self.load_seconds[name] = time.perf_counter() - started
            while len(self._loaded) > self.max_loaded:
                old, old_adapter = next(iter(self._loaded.items()))
                if old in names:  # never evict what this call needs (max_loaded >= 3 makes this unreachable)
                    break
                del self._loaded[old]
                self.unet.delete_adapters([old_adapter])
                log.info("LoRA %s evicted (LRU, %d loaded)", old, len(self._loaded))

    @contextlib.contextmanager
    def activate(self, pairs: LoraSet, *, extra: Sequence[tuple[str, float]] = ()) -> Iterator[None]:
        """Within the block, exactly `pairs` (plus `extra` resident adapters, e.g. the LCM-LoRA) are active at their
        scales; outside it, none. `pairs` are loaded first if needed."""
        if not pairs and not extra:
            yield
            return
        self.load([name for name, _ in pairs])
        adapters = [self._loaded[name] for name, _ in pairs] + [name for name, _ in extra]
        scales = [scale for _, scale in pairs] + [scale for _, scale in extra]
        self.unet.set_adapters(adapters, scales)
        self.unet.enable_lora()
        try:
            yield
        finally:
            self.unet.disable_lora()


def _adapter_name(name: str) -> str:
    # peft keys adapters in ModuleDicts: no dots allowed, so the registry name is hashed into a safe one.
    return "lora_" + hashlib.sha1(name.encode()).hexdigest()[:12]


def _load_adapter(unet, path: Path, adapter: str, name: str) -> None:
    """One LoRA file onto the UNet as peft adapter `adapter`, left disabled; on any failure the UNet is restored."""
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    existed = adapter in (getattr(unet, "peft_config", None) or {})
    try:
        if existed:
            raise ValueError(f"adapter {adapter} is already on the UNet")
        # diffusers' own reader: converts kohya / SGM / old diffusers key names to the UNet's.
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                                  unet_config=unet.config)
        if not any(key.startswith("unet.") for key in state):
            raise ValueError("it has no UNet LoRA weights")
        unet.load_lora_adapter(state, network_alphas=alphas, adapter_name=adapter, prefix="unet")
        if adapter not in (getattr(unet, "peft_config", None) or {}):
            raise ValueError("no key matched a UNet module")
    except Exception as exc:  # diffusers/peft/safetensors raise many types for a wrong file
        if not existed and adapter in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters([adapter])  # a half-injected adapter: the UNet is left as it was
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InvalidLora(f"LoRA {name!r} ({path.name}) is not a LoRA for this UNet: {reason}",
                          field="loras") from exc
    finally:
        if getattr(unet, "peft_config", None):
            unet.disable_lora()  # a freshly injected layer starts enabled; activation is per forward only
