"""A two-node Ray cluster on this machine, the application placed as ``deploy/cluster.yaml``
places it: run by ``test_cluster.py`` in a process of its own (its own Ray), it prints one JSON
object: the answers, where each deployment's replicas ran, and how many engines the pool served.

    python -m tests.serve.cluster_run KEYS_FILE API_KEY SEED [SEED ...]
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from models.tiny.samples import make_sample
from serve.local_redis import free_port
from serve.settings import DeploymentSettings, DrafterPoolSettings, PrefixCacheSettings, ServeSettings
from tests.serve.http_helpers import chat_messages, data_url


def placement() -> dict[str, list[list[str]]]:
    """Deployment -> the custom resources of the node each live replica runs on."""
    import ray
    from ray.util.state import list_actors

    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k in ("edge", "cloud")) for n in ray.nodes()}
    where: dict[str, list[list[str]]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith("ServeReplica:covspec:"):
            where.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(nodes[actor.node_id])
    return where


def ask(url: str, key: str, seed: int) -> str:
    sample = make_sample(seed, "bob", kind="describe")
    body = {"messages": chat_messages(sample, data_url(sample.image())), "max_tokens": 32, "temperature": 0}
    headers = {"authorization": f"Bearer {key}"}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def main(keys_file: str, key: str, seeds: list[int]) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve.deployments import build_app

    cluster = Cluster(
        initialize_head=True,
        # the dashboard serves the state API that says where each replica runs
        head_node_args={
            "num_cpus": 1,
            "resources": {"cloud": 2},
            "include_dashboard": True,
            "dashboard_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=1, resources={"edge": 1})
    settings = ServeSettings(
        keys_file=keys_file,
        policy="fixed",
        prefix_cache=PrefixCacheSettings(enabled=False),
        engine=DeploymentSettings(num_replicas=2, num_cpus=0.3, resources={"cloud": 1}),
        drafter_pool=DrafterPoolSettings(num_cpus=0.5, resources={"edge": 1}),
        gateway=DeploymentSettings(num_cpus=0.1),
    )
    port = free_port()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings.model_dump(mode="json")), name="covspec", route_prefix="/")
        with ThreadPoolExecutor(len(seeds)) as pool:
            answers = list(pool.map(lambda s: ask(f"http://127.0.0.1:{port}", key, s), seeds))
        handle = serve.get_deployment_handle("DrafterPool", app_name="covspec")
        return {
            "answers": answers,
            "placement": placement(),
            "engines_served": handle.engines_served.remote().result(),
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]])))
