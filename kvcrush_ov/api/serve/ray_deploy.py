"""The same OpenAI app as Ray Serve replicas: each replica owns one engine; Ray's proxy spreads
requests over them behind one endpoint. Scale-out is Ray's: start `ray start --head` on one machine,
`ray start --address HEAD:6379` on the others, then `kvcrush-ov serve --ray --replicas N` (with
RAY_ADDRESS=auto, or from the head) places the replicas across the cluster.

    from kvcrush_ov.api.serve.ray_deploy import build_app
    serve.run(build_app(model_dir, SchedulerConfig(...), "smollm2", replicas=2), route_prefix="/")
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ray import serve


@serve.ingress()
class KVCrushReplica:
    """One replica: a ContinuousBatchingPipeline and the app over it (built on the replica)."""

    def __init__(self, model_dir: str, scheduler_config: Any, model_name: str, device: str = "CPU") -> None:
        from ..continuous_batching import ContinuousBatchingPipeline
        self.pipe = ContinuousBatchingPipeline(model_dir, scheduler_config, device)
        self.model_name = model_name

    def __serve_build_asgi_app__(self):
        from .server import create_app
        replica = f"{serve.get_replica_context().replica_id.unique_id}@{os.uname().nodename}"
        return create_app(self.pipe, self.model_name, replica=replica)


def build_app(model_dir: str | Path, scheduler_config: Any, model_name: str, replicas: int = 1, device: str = "CPU",
              num_cpus: float = 1.0):
    """A bound Ray Serve application of `replicas` engine replicas (num_cpus each, for placement)."""
    deployment = serve.deployment(KVCrushReplica, name="kvcrush", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": num_cpus})
    return deployment.bind(str(model_dir), scheduler_config, model_name, device)


def run_ray(model_dir: Path, scheduler_config: Any, model_name: str, replicas: int, host: str, port: int,
            device: str = "CPU", num_cpus: float = 1.0) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, deploy, and serve until interrupted."""
    import ray
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(model_dir, scheduler_config, model_name, replicas, device, num_cpus), name="kvcrush",
              route_prefix="/")
    print(f"serving {model_name} on http://{host}:{port} with {replicas} Ray Serve replica(s); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
