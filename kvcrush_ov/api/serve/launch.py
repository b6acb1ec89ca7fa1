"""`kvcrush-ov serve`: one uvicorn server, or Ray Serve replicas behind one endpoint (--ray)."""
from __future__ import annotations

import logging
from pathlib import Path

from ...core.config import SchedulerConfig


def served_name(model_arg: str, model_dir: Path, asked: str = "") -> str:
    """The model id clients send: --served-model-name, else the name or directory given to --model."""
    return asked or (model_arg if not Path(model_arg).exists() else model_dir.name)


def run_serve(model_dir: Path, scheduler: SchedulerConfig, name: str, *, device: str = "CPU",
              host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", ray: bool = False,
              replicas: int = 1, ray_num_cpus: float = 1.0) -> None:
    if ray:
        from .ray_deploy import run_ray
        run_ray(model_dir, scheduler, name, replicas=replicas, host=host, port=port, device=device,
                num_cpus=ray_num_cpus)
        return
    import uvicorn

    from ..continuous_batching import ContinuousBatchingPipeline
    from .server import create_app
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipe = ContinuousBatchingPipeline(model_dir, scheduler, device)
    uvicorn.run(create_app(pipe, name), host=host, port=port, log_level=log_level)
