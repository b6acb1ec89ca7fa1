"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client and raw httpx
(tiny random-weight Llama: answers are gibberish, but greedy answers must equal the pipeline's own)."""
from __future__ import annotations

import logging
import threading

import httpx
import openai
import pytest

from kvcrush_ov import SchedulerConfig
from kvcrush_ov.api.continuous_batching import ContinuousBatchingPipeline
from kvcrush_ov.tools.live_server import LiveServer, read_metrics, wait_idle

NUM_BLOCKS = 64  # x 32 tokens: 2048 KV slots, half the model's 4096-token context (so some requests never fit)
MODEL = "tiny-llama"


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Live(LiveServer):
    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def wait_idle(self) -> dict[str, float]:
        return wait_idle(self.url, 30)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    pipe = ContinuousBatchingPipeline(tiny_llama_dir, SchedulerConfig(num_kv_blocks=NUM_BLOCKS))
    logs = LogRecords()
    logging.getLogger().addHandler(logs)
    with Live(pipe, MODEL) as live:
        live.logs, live.bytes_per_token = logs, pipe.engine.kv_bytes_per_token
        yield live
    logging.getLogger().removeHandler(logs)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected_chat(pipe, content: str, n: int) -> str:
    return pipe.generate(content, pipe.config(max_new_tokens=n, ignore_eos=True))[0].m_generation_ids[0]


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = server.metrics()
    for name in ("kvcrush_requests_running", "kvcrush_requests_waiting", "kvcrush_kv_blocks_used",
                 "kvcrush_kv_blocks_free", "kvcrush_evictions_total", "kvcrush_tokens_evicted_total",
                 "kvcrush_prompt_tokens_per_second", "kvcrush_generation_tokens_per_second"):
        assert name in m, name
    assert m["kvcrush_kv_blocks_free"] == NUM_BLOCKS


def test_chat_equals_the_pipeline_and_streams_the_same_text(server, client):
    question = "Why is the sky blue?"
    ref = expected_chat(server.pipe, question, 20)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == ref and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens > 5
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20


def test_completions_stream_and_not(server, client):
    prompt = "Once upon a time"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert r.choices[0].text and streamed == r.choices[0].text and r.usage.completion_tokens == 12
    ids = server.pipe.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == r.choices[0].text
    default = client.completions.create(model=MODEL, prompt=prompt, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        stop=[r.choices[0].text[3:6]], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and len(stopped.choices[0].text) <= 3 + 2


def test_concurrent_clients_batch_and_match(server, client):
    prompts = [f"Story number {i}:" for i in range(8)]
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    steps0 = server.metrics()["kvcrush_engine_steps_total"]
    results: dict[int, str] = {}

    def ask(i):
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == expected
    # 8 x 17 steps if served one by one; batched they share most steps
    assert server.metrics()["kvcrush_engine_steps_total"] - steps0 < 8 * 17 / 2


def test_per_request_eviction_override(server, client):
    before = server.metrics()
    long_prompt = "The harbor lights were blinking in the fog. " * 60
    r = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=8, temperature=0,
                                  extra_body={"kv_cache_eviction": {"policy": "snapkv", "budget": 128}})
    assert r.usage.prompt_tokens > 128
    after = server.metrics()
    assert after["kvcrush_evictions_total"] > before["kvcrush_evictions_total"]
    assert after["kvcrush_tokens_evicted_total"] - before["kvcrush_tokens_evicted_total"] >= r.usage.prompt_tokens - 128
    full = client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=8, temperature=0,
                                     extra_body={"kv_cache_eviction": {"policy": "full"}})
    assert server.metrics()["kvcrush_evictions_total"] == after["kvcrush_evictions_total"] and full.choices[0].text


