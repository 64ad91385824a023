"""bench/jobs_chaos.py's object-store scenario against the served app, one job, so the benchmark cannot rot and the
fault it measures is checked here too: S3 stopped for 10 s mid-job, the job still ends done, its outputs written
once (a versioned bucket) and its webhook accepted once."""

from __future__ import annotations

import boto3

from bench.jobs_chaos import Chaos, object_store_down
from testkit.webhooks import WebhookReceiver


def test_a_job_outlives_the_object_store_stopping_mid_run_with_nothing_lost_or_doubled(served_app, s3_test_server):
    boto3.client("s3").put_bucket_versioning(Bucket=served_app.bucket,
                                             VersioningConfiguration={"Status": "Enabled"})
    receiver = WebhookReceiver([])
    try:
        outcome = object_store_down(Chaos(served_app.url, served_app.bucket, receiver, s3=s3_test_server,
                                          app=served_app.name), jobs=1)
    finally:
        receiver.close()
    assert (outcome.done, outcome.lost, outcome.doubled) == (1, 0, 0), outcome
    assert len(receiver.calls) == 1, receiver.calls  # the scenario counted these: one call, accepted
