"""ContinuousBatchingPipeline and the engine loop: many callers, one batch (tiny random-weight Llama)."""
from __future__ import annotations

import asyncio
import threading

import openvino as ov
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, GenerationConfig, SchedulerConfig
from kvcrush_ov.api.continuous_batching import ContinuousBatchingPipeline, GenerationStatus
from kvcrush_ov.core.errors import KVCrushError, PromptError

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves on a river.",
           "List three prime numbers.", "Explain paged attention in two sentences. " * 6]


@pytest.fixture(scope="module")
def cb(tiny_llama_dir) -> ContinuousBatchingPipeline:
    pipe = ContinuousBatchingPipeline(tiny_llama_dir, SchedulerConfig(cache_size=0.05), properties=F32)
    yield pipe
    pipe.close()


def greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, ignore_eos=True, **kw)


def running_counter(engine):
    """Wrap engine.step to record how many sequences ran together (the loop calls engine.step)."""
    most = [0]
    step = engine.step

    def counted():
        out = step()
        most[0] = max(most[0], engine.metrics().running + len(out))
        return out

    engine.step = counted
    return most, lambda: delattr(engine, "step")


def test_threads_run_batched_and_match_one_at_a_time(tiny_llama_dir):
    """8 threads call LLMPipeline.generate() at once: they share batches (more than one sequence per
    step) and each gets exactly what a lone greedy call returns."""
    pipe = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05), **F32)
    prompts = [f"Question {i}: " + PROMPTS[i % 4] for i in range(8)]
    expected = [pipe.generate(p, max_new_tokens=24, ignore_eos=True).token_ids[0] for p in prompts]
    most, restore = running_counter(pipe.engine)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait()
            results[i] = pipe.generate(prompts[i], max_new_tokens=24, ignore_eos=True).token_ids[0]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    restore()
    assert not errors and not any(th.is_alive() for th in threads)
    assert [results[i] for i in range(8)] == expected
    assert most[0] >= 4, f"at most {most[0]} sequences shared a step: calls were not batched"
    assert pipe.engine.blocks.num_used_blocks == 0 and pipe.loop.thread is None  # idle: no thread left


def test_handle_stream_read_all_and_status(cb):
    h = cb.add_request(7, PROMPTS[1], greedy(12))
    pieces, ids = [], []
    for out in h.stream():
        pieces.append(out.text)
        ids += out.generated_ids
    assert h.get_status() is GenerationStatus.FINISHED and h.request_id == 7
    [whole] = h.read_all()
    assert ids == whole.generated_ids and len(ids) == 12
    assert "".join(pieces) == whole.text == cb.tokenizer.decode(ids)
    ref = cb.generate([PROMPTS[1]], greedy(12))[0]
    assert ref.m_generation_ids == [whole.text] and ref.m_status is GenerationStatus.FINISHED
    ids_res = cb.generate([cb.tokenizer.encode("plain ids", add_special_tokens=True)], greedy(5))[0]
    assert len(ids_res.m_generation_ids[0]) == 5


def test_cancel_frees_blocks_at_once(cb):
    h = cb.add_request("long", PROMPTS[3], greedy(200))
    first = h.read()  # wait for its first token: it holds blocks now
    assert first[0].generated_ids and cb.engine.blocks.num_used_blocks > 0
    h.cancel()  # returns once the loop applied the abort
    assert h.get_status() is GenerationStatus.CANCEL
    assert cb.engine.blocks.num_used_blocks == 0
    assert len(h.sequence.output_ids) < 200


def test_stop_keeps_output_and_others_go_on(cb):
    a = cb.add_request("a", PROMPTS[0], greedy(100))
    b = cb.add_request("b", PROMPTS[2], greedy(10))
    a.read()
    a.stop()
    b.wait(60)
    assert a.get_status() is GenerationStatus.STOP and a.sequence.output_ids
    assert b.get_status() is GenerationStatus.FINISHED and len(b.sequence.output_ids) == 10


