"""`kvcrush-ov serve`: one uvicorn server, or Ray Serve replicas behind one endpoint (--ray)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path


def served_name(args: argparse.Namespace, model_dir: Path) -> str:
    return args.served_model_name or (args.model if not Path(args.model).exists() else model_dir.name)


def run_serve(args: argparse.Namespace) -> None:
    from ..cli import _model_dir, _scheduler_config
    model_dir = _model_dir(args.model)
    sched = _scheduler_config(args)
    name = served_name(args, model_dir)
    if args.ray:
        from .ray_deploy import run_ray
        run_ray(model_dir, sched, name, replicas=args.replicas, host=args.host, port=args.port, device=args.device,
                num_cpus=args.ray_num_cpus)
        return
    import uvicorn

    from ..continuous_batching import ContinuousBatchingPipeline
    from .server import create_app
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pipe = ContinuousBatchingPipeline(model_dir, sched, args.device)
    uvicorn.run(create_app(pipe, name), host=args.host, port=args.port, log_level=args.log_level)
