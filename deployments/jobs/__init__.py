"""The async jobs API (`/v1/jobs`): records in Redis (`store`), the queue on Ray Serve's task queue (`task_queue`), the
routes' logic (`api`), the consumer deployment (`consumer`), signed webhooks (`webhooks`) and the per-step progress
relay between the Denoiser and Redis (`progress`). Not the Ray Data batch job, which is the `batch` package."""
