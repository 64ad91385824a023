"""Ray clusters for InstantID: the AWS launcher config (aws.yaml), a local multi-node cluster for tests (local.py)
and the weights prefetch that runs on every node before Ray starts (prefetch.py)."""
