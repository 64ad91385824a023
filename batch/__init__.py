"""The Ray Data batch job: every photo of an image set x every prompt, resumable, with a manifest (`batch.job`; its
settings and pairs in `batch.pairs`, the Ray Data stages in `batch.stages`, the manifest in `batch.manifest`).
Not the async jobs API of the serving app, which is `deployments.jobs`."""

from instantid_core.quiet import silence_known_noise

silence_known_noise()  # the batch job's driver and actors: third-party noise users cannot act on
