"""Ray Serve deployments: thin wrappers that hold one core stage each, plus the FastAPI ingress and `build_app`."""
