"""What the engine shape promises: request hooks instead of evaluation inside the engine, policy state
owned by the policy, real log-prob scores, and sampling/scoring checks that can fail."""
from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

import kvcrush_ov
from kvcrush_ov import CacheEvictionConfig, SchedulerConfig
from kvcrush_ov.core.config import GenerationConfig
from kvcrush_ov.core.engine.attention_scores import window_probabilities
from kvcrush_ov.core.engine.llm_engine import LLMEngine
from kvcrush_ov.core.engine.sampler import sample
from kvcrush_ov.tools.eval.teacher import FullCacheReference, log_softmax
from kvcrush_ov.tools.models import prepare
from kvcrush_ov.core.policies import H2O

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": ov.Type.f32}
PROMPT = "Explain how paged attention stores keys and values in fixed-size blocks. " * 8
SMALL = {"sink_tokens": 4, "recent_tokens": 16}


def engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.05, **kw), F32, enable_eviction=True)


def finish(e: LLMEngine) -> None:
    while e.has_unfinished:
        e.step()
        e.blocks.check_invariants()


@pytest.fixture(scope="module")
def ids(tiny_llama_dir) -> list[int]:
    return kvcrush_ov.Tokenizer(tiny_llama_dir).prepare(PROMPT, True)


# -- sampling ----------------------------------------------------------------------------------------
def test_top_p_samples_only_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = [sample(logits, GenerationConfig(do_sample=True, top_p=0.75), rng) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 are cut
    share = draws.count(0) / len(draws)
    assert abs(share - 0.5 / 0.8) < 0.08  # renormalised inside the nucleus
    assert {sample(logits, GenerationConfig(do_sample=True, top_p=0.4), rng) for _ in range(50)} == {0}


# -- scores: real cumulative log-probabilities -------------------------------------------------------
def test_scores_are_cumulative_logprobs_of_the_generated_tokens(tiny_llama_dir, ids):
    e = engine(tiny_llama_dir)
    rows = []
    s = e.add_request(ids, GenerationConfig(max_new_tokens=5, ignore_eos=True),
                      logits_observer=lambda seq, row: rows.append(row.astype(np.float64)))
    finish(e)
    expected = sum(log_softmax(r)[t] for r, t in zip(rows, s.output_ids))
    assert len(rows) == 5 and s.cumulative_logprob < 0
    assert s.cumulative_logprob == pytest.approx(expected, rel=0, abs=1e-6 * len(rows))  # float32 exp: ~1e-7 a token


# -- hooks: a token source and a logits observer -----------------------------------------------------
def test_token_source_replays_a_continuation_and_ends_the_request(tiny_llama_dir, ids):
    e = engine(tiny_llama_dir)
    forced = [17, 23, 99]
    s = e.add_request(ids, GenerationConfig(max_new_tokens=10, ignore_eos=True),
                      token_source=lambda seq: forced[seq.num_generated] if seq.num_generated < len(forced) else None)
    finish(e)
    assert s.output_ids == forced and s.finish_reason.value == "length"
    assert e.blocks.num_used_blocks == 0


def test_forced_fork_with_budget_above_the_prompt_has_zero_kl(tiny_llama_dir, ids):
    """A fork that never evicts sees exactly the parent's cache: its teacher-forced KL is 0 and its NLL
    equals the full cache's (computed from the rows, not set by the runner)."""
    e = engine(tiny_llama_dir)
    cfg = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    reference = FullCacheReference()
    parent = e.add_request(ids, cfg, eviction=None, logits_observer=reference.observe, query_window=8)
    while parent.num_generated == 0:
        e.step()
    big = CacheEvictionConfig("snapkv", budget=len(ids) + 64, options={**SMALL, "window": 8})
    small = CacheEvictionConfig("snapkv", budget=40, options={**SMALL, "window": 8})
    runs = {}
    for name, ev in (("big", big), ("small", small)):
        run = reference.forced_run()
        child = e.fork(parent, cfg, ev, token_source=run.next_token, logits_observer=run.observe)
        runs[name] = (run, child)
    finish(e)
    assert runs["big"][1].output_ids == parent.output_ids == runs["small"][1].output_ids  # forced
    assert runs["big"][0].count == 7 and runs["big"][0].kl < 1e-9
    assert runs["big"][0].nll == pytest.approx(reference.nll(parent.output_ids), abs=1e-6)
    assert runs["small"][1].metrics.evictions >= 1 and runs["small"][0].kl > 1e-6
    assert e.blocks.num_used_blocks == 0


def test_fork_needs_the_parents_query_window(tiny_llama_dir, ids):
    e = engine(tiny_llama_dir)
    parent = e.add_request(ids, GenerationConfig(max_new_tokens=4), eviction=None)
    while parent.num_generated == 0:
        e.step()
    with pytest.raises(kvcrush_ov.KVCrushError, match="query_window"):
        e.fork(parent, None, CacheEvictionConfig("snapkv", budget=40, options={**SMALL, "window": 8}))
    e.abort(parent.seq_id)
    assert e.blocks.num_used_blocks == 0


# -- policy state: H2O owns its accumulator ----------------------------------------------------------
def test_h2o_accumulates_across_evictions_and_follows_compaction():
    """Simulate several evictions of one sequence: each adds a window's scores for the slots held, then
    compaction keeps some slots per KV head. The policy's state must equal, slot by slot, the sum a
    reference keeps per (layer, query head, true token)."""
    rng = np.random.default_rng(0)
    L, hq, hkv = 2, 4, 2
    policy = H2O(sink_tokens=2, recent_tokens=4)
    held = np.tile(np.arange(30), (L, hkv, 1))  # true token of each slot, per (layer, KV head)
    reference: dict[tuple[int, int, int], float] = {}
    state, next_token = None, 30
    for _ in range(4):
        T = held.shape[2]
        scores = rng.random((L, hq, T)).astype(np.float32)
        for l in range(L):
            for h in range(hq):
                for t in range(T):
                    key = (l, h, int(held[l, h // (hq // hkv), t]))
                    reference[key] = reference.get(key, 0.0) + float(scores[l, h, t])
        state, ranked = policy.update(state, scores)
        for l in range(L):
            for h in range(hq):
                got = [ranked[l, h, t] for t in range(T)]
                want = [reference[(l, h, int(held[l, h // (hq // hkv), t]))] for t in range(T)]
                np.testing.assert_allclose(got, want, rtol=1e-5)
        mask = policy.keep_mask(kvcrush_ov.core.policies.AttentionStats(ranked, hkv), 16)
        keep = np.nonzero(mask)[2].reshape(L, hkv, 16)
        state = policy.compact(state, keep)
        held = np.take_along_axis(held, keep, axis=2)
        grow = np.arange(next_token, next_token + 8)  # 8 new tokens decoded since
        held = np.concatenate([held, np.tile(grow, (L, hkv, 1))], axis=2)
        next_token += 8
    assert state.shape == (L, hq, 16)


def test_h2o_state_lives_in_the_evictor_and_matches_the_slots(tiny_llama_dir, ids):
    e = engine(tiny_llama_dir)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=100, ignore_eos=True),
                      eviction=CacheEvictionConfig("h2o", budget=40, options=SMALL))
    while s.metrics.evictions < 3:
        e.step()
    st = e.evictor.state(s)
    assert st.policy_state.shape == (e.runner.num_layers, e.runner.num_q_heads, e.blocks.cache_len(s.seq_id))
    finish(e)
    assert e.blocks.num_used_blocks == 0


class _UnevenPolicy(H2O):
    """Keeps one slot more in KV head 0 than in the others (a broken policy)."""

    def keep_mask(self, stats, budget):
        mask = super().keep_mask(stats, budget)
        first = mask[0, 0]
        first[np.flatnonzero(~first)[:1]] = True
        return mask


def test_a_policy_keeping_different_counts_per_kv_head_is_refused(tiny_llama_dir, ids):
    e = engine(tiny_llama_dir)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True),
                      eviction=CacheEvictionConfig(_UnevenPolicy(sink_tokens=4, recent_tokens=16), budget=40))
    with pytest.raises(kvcrush_ov.KVCrushError, match="same count in every KV head"):
        finish(e)
    e.abort(s.seq_id)
    assert e.blocks.num_used_blocks == 0


# -- decode-time scores after a compaction, against HF ---------------------------------------------
def test_decode_scores_after_compaction_match_masked_hf_attention(ids):
    """After StreamingLLM compacts the prompt (the same slots in every head), each decode query's
    per-head probabilities over the compacted cache must equal HF eager attention at the true position
    with the evicted positions masked out."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvcrush_ov.tools.models import hf_dir
    model_dir = prepare("tiny-llama", "fp32")
    budget = 40
    e = LLMEngine(model_dir, "CPU", SchedulerConfig(cache_size=0.05, max_num_batched_tokens=len(ids)), F32,
                  enable_eviction=True)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=8, ignore_eos=True),
                      eviction=CacheEvictionConfig("streaming", budget=budget, options=SMALL, prefill="after"),
                      query_window=1)
    e.step()  # prefill + eviction to the budget
    assert s.metrics.evictions == 1 and e.blocks.cache_len(s.seq_id) == budget
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("tiny-llama"), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    n = len(ids)
    visible = list(range(4)) + list(range(n - (budget - 4), n))
    with torch.no_grad():
        cache = hf(torch.tensor([ids]), use_cache=True).past_key_values
        for step in range(1, 4):
            e.step()  # one decode step: the newest query is the one just fed
            pos = n + step - 1
            visible.append(pos)
            mask = torch.full((1, 1, 1, pos + 1), float("-inf"))
            mask[..., visible] = 0.0
            o = hf(torch.tensor([[s.token_ids[pos]]]), past_key_values=cache, attention_mask=mask,
                   position_ids=torch.tensor([[pos]]), use_cache=True, output_attentions=True)
            cache = o.past_key_values
            T = e.blocks.cache_len(s.seq_id)
            assert T == len(visible)
            for layer in range(e.runner.num_layers):
                keys = e.runner.kv.read_keys(layer, e.blocks.tables[s.seq_id][layer], T)
                ours = window_probabilities(e.evictor.state(s).queries[layer, -1:], keys,
                                            e.runner.softmax_scales[layer])[:, 0]  # [Hq, T]
                ref = o.attentions[layer][0, :, 0, visible].numpy()
                np.testing.assert_allclose(ours, ref, atol=1e-5)
    finish(e)


def test_probe_of_the_prompt_tail_scores_compactions_inside_the_prompt(tiny_llama_dir, ids):
    """prefill_scores="probe": the prompt's last tokens run first, alone, at their true positions; the
    caller never sees that internal request, and aborting the request ends its probe too."""
    e = engine(tiny_llama_dir)
    ev = CacheEvictionConfig("snapkv", budget=40, options={**SMALL, "window": 8}, prefill="chunked",
                             prefill_chunk=32, prefill_scores="probe", prefill_window=16)
    seen = []
    s = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=ev)
    assert len(e.sequences) == 2  # the request and its probe
    probe = next(p for p in e.sequences.values() if p is not s)
    assert probe.token_ids == ids[-16:] and probe.position_offset == len(ids) - 16
    while e.has_unfinished:
        seen += e.step()
        e.blocks.check_invariants()
        if s.seq_id in e.evictor._probes:
            assert e.evictor._probes[s.seq_id].shape[1] == 16
    assert seen == [s] and s.num_generated == 4 and s.metrics.evictions >= (len(ids) - 40) // 32
    assert e.blocks.num_used_blocks == 0 and not e.evictor._probes
    s2 = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=ev)
    e.abort(s2.seq_id)
    assert not e.has_unfinished and not e.sequences and e.blocks.num_used_blocks == 0


def test_reread_scores_the_prompt_with_the_tail_of_a_first_bounded_read(tiny_llama_dir, ids):
    """prefill_scores="reread": the whole prompt is first read memory-bounded (with a tail probe of its
    own); the request starts only when that read is done, so the two never hold memory together, and its
    compactions inside the prompt are scored by the first read's last queries, which saw the document."""
    e = engine(tiny_llama_dir)
    ev = CacheEvictionConfig("snapkv", budget=40, options={**SMALL, "window": 8}, prefill="chunked",
                             prefill_chunk=32, prefill_scores="reread", prefill_window=16)
    s = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=ev)
    assert len(e.sequences) == 3 and s not in e.scheduler.seqs  # the request, its first read, that read's probe
    reader = next(p for p in e.sequences.values() if p is not s and p.token_ids == ids)
    tail = next(p for p in e.sequences.values() if p not in (s, reader))
    assert tail.token_ids == ids[-16:] and reader.eviction.probe and not reader.eviction.reread
    seen, tail_queries, reread_queries = [], None, None
    while e.has_unfinished:
        seen += e.step()
        e.blocks.check_invariants()
        assert not (s in e.scheduler.seqs and reader in e.scheduler.seqs)
        tail_queries = e.evictor._probes.get(reader.seq_id, tail_queries)
        reread_queries = e.evictor._probes.get(s.seq_id, reread_queries)
    assert seen == [s] and s.num_generated == 4 and s.metrics.evictions >= (len(ids) - 40) // 32
    assert reread_queries.shape[1] == 16 and tail_queries.shape == reread_queries.shape
    np.testing.assert_allclose(reread_queries[0], tail_queries[0], atol=1e-5)  # layer 0 sees only the token
    assert not np.allclose(reread_queries[-1], tail_queries[-1], atol=1e-3)  # deeper ones read the document
    assert e.blocks.num_used_blocks == 0 and not e.evictor._probes and not e.sequences
    s2 = e.add_request(ids, GenerationConfig(max_new_tokens=4, ignore_eos=True), eviction=ev)
    e.step()
    e.abort(s2.seq_id)
    assert s2.is_finished and not e.has_unfinished and not e.sequences and e.blocks.num_used_blocks == 0


def test_memory_bounded_compactions_keep_spans_by_default(tiny_llama_dir):
    """Inside a prompt (memory-bounded) the policy also keeps what follows a well-scored token; after
    the prompt it is the configured one; prefill_pool_back=0 turns that off."""
    e = engine(tiny_llama_dir)
    plan = e.evictor.plan(CacheEvictionConfig("kvcrush", budget=40, options=SMALL))
    assert plan.prefill_policy.base.pool_back == 6 and plan.policy.base.pool_back == 0
    off = e.evictor.plan(CacheEvictionConfig("kvcrush", budget=40, options=SMALL, prefill_pool_back=0))
    assert off.prefill_policy == off.policy
    with pytest.raises(kvcrush_ov.ConfigError, match="prefill_pool_back"):
        CacheEvictionConfig("kvcrush", prefill_pool_back=-1)


# -- streaming: one detokenizer call per step for all streaming requests -----------------------------
class CountingDecoder:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.single, self.batches = tokenizer, 0, []

    def decode(self, ids: list[int]) -> str:
        self.single += 1
        return self.tokenizer.decode(ids)

    def decode_batch(self, ids: list[list[int]]) -> list[str]:
        self.batches.append(len(ids))
        return self.tokenizer.decode_batch(ids)


def test_streams_of_a_step_are_detokenized_in_one_call(tiny_llama_dir, ids):
    tok = kvcrush_ov.Tokenizer(tiny_llama_dir)
    dec = CountingDecoder(tok)
    e = LLMEngine(tiny_llama_dir, "CPU", SchedulerConfig(cache_size=0.05), F32, decode=dec.decode)
    pieces: list[list[str]] = [[], [], []]
    seqs = [e.add_request(ids[: 20 + 7 * i], GenerationConfig(max_new_tokens=6 + i, ignore_eos=True,
                                                              stop_strings={"zzzz"} if i == 2 else set()),
                          streamer=pieces[i].append) for i in range(3)]
    finish(e)
    assert dec.single == 0 and dec.batches and max(dec.batches) == 3
    for s, p in zip(seqs, pieces):
        assert "".join(p) == s.text == tok.decode(s.output_ids) and s.num_generated == s.config.max_new_tokens


def test_batched_token_logprobs_equal_each_row_alone():
    """The step's one log-prob call gives, bit for bit, what each row computed alone gives, and the true
    (float64) log-probability to float32 accuracy, for rows of bf16-valued logits as the model returns."""
    from kvcrush_ov.core.engine.llm_engine import token_logprob
    from kvcrush_ov.core.engine.sampler import token_logprobs
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 49152)) * 4 + 20).astype(np.float32)
    logits = (logits.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 values, as the model returns
    tokens = rng.integers(0, 49152, 6)
    tokens[0] = logits[0].argmax()
    rows = np.array([4, 0, 5])
    batched = token_logprobs(logits, tokens[rows], rows)
    assert batched.tolist() == [token_logprob(logits[r], int(t)) for r, t in zip(rows, tokens[rows])]
    exact = [float(log_softmax(logits[r].astype(np.float64))[t]) for r, t in zip(rows, tokens[rows])]
    assert batched == pytest.approx(exact, rel=0, abs=1e-6)
    assert token_logprobs(logits, tokens).tolist() == [token_logprob(r, int(t)) for r, t in zip(logits, tokens)]
