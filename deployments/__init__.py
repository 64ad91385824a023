"""Ray Serve deployments: thin wrappers that hold one core stage each, plus the FastAPI ingress and `build_app`."""

from instantid_core.quiet import silence_known_noise

silence_known_noise()  # this package's processes are the app's replicas: third-party noise users cannot act on
