"""Run the app in this process on a free 127.0.0.1 port (uvicorn in a thread): for tests, the soak
script and notebooks that want a real HTTP server without a second process."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ..api.serve.server import create_app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveServer:
    """`with LiveServer(pipe, "name") as live: httpx.get(live.url + "/health")`."""

    def __init__(self, pipe, model_name: str, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.pipe = pipe
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(pipe, model_name), host=host, port=self.port, log_level=log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def read_metrics(url: str) -> dict[str, float]:
    """/metrics as {name or name{label=value}: value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    """Poll /metrics until no request holds or waits for KV blocks; returns the last reading."""
    deadline = time.time() + timeout
    while True:
        m = read_metrics(url)
        if m["kvcrush_kv_blocks_used"] == 0 and m["kvcrush_requests_running"] == 0 and m["kvcrush_requests_waiting"] == 0:
            return m
        if time.time() > deadline:
            raise TimeoutError(f"server not idle after {timeout} s: {m}")
        time.sleep(0.05)
