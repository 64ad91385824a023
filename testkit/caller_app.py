"""A second Ray Serve app that calls the `instantid` app through a DeploymentHandle, as other teams' apps do."""

from __future__ import annotations

from ray import serve

from deployments.schemas import GenerateRequest, GenerateResponse


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Caller:
    def __init__(self) -> None:
        self.instantid = serve.get_app_handle("instantid")

    async def __call__(self, request: GenerateRequest) -> GenerateResponse:
        return await self.instantid.generate.remote(request)


app = Caller.bind()
