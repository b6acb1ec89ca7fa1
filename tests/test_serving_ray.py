"""Ray Serve: a local single-node cluster, 2 replicas of the app, one endpoint; both replicas answer."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

import httpx
import pytest

from kvcrush_ov import SchedulerConfig
from kvcrush_ov.tools.live_server import free_port

pytestmark = pytest.mark.slow  # starts Ray (~20-40 s on 2 cores)


def test_two_replicas_answer_through_one_endpoint(tiny_llama_dir):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from kvcrush_ov.api.serve.ray_deploy import build_app

    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(tiny_llama_dir, SchedulerConfig(num_kv_blocks=64), "tiny-llama", replicas=2,
                            num_cpus=0.5), name="kvcrush", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        seen: dict[str, list[str]] = {}
        lock = threading.Lock()

        def ask(i: int) -> None:
            r = httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "tiny-llama", "prompt": "Tell me about the sea.", "max_tokens": 8, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            with lock:
                seen.setdefault(r.headers["x-kvcrush-replica"], []).append(r.json()["choices"][0]["text"])

        for _ in range(3):  # concurrent bursts: the router spreads a burst over both replicas
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"answers came from {list(seen)} only"
        texts = {t for answers in seen.values() for t in answers}
        assert len(texts) == 1  # same model, greedy: every replica gives the same answer
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-llama"
        bad = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": ""}, timeout=30)
        assert bad.status_code == 400 and "empty" in bad.json()["error"]["message"]
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
