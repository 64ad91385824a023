"""Support for the tests and the benchmarks (never imported by product code).

- `net`: the one `free_port`, `wait_until` (poll a condition) and `wait_ready` (poll an app's /readyz).
- `redis`: a real redis-server on a free loopback port (`start_redis`, `wait_for_redis`), or one a fault test
  stops and starts again, optionally persistent (`RedisServer`).
- `s3`: moto's S3 server on loopback, restartable, and the boto3 environment that points at it (`S3TestServer`).
- `webhooks`: a webhook receiver on loopback that records each call (`WebhookReceiver`).
- `cluster`: a local multi-node Ray cluster, one `ray start` process per node (`python -m testkit.cluster up`).
- `serve`: deploy the app for a test (`deploy`, `small_stage_options`, `ServedApp`) and find its replica actors.
- `api`: what requests to the app are made of (`FACE`, `FAST`, `b64`, reading outputs back from S3).
- `hostile`: the corpus of hostile requests with the answers the API documents.
- `placement`: the placement driver (`python -m testkit.placement`) on a local multi-node cluster.
- `caller_app`: a second Serve app that calls `instantid` through its handle.
- `tiny`: extra tiny models the tests write next to the tiny preset (an LCM-LoRA).
- `cli`: run the `instantid` command in-process or as a subprocess, and read its one error line.
"""
