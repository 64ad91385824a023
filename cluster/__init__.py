"""Ray clusters for InstantID: the AWS launcher config (aws.yaml) and the weights prefetch that runs on every node
before Ray starts (prefetch.py). The local multi-node cluster for tests is testkit/cluster.py."""
