"""Each deployment's live settings: its `user_config` model, applied by its reconfigure() without a restart, and
the API-key and rate-limit settings the Ingress's carries. `SETTINGS` maps a deployment's name to its model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AccessConfig(BaseModel):
    """AppConfig.access: off unless a key source is given."""

    model_config = ConfigDict(extra="forbid")

    api_keys_file: str | None = Field(None, description="YAML/JSON list of {name, key, actions} (a mounted Secret).")
    api_keys_env: str | None = Field(None, description="Environment variable holding the same list as JSON.")
    keys_reload_interval_s: float = Field(2.0, gt=0, description="How often each Ingress replica checks "
                                          "api_keys_file for a change (a rotated Secret volume): a new key works "
                                          "and a removed one is refused within this, with no restart.")
    rate_limit_per_minute: float | None = Field(None, gt=0, description="Per key; unset: no limit.")
    rate_limit_burst: int = Field(10, ge=1, description="Requests a key may send at once before the rate applies.")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_file or self.api_keys_env)


class LinkSettings(BaseModel):
    """IngressSettings.links: the expiring links every response carries (output.url_ttl_s per request)."""

    model_config = ConfigDict(extra="forbid")

    default_ttl_s: int = Field(3600, ge=0, description="Lifetime of the links when a request gives no "
                               "output.url_ttl_s (an hour, as hosted image APIs keep outputs); 0: no links unless "
                               "asked for.")
    # SigV4 presigned URLs live at most 7 days; the same bound for signed file:// links keeps one rule.
    max_ttl_s: int = Field(7 * 86400, ge=1, le=7 * 86400, description="The longest output.url_ttl_s a request "
                           "may ask for; above it the request answers 400.")
    secret_env: str = Field("INSTANTID_LINK_SECRET", min_length=1, description="Environment variable (e.g. from "
                            "a Kubernetes Secret) with the key that signs links to file:// outputs; every Ingress "
                            "replica must see the same. Unset: a random key kept beside the outputs "
                            "(`<output dir>/.link-secret`, made once), which replicas sharing that folder share.")

    @model_validator(mode="after")
    def _default_within_bound(self) -> LinkSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(f"links.default_ttl_s ({self.default_ttl_s}) exceeds links.max_ttl_s ({self.max_ttl_s})")
        return self


class IngressSettings(BaseModel):
    """The Ingress's `user_config`: limits and access, changed live by `serve deploy`."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(20 * 2**20, ge=1024, description="HTTP body limit; larger bodies get 413.")
    max_image_bytes: int = Field(15 * 2**20, ge=1024, description="Per-image limit after base64 decoding.")
    stage_timeout_s: float = Field(300.0, gt=0, description="A request whose stages take longer than this in all "
                                   "answers 504, and its stages are cancelled.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After on 503.")
    access: AccessConfig = Field(default_factory=AccessConfig)
    links: LinkSettings = Field(default_factory=LinkSettings)


class FaceSettings(BaseModel):
    """FaceAnalysis's `user_config`."""

    model_config = ConfigDict(extra="forbid")

    cache_bytes: int = Field(16 * 2**20, ge=0, description="Bytes of face analyses kept (about 2.2 KB each; 0: no "
                             "cache); shrinking drops the least recently used.")


class PromptSettings(BaseModel):
    """PromptEncoder's `user_config`."""

    model_config = ConfigDict(extra="forbid")

    cache_bytes: int = Field(256 * 2**20, ge=0, description="Bytes of prompt embeddings kept (about 1.3 MB each with "
                             "SDXL; 0: no cache); shrinking drops the least recently used.")


class DenoiserSettings(BaseModel):
    """The Denoiser's `user_config`: Serve's batcher is retuned in place (`set_max_batch_size`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(4, ge=1, description="Most images per GPU batch.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="How long a batch waits to fill.")


class WriterSettings(BaseModel):
    """OutputWriter's `user_config`."""

    model_config = ConfigDict(extra="forbid")

    inline_max_pixels: int = Field(1024 * 1024, ge=0, description="?inline=true returns images up to this size.")


SETTINGS: dict[str, type[BaseModel] | None] = {  # deployment name -> its user_config model (None: no live settings)
    "Ingress": IngressSettings, "FaceAnalysis": FaceSettings, "PromptEncoder": PromptSettings,
    "Denoiser": DenoiserSettings, "OutputWriter": WriterSettings,
    "JobConsumer": None,  # only with `jobs` in args; it has no reconfigure(), so its entry takes no user_config
    "SafetyChecker": None,  # only with `safety` in args; its mode is an arg (it decides what is ever written)
}