def test_per_request_decode_slack_evicts_less_often(server, client):
    """`decode_slack` in the override reaches the engine: decoding 64 tokens past the budget compacts
    at every block without it and not at all with 64 tokens of slack (the prompt is compacted in both)."""
    prompt = "The harbor lights were blinking in the fog. " * 60

    def evictions(**extra) -> float:
        before = server.metrics()["kvcrush_evictions_total"]
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0, extra_body={
            "ignore_eos": True, "kv_cache_eviction": {"policy": "snapkv", "budget": 128, **extra}})
        return server.metrics()["kvcrush_evictions_total"] - before

    every_block, slack = evictions(), evictions(decode_slack=64, prefill="after")
    assert 1 <= slack < every_block, (slack, every_block)


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server):
    server.wait_idle()
    cancelled0 = server.metrics().get("kvcrush_requests_finished_total{status=cancel}", 0)
    body = {"model": MODEL, "prompt": "Tell me everything. " * 100, "max_tokens": 1500, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events += 1
                if events == 3:
                    break  # leave with the request mid-generation
    m = server.wait_idle()
    assert m["kvcrush_requests_finished_total{status=cancel}"] == cancelled0 + 1
    assert m["kvcrush_kv_blocks_free"] == NUM_BLOCKS


BAD = [
    ("/v1/chat/completions", b"{not json", "malformed JSON"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages is empty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": ""}]}, "empty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, "unknown model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**6}, "maximum position"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 5000, "max_tokens": 4}, "maximum position"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "empty"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, "vocabulary"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, "n=2"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "magic", "budget": 64}},
     "unknown policy"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv", "budget": 0}},
     "budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv", "budget": "big"}},
     "budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv"}}, "budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv", "budget": 10**6}},
     "budget"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "kvcrush", "budget": 64,
                                                                               "options": {"nonsense": 1}}}, "nonsense"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv", "budget": 64,
                                                                               "decode_slack": -16}}, "decode_slack"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "kv_cache_eviction": {"policy": "snapkv", "budget": 64,
                                                                               "prefill": "later"}}, "prefill"),
]


@pytest.mark.parametrize("path, body, needle", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_error_object_and_the_server_serves_on(server, client, path, body, needle):
    n_logs = len(server.logs.records)
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle.lower() in err["message"].lower() and "\n" not in err["message"], err
    assert err["type"] == "invalid_request_error"
    new = server.logs.records[n_logs:]
    assert all(rec.exc_info is None and "\n" not in rec.getMessage() for rec in new), [r.getMessage() for r in new]
    assert "Traceback" not in r.text
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens >= 1


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert "messages is empty" in str(err.value)


def test_a_request_the_pool_can_never_hold_is_a_400_or_runs_memory_bounded(server):
    """Without eviction, a prompt longer than the pool is a one-line 400 (retrying cannot help); with
    eviction configured the same request runs memory-bounded, and one the pool can hold whole is evicted
    after its prompt. Each response and /metrics say which path it took."""
    body = {"model": MODEL, "prompt": "word " * 2100, "max_tokens": 100}  # > 64 blocks x 32 slots
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "KV blocks" in err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"
    before = server.metrics()
    body["kv_cache_eviction"] = {"policy": "streaming", "budget": 256}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["kv_cache"]["eviction_mode"] == "memory_bounded", r.text
    assert r.json()["kv_cache"]["peak_kv_bytes"] < r.json()["usage"]["prompt_tokens"] * server.bytes_per_token / 2
    body["prompt"] = "word " * 1900  # the whole prompt once, then the budget
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["kv_cache"]["eviction_mode"] == "after_prompt", r.text
    assert r.json()["kv_cache"]["peak_kv_bytes"] == r.json()["usage"]["prompt_tokens"] * server.bytes_per_token
    after = server.wait_idle()
    for mode in ("memory_bounded", "after_prompt"):
        key = f"kvcrush_requests_by_eviction_mode_total{{mode={mode}}}"
        assert after[key] == before.get(key, 0) + 1


def test_client_gone_before_a_non_streaming_answer_cancels_it(server):
    server.wait_idle()
    cancelled0 = server.metrics().get("kvcrush_requests_finished_total{status=cancel}", 0)
    body = {"model": MODEL, "prompt": "Tell me everything. " * 100, "max_tokens": 1500, "ignore_eos": True}
    # the client gives up after 0.25 s; the server notices within DISCONNECT_POLL_S, long before 1500 tokens
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.25))
    m = server.wait_idle()
    assert m["kvcrush_requests_finished_total{status=cancel}"] == cancelled0 + 1


def test_kvcrush_ov_serve_command(tiny_llama_dir):
    """The CLI entry point: start `kvcrush-ov serve` as a process, ask it once, stop it."""
    import os
    import subprocess
    import sys
    import time

    from kvcrush_ov.tools.live_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvcrush_ov", "serve", "--model", str(tiny_llama_dir), "--port",
                             str(port), "--num-kv-blocks", "32", "--policy", "snapkv", "--budget", "128",
                             "--served-model-name", "tiny", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt="The harbor lights " * 100, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert read_metrics(url)["kvcrush_evictions_total"] >= 1  # the server's default policy evicted
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "kvcrush_ov", "serve", "--model", str(tiny_llama_dir), "--policy",
                          "magic"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "magic" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
