"""A local multi-node Ray cluster on this machine: one `ray start --block` process per node, custom resources standing
in for the node types of cluster/aws.yaml and the KubeRay worker groups (`cpu_node`, `gpu_node`). Nodes are asked
for 127.0.0.1; Ray maps that to the machine's own address, which is what `ray.nodes()` then reports.

    python -m testkit.cluster up                 # head + 1 CPU node + 1 "GPU" node; Ctrl-C stops them
    python -m testkit.cluster up --cpu-nodes 2 --gpu-nodes 1 --dashboard

    from testkit.cluster import start_local_cluster
    with start_local_cluster() as cluster:       # head, cpu, gpu
        cluster.connect()                        # ray.init(address=...) with the cluster's auth settings
        ...                                      # serve.run(...), ray.nodes(), ...

Every node process is ours (started here, stopped here by its pid, its Ray children going with it): nothing else
on the machine is touched, unlike `ray stop`. Each node gets free ports and a private temp dir, so several clusters
(and other Ray users) can share the machine.

Auth: Ray enables token authentication for new local clusters; every process of one cluster must agree. `auth="token"`
(default) starts every node with RAY_AUTH_MODE=token and Ray's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token, created if missing), and `connect()` sets the same in the driver; `auth="disabled"` turns it off
everywhere. `cluster.env` is what any other process (a `serve` CLI, a job) needs in its environment.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self

from testkit.net import free_port

# The custom resources each node type advertises; the same numbers as cluster/aws.yaml's node types and the KubeRay
# worker groups' rayStartParams (tests/cluster/test_cluster_config.py checks both). gpu_node = GPUs on the node (a
# Denoiser asks for 1); cpu_node is a marker large enough never to limit (num_cpus limits).
NODE_TYPE_RESOURCES: dict[str, dict[str, float]] = {
    "head": {},
    "cpu": {"cpu_node": 1000},
    "gpu": {"gpu_node": 1},
}
OBJECT_STORE_BYTES = 100 * 2**20  # per node; Ray's minimum is 75 MiB, its default 30% of RAM per node
# On SIGTERM a `ray start --block` node first drains (waits for Serve to move its replicas off, for a Kubernetes pod
# being replaced) for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s). A local cluster is stopped whole, every node
# at once, so there is nowhere to drain to: each node stopped 30 s later than it could. 0 stops it at once (Ray's own
# "preserves immediate teardown"); its processes are still SIGTERMed, then SIGKILLed, by the node itself.
NODE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


@dataclass(frozen=True)
class NodeSpec:
    """One node: its type (a key of NODE_TYPE_RESOURCES) and how many logical CPUs it offers.

    No real GPU is needed: a "gpu" node advertises `gpu_node` and 0 GPUs unless `num_gpus` says otherwise, so the
    GPU overlay's placement runs on a laptop once `num_gpus` is dropped from the serve config
    (`k8s.render.cpu_only`)."""

    node_type: str
    num_cpus: float = 2
    num_gpus: int = 0
    extra_resources: dict[str, float] = field(default_factory=dict)

    @property
    def resources(self) -> dict[str, float]:
        return {**NODE_TYPE_RESOURCES[self.node_type], **self.extra_resources}


def default_nodes(cpu_nodes: int = 1, gpu_nodes: int = 1, *, cpus_per_node: float = 2) -> list[NodeSpec]:
    """A head with no CPUs (no replica lands there, as in the real clusters), then the worker nodes."""
    return ([NodeSpec("head", num_cpus=0)] + [NodeSpec("cpu", num_cpus=cpus_per_node)] * cpu_nodes
            + [NodeSpec("gpu", num_cpus=cpus_per_node)] * gpu_nodes)


@dataclass
class LocalCluster:
    """A running local cluster. Stop it with `stop()` (or use it as a context manager)."""

    address: str  # GCS address, for ray.init(address=...) and RAY_ADDRESS
    root: Path  # per-node temp dirs and logs
    env: dict[str, str]  # what every process that talks to this cluster needs in its environment
    nodes: list[NodeSpec]
    dashboard_url: str | None = None  # http://127.0.0.1:PORT when started with a dashboard (`serve deploy`)
    _processes: list[subprocess.Popen] = field(default_factory=list, repr=False)
    _owns_root: bool = field(default=True, repr=False)
    _connected: bool = field(default=False, repr=False)

    def connect(self, **init_kwargs: Any) -> Any:
        """`ray.init` this process into the cluster, with the cluster's auth settings."""
        import ray

        os.environ.update(self.env)
        _refresh_ray_auth()
        context = ray.init(address=self.address, **init_kwargs)
        self._connected = True
        return context

    def stop(self, timeout_s: float = 30) -> None:
        """Stop every node this cluster started (workers first), by pid; remove the temp dir it created."""
        stop_processes(self._processes, timeout_s)
        self._processes.clear()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        if self._connected and ray.is_initialized():  # only the driver connect() made, never someone else's
            ray.shutdown()
        self.stop()


