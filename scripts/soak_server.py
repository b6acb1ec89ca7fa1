#!/usr/bin/env python3
"""Server soak (a bounded benchmark, localhost only): random OpenAI requests against a live server.

500 requests by default from 8 concurrent clients: chat and completions, streaming or not, per-request
eviction overrides, bad requests (each must be a 400 with a one-line error object), requests the pool
can never hold (503), and streaming clients that disconnect mid-answer. At the end the server must be
idle with zero KV blocks in use, /health must be ok and one more request must be answered; the
script prints counts per outcome and exits 1 otherwise.

    .venv/bin/python scripts/soak_server.py                       # tiny-llama, 500 requests
    .venv/bin/python scripts/soak_server.py --requests 100 --model smollm2-135m
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcrush_ov import SchedulerConfig  # noqa: E402
from kvcrush_ov.api.continuous_batching import ContinuousBatchingPipeline  # noqa: E402
from kvcrush_ov.tools.models import MODELS, prepare  # noqa: E402
from kvcrush_ov.tools.live_server import LiveServer, read_metrics, wait_idle  # noqa: E402

WORDS = "river stone light garden paper window morning signal number market music forest silver".split()
NAME = "soak"
BAD = [
    b"{not json",
    {"model": NAME, "messages": []},
    {"model": "other-model", "prompt": "hi"},
    {"model": NAME, "prompt": "hi", "max_tokens": 0},
    {"model": NAME, "prompt": "hi", "max_tokens": 10**7},
    {"model": NAME, "prompt": "", "max_tokens": 4},
    {"model": NAME, "prompt": "hi", "n": 3},
    {"model": NAME, "prompt": "hi", "kv_cache_eviction": {"policy": "nope", "budget": 64}},
    {"model": NAME, "prompt": "hi", "kv_cache_eviction": {"policy": "kvcrush", "budget": -1}},
    {"model": NAME, "prompt": [-4, 2]},
]
POLICIES = [None, {"policy": "full"}, {"policy": "snapkv", "budget": 128}, {"policy": "kvcrush", "budget": 192},
            {"policy": "streaming", "budget": 96}, {"policy": "h2o", "budget": 128}]


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def one_request(http: httpx.Client, url: str, rng: random.Random, too_big_words: int) -> str:
    kind = rng.choices(["good", "stream", "disconnect", "bad", "too_big"], weights=[40, 25, 15, 15, 5])[0]
    if kind == "bad":
        body = rng.choice(BAD)
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = http.post(url + "/v1/completions", **kw)
        err = r.json().get("error", {})
        ok = r.status_code == 400 and err.get("message") and "\n" not in err["message"]
        return "bad->400" if ok else f"bad->UNEXPECTED {r.status_code} {r.text[:200]}"
    if kind == "too_big":
        r = http.post(url + "/v1/completions", json={"model": NAME, "prompt": "word " * too_big_words, "max_tokens": 8})
        return "too_big->503" if r.status_code == 503 else f"too_big->UNEXPECTED {r.status_code} {r.text[:200]}"
    chat = rng.random() < 0.5
    body: dict = {"model": NAME, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0, 0.7]),
                  "seed": rng.randint(0, 1000), "ignore_eos": rng.random() < 0.5}
    prompt = text(rng, 3, 400)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    ev = rng.choice(POLICIES)
    if ev is not None:
        body["kv_cache_eviction"] = ev
    path = url + ("/v1/chat/completions" if chat else "/v1/completions")
    if kind == "good":
        r = http.post(path, json=body)
        return "good->200" if r.status_code == 200 and r.json()["choices"] else f"good->UNEXPECTED {r.status_code} {r.text[:200]}"
    body["stream"] = True
    leave_after = rng.randint(1, 5) if kind == "disconnect" else None
    events = 0
    with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return f"{kind}->UNEXPECTED {r.status_code}"
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "stream->done" if kind == "stream" else "disconnect->finished first"
            if "error" in json.loads(line[6:]):
                return f"{kind}->UNEXPECTED error event {line[:200]}"
            events += 1
            if leave_after is not None and events >= leave_after:
                return "disconnect->left"
    return f"{kind}->UNEXPECTED stream ended without [DONE]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-kv-blocks", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = ap.parse_args()
    model_dir = prepare(args.model) if args.model in MODELS else Path(args.model)
    pipe = ContinuousBatchingPipeline(model_dir, SchedulerConfig(num_kv_blocks=args.num_kv_blocks))
    too_big_words = args.num_kv_blocks * pipe.engine.runner.block_size + 64
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    counter = iter(range(args.requests))
    t0 = time.time()

    with LiveServer(pipe, NAME) as live:
        def worker(w: int) -> None:
            rng = random.Random(args.seed * 1000 + w)
            with httpx.Client(timeout=120) as http:
                for _ in counter:  # shared iterator: next() on a range iterator is atomic in CPython
                    if time.time() - t0 > args.timeout:
                        return
                    try:
                        outcome = one_request(http, live.url, rng, too_big_words)
                    except Exception as e:  # a transport failure is a finding, not a crash of the soak
                        outcome = f"client->UNEXPECTED {type(e).__name__}: {e}"
                    with lock:
                        outcomes[outcome] += 1

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = wait_idle(live.url, 120)
        health = httpx.get(live.url + "/health", timeout=30).json()
        final = httpx.post(live.url + "/v1/completions", timeout=60, json={"model": NAME, "prompt": "still there?",
                                                                          "max_tokens": 4})
        m = read_metrics(live.url)
    dt = time.time() - t0
    for outcome, n in sorted(outcomes.items()):
        print(f"{n:5d}  {outcome}")
    finished = {k.split("=")[1].rstrip("}"): int(v) for k, v in m.items() if k.startswith("kvcrush_requests_finished")}
    print(f"{sum(outcomes.values())} requests in {dt:.0f} s; finished by status {finished}; evictions "
          f"{int(m['kvcrush_evictions_total'])}, preemptions {int(m['kvcrush_preemptions_total'])}; KV blocks in use "
          f"{int(m['kvcrush_kv_blocks_used'])}/{int(m['kvcrush_kv_blocks_total'])}; health {health['status']}; "
          f"final request {final.status_code}")
    bad = [o for o in outcomes if "UNEXPECTED" in o]
    ok = (not bad and m["kvcrush_kv_blocks_used"] == 0 and health["status"] == "ok" and final.status_code == 200
          and sum(outcomes.values()) == args.requests)
    print("soak: OK" if ok else f"soak: FAILED {bad}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