def test_a_failing_step_fails_its_requests_not_the_loop(cb):
    runner = cb.engine.runner
    run = runner.run
    calls = [0]

    def breaks_once(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("Exception from src/plugin.cpp:1\ninjected device failure")
        return run(*a, **k)

    runner.run = breaks_once
    try:
        hs = [cb.add_request(i, p, greedy(8)) for i, p in enumerate(PROMPTS[:2])]
        for h in hs:
            assert h.wait(60)
        assert all(h.get_status() is GenerationStatus.FAILED for h in hs)
        assert "injected device failure" in hs[0].error and "\n" not in hs[0].error
        assert cb.engine.blocks.num_used_blocks == 0
    finally:
        del runner.run
    again = cb.add_request("after", PROMPTS[0], greedy(4))
    assert again.wait(60) and again.get_status() is GenerationStatus.FINISHED


def test_bad_input_raises_in_the_caller_and_the_loop_serves_on(cb):
    with pytest.raises(PromptError, match="vocabulary"):
        cb.add_request(1, [10**9], greedy(4))
    with pytest.raises(PromptError, match="maximum position"):
        cb.add_request(2, PROMPTS[0], greedy(10**6))
    with pytest.raises(KVCrushError, match="policy"):
        cb.add_request(3, PROMPTS[0], greedy(4), eviction={"policy": "nope", "budget": 64})
    with pytest.raises(PromptError, match="flat"):
        cb.add_request(4, [[1, 2], [3, 4]], greedy(4))
    h = cb.add_request(5, PROMPTS[0], greedy(3))
    assert h.wait(60) and len(h.sequence.output_ids) == 3


def test_per_request_eviction(cb):
    """One batch, two settings: the streaming request evicts down to its budget, the full one does not
    and answers exactly like a full-cache request alone."""
    long_prompt = PROMPTS[3] * 3
    alone = cb.generate([long_prompt], greedy(40), eviction=None)[0].token_ids
    before = cb.get_metrics().engine.evictions
    small = CacheEvictionConfig("streaming", budget=64, options={"sink_tokens": 4, "recent_tokens": 16})
    full, evicted = cb.generate([long_prompt, long_prompt], greedy(40), eviction=[None, small])
    m = cb.get_metrics().engine
    assert full.token_ids == alone
    assert m.evictions > before and m.tokens_evicted > 0
    assert evicted.num_prompt_tokens > 64


def test_asyncio_tasks_share_the_batch(cb):
    async def one(i):
        h = cb.loop.add([(i, cb.prompt_ids(PROMPTS[i % 4], greedy(6)), greedy(6), "default")], text=True)[0]
        return "".join([out.text async for out in h.astream()]), h

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    for text, h in asyncio.run(main()):
        assert h.get_status() is GenerationStatus.FINISHED and text == h.final_text
    m = cb.get_metrics()
    assert m.generation_tokens > 0 and m.prompt_tokens > 0 and m.requests_active == 0


def test_a_bug_in_the_loop_fails_requests_instead_of_hanging_them(cb):
    loop = cb.loop
    publish = loop._publish
    calls = [0]

    def breaks_once():
        calls[0] += 1
        if calls[0] == 2:
            raise ValueError("injected bug")
        return publish()

    loop._publish = breaks_once
    try:
        h = cb.add_request("x", PROMPTS[0], greedy(20))
        assert h.wait(60) and h.get_status() is GenerationStatus.FAILED and "injected bug" in h.error
    finally:
        del loop._publish
    assert cb.engine.blocks.num_used_blocks == 0
    again = cb.add_request("y", PROMPTS[0], greedy(3))
    assert again.wait(60) and again.get_status() is GenerationStatus.FINISHED


def test_llm_pipeline_takes_per_request_eviction(tiny_llama_dir):
    pipe = kvcrush_ov.LLMPipeline(tiny_llama_dir, scheduler_config=SchedulerConfig(cache_size=0.05),
                                  enable_eviction=True, **F32)
    prompt = PROMPTS[3] * 3
    small = CacheEvictionConfig("streaming", budget=64, options={"sink_tokens": 4, "recent_tokens": 16})
    res = pipe.generate(prompt, max_new_tokens=8, eviction=small)
    full = pipe.generate(prompt, max_new_tokens=8)
    assert res.evictions[0] >= 1 and res.kv_bytes[0] < full.kv_bytes[0] and full.evictions[0] == 0