def start_local_cluster(
    nodes: list[NodeSpec] | None = None,
    *,
    auth: Literal["token", "disabled"] = "token",
    dashboard: bool = False,
    root: Path | None = None,
    timeout_s: float = 90,
    env: dict[str, str] | None = None,
) -> LocalCluster:
    """Start a head and worker nodes on 127.0.0.1 and wait until all of them have joined.

    Args:
        nodes: the head first (`node_type="head"`), then workers; default `default_nodes()`.
        auth: `token` (Ray's default for local clusters) or `disabled`; applied to every process alike.
        dashboard: start the dashboard (needed by `serve deploy` / `serve status`, not by `serve.run`).
        root: where node temp dirs and logs go; default a new temp dir, removed by `stop()`.
        timeout_s: how long to wait for the nodes to join.
        env: more environment for every node (and so every Ray process of the cluster: Serve's controller reads
            its RAY_SERVE_* settings from it) and for `cluster.env`.

    Raises:
        RuntimeError: a node did not start or join in time (its log path is in the message).
    """
    nodes = list(nodes or default_nodes())
    if not nodes or nodes[0].node_type != "head":
        raise ValueError("nodes[0] must be the head (node_type='head')")
    owns_root = root is None
    root = Path(tempfile.mkdtemp(prefix="rl-")) if root is None else Path(root)  # short: unix socket paths
    env = {**_auth_env(auth), **(env or {})}
    port = free_port()
    cluster = LocalCluster(address=f"127.0.0.1:{port}", root=root, env=env, nodes=[], _owns_root=owns_root)
    if dashboard:
        cluster.dashboard_url = f"http://127.0.0.1:{free_port()}"
    try:
        cluster._processes.append(_start_node(nodes[0], cluster, head=True, dashboard=dashboard))
        cluster.nodes.append(nodes[0])
        _wait_for_nodes(cluster, 1, timeout_s)
        for spec in nodes[1:]:
            cluster._processes.append(_start_node(spec, cluster, head=False))
            cluster.nodes.append(spec)
        _wait_for_nodes(cluster, len(nodes), timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def stop_processes(processes: list[subprocess.Popen], timeout_s: float = 30) -> None:
    """SIGTERM each `ray start --block` process (it stops its node's Ray processes), newest first; SIGKILL the
    process group of any that outlives `timeout_s`. Only these processes and their children are signalled."""
    for proc in reversed(processes):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in reversed(processes):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we created with start_new_session
            proc.wait(timeout=10)


def _start_node(spec: NodeSpec, cluster: LocalCluster, *, head: bool, dashboard: bool = False) -> subprocess.Popen:
    index = len(cluster._processes)
    temp_dir = cluster.root / f"n{index}"
    temp_dir.mkdir(parents=True, exist_ok=True)
    host, port = cluster.address.split(":")
    args = [
        _ray_cli(), "start", "--block", "--disable-usage-stats",
        f"--node-ip-address={host}",
        f"--num-cpus={spec.num_cpus:g}",
        f"--num-gpus={spec.num_gpus}",
        f"--resources={json.dumps(spec.resources)}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    if head:
        args += ["--head", f"--port={port}", f"--include-dashboard={str(dashboard).lower()}"]
        if dashboard:
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard_url.rsplit(':', 1)[1]}"]
    else:
        args += [f"--address={cluster.address}"]
    env = {**os.environ, **cluster.env, **NODE_ENV}
    with open(temp_dir / "ray-start.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


# Counts alive nodes from a separate Python, so that the caller's process (a test session that may hold its own Ray
# driver) never has its Ray core state or environment touched by the wait.
_COUNT_NODES = """
import socket, sys, time
from ray._raylet import GcsClient
from ray.exceptions import RayError
address, count, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
host, port = address.rsplit(":", 1)
client, alive = None, 0
while time.monotonic() < deadline:
    try:
        if client is None:
            socket.create_connection((host, int(port)), timeout=1).close()  # else GcsClient blocks for 40 s
            client = GcsClient(address=address)
        alive = sum(1 for node in client.get_all_node_info(timeout=5).values() if node.state == 0)
        if alive >= count:
            sys.exit(0)
    except (OSError, RayError):
        client = None
    time.sleep(0.5)
print(alive)
sys.exit(1)
"""


def _wait_for_nodes(cluster: LocalCluster, count: int, timeout_s: float) -> None:
    """Wait until `count` nodes are alive in the GCS; fail early with the log of a node process that exited."""
    env = {**os.environ, **cluster.env}
    waiter = subprocess.Popen([sys.executable, "-c", _COUNT_NODES, cluster.address, str(count), str(timeout_s)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while waiter.poll() is None:
            for index, proc in enumerate(cluster._processes):
                if proc.poll() is not None:
                    log = cluster.root / f"n{index}" / "ray-start.log"
                    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    raise RuntimeError(f"ray node {index} ({cluster.nodes[index].node_type}) exited with "
                                       f"{proc.returncode}; log {log}:\n{tail}")
            time.sleep(0.25)
    finally:
        if waiter.poll() is None:
            waiter.kill()
        alive = (waiter.communicate()[0] or "").strip() or "?"
    if waiter.returncode != 0:
        raise RuntimeError(f"{alive} of {count} ray nodes joined within {timeout_s:.0f}s; logs under {cluster.root}")


def _auth_env(auth: str) -> dict[str, str]:
    if auth == "disabled":
        return {"RAY_AUTH_MODE": "disabled"}
    if auth != "token":
        raise ValueError(f"auth must be 'token' or 'disabled', got {auth!r}")
    env = {"RAY_AUTH_MODE": "token"}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):  # an explicit token wins over ~/.ray/auth_token
        if os.environ.get(name):
            env[name] = os.environ[name]
    # Make sure the token exists before any node starts (Ray's own command; creates ~/.ray/auth_token if missing).
    # Once it exists there is nothing to do, and the command (an interpreter importing Ray: ~2 s) is not run.
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if env.get("RAY_AUTH_TOKEN") or (Path(path) if path else Path.home() / ".ray" / "auth_token").is_file():
        return env
    subprocess.run([_ray_cli(), "get-auth-token", "--generate"], env={**os.environ, **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return env


def _refresh_ray_auth() -> None:
    """Make this process's Ray core see the auth settings now in its environment (Ray reads RAY_AUTH_MODE and the
    token once and caches them)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_cli() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise RuntimeError("the `ray` command is not installed next to this Python (pip install 'ray[serve]')")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testkit.cluster", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a cluster and keep it up until Ctrl-C / SIGTERM")
    up.add_argument("--cpu-nodes", type=int, default=1)
    up.add_argument("--gpu-nodes", type=int, default=1)
    up.add_argument("--cpus-per-node", type=float, default=2)
    up.add_argument("--auth", choices=("token", "disabled"), default="token")
    up.add_argument("--dashboard", action="store_true", help="start the dashboard (for `serve deploy`)")
    args = parser.parse_args(argv)

    cluster = start_local_cluster(default_nodes(args.cpu_nodes, args.gpu_nodes, cpus_per_node=args.cpus_per_node),
                                  auth=args.auth, dashboard=args.dashboard)
    exports = {"RAY_ADDRESS": cluster.dashboard_url or cluster.address, **cluster.env}
    print(f"ray cluster up: {len(cluster.nodes)} nodes at {cluster.address} (logs: {cluster.root})")
    print("in another shell:\n  " + " ".join(f"export {k}={v};" for k, v in exports.items()))
    stop = {"now": False}

    def request_stop(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stop["now"] and all(p.poll() is None for p in cluster._processes):
            time.sleep(0.5)
    finally:
        print("stopping the cluster")
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
