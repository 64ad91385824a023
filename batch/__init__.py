"""The Ray Data batch job: every photo of an image set x every prompt, resumable, with a manifest (`batch.job`).
Not the async jobs API of the serving app, which is `deployments.jobs`."""
