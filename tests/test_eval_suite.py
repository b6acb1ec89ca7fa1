"""Eval data + metrics: scoring functions, JSONL suites, the ruler-mini generator."""

import json
import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcrush_ov.core.errors import ConfigError
from kvcrush_ov.tools.eval import (
    AGGREGATION_TASKS,
    FAITHFULNESS_TASKS,
    RETRIEVAL_TASKS,
    TASKS,
    Sample,
    exact_match_rate,
    kl_divergence,
    load_jsonl,
    load_suite,
    mean_and_ci,
    mean_rouge_l,
    nll,
    rouge_l,
    ruler_mini,
    save_jsonl,
    score,
    target_logprobs,
)


def ws_count(text: str) -> int:
    return len(text.split())


# ----------------------------------------------------------------------------- metrics


class TestScore:
    def test_contains_case_and_whitespace(self):
        assert score("The pass key is  71432.", ["71432"], "contains") == 100.0
        assert score("the NEW\n  york times", ["New York"], "contains") == 100.0
        assert score("nothing here", ["71432"], "contains") == 0.0

    def test_contains_partial_credit(self):
        assert score("12 and 34", ["12", "34", "56", "78"], "contains") == 50.0

    def test_exact(self):
        assert score("  Paris. ", ["paris"], "exact") == 100.0
        assert score('"Paris"', ["Rome", "PARIS"], "exact") == 100.0
        assert score("Paris is nice", ["paris"], "exact") == 0.0

    def test_rouge_l_metric_takes_best_answer(self):
        assert score("the cat sat", ["a dog ran", "the cat sat"], "rouge_l") == pytest.approx(100.0)
        assert 0 < score("the cat sat on the mat", ["the cat"], "rouge_l") < 100

    def test_bad_metric_and_empty_answers(self):
        with pytest.raises(ConfigError, match="unknown metric"):
            score("x", ["x"], "bleu")
        with pytest.raises(ConfigError):
            score("x", [], "contains")

    def test_string_answers_treated_as_one(self):
        assert score("abc", "abc", "contains") == 100.0


class TestRougeL:
    def test_known_value(self):
        # LCS("the cat sat on the mat", "the cat on mat") = the cat on mat (4); P=4/6, R=4/4
        p, r = 4 / 6, 1.0
        assert rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(2 * p * r / (p + r))

    def test_identical_disjoint_symmetric(self):
        assert rouge_l("A b, C!", "a B c") == 1.0
        assert rouge_l("a b c", "x y z") == 0.0
        assert rouge_l("a b c d", "d c a") == rouge_l("d c a", "a b c d")

    def test_empty(self):
        assert rouge_l("", "") == 1.0
        assert rouge_l("...", "word") == 0.0

    def test_order_matters(self):
        # LCS of "a b c" vs "c b a" is 1
        assert rouge_l("a b c", "c b a") == pytest.approx(1 / 3)


class TestFaithfulness:
    def test_exact_match_rate(self):
        assert exact_match_rate(["a b", " c ", "d"], ["a b", "c", "D"]) == pytest.approx(200 / 3)
        assert exact_match_rate(["d"], ["D"], normalized=True) == 100.0

    def test_mean_rouge_l(self):
        assert mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(50.0)

    def test_length_mismatch(self):
        with pytest.raises(ConfigError):
            exact_match_rate(["a"], ["a", "b"])
        with pytest.raises(ConfigError):
            mean_rouge_l([], [])


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class TestTeacherForced:
    def test_nll(self):
        assert nll([math.log(0.5), math.log(0.25)]) == pytest.approx((math.log(2) + math.log(4)) / 2)
        assert nll(np.zeros(3)) == 0.0
        with pytest.raises(ConfigError):
            nll([])
        with pytest.raises(ConfigError, match="log-probs"):
            nll([0.5])

    def test_target_logprobs(self):
        lp = _log_softmax([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
        got = target_logprobs(lp, [2, 1])
        assert got == pytest.approx([lp[0, 2], math.log(1 / 3)])
        with pytest.raises(ConfigError):
            target_logprobs(lp, [3, 0])

    def test_kl_zero_and_known(self):
        lp = _log_softmax(np.random.default_rng(0).normal(size=(5, 11)))
        assert kl_divergence(lp, lp) == pytest.approx(0.0, abs=1e-12)
        p, q = np.log([[0.5, 0.5]]), np.log([[0.25, 0.75]])
        want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
        assert kl_divergence(p, q) == pytest.approx(want)
        assert kl_divergence(p[0], q[0]) == pytest.approx(want)  # one position [V]

    def test_kl_per_position_and_mean(self):
        rng = np.random.default_rng(1)
        a, b = _log_softmax(rng.normal(size=(4, 7))), _log_softmax(rng.normal(size=(4, 7)))
        per = kl_divergence(a, b, reduction="none")
        assert per.shape == (4,) and np.all(per > 0)
        assert kl_divergence(a, b) == pytest.approx(per.mean())

    def test_kl_top_k_is_lower_bound_with_rest_bucket(self):
        rng = np.random.default_rng(2)
        a, b = _log_softmax(rng.normal(size=(3, 50))), _log_softmax(rng.normal(size=(3, 50)))
        full = kl_divergence(a, b, reduction="none")
        ids = np.argsort(-a, axis=1)[:, :5]
        top = kl_divergence(np.take_along_axis(a, ids, 1), np.take_along_axis(b, ids, 1), reduction="none")
        assert np.all(top <= full + 1e-12) and np.all(top >= 0)
        # two outcomes collapsed into top-1 + rest equals the binary KL exactly
        pa, pb = np.exp(np.take_along_axis(a, ids[:, :1], 1))[:, 0], np.exp(np.take_along_axis(b, ids[:, :1], 1))[:, 0]
        binary = pa * np.log(pa / pb) + (1 - pa) * np.log((1 - pa) / (1 - pb))
        got = kl_divergence(np.take_along_axis(a, ids[:, :1], 1), np.take_along_axis(b, ids[:, :1], 1), "none")
        assert got == pytest.approx(binary)

    def test_kl_shape_mismatch(self):
        with pytest.raises(ConfigError):
            kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))


class TestMeanCI:
    def test_normal(self):
        m, h = mean_and_ci([1.0, 2.0, 3.0, 4.0])
        assert m == 2.5
        assert h == pytest.approx(1.959964 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-5)

    def test_constant_and_single(self):
        assert mean_and_ci([5.0, 5.0, 5.0]) == (5.0, 0.0)
        m, h = mean_and_ci([3.0])
        assert m == 3.0 and math.isnan(h)

    def test_bootstrap_deterministic_and_close_to_normal(self):
        v = np.random.default_rng(0).normal(10, 2, size=200)
        a = mean_and_ci(v, method="bootstrap", seed=1)
        assert a == mean_and_ci(v, method="bootstrap", seed=1)
        assert a[1] == pytest.approx(mean_and_ci(v)[1], rel=0.2)

    def test_bad_input(self):
        with pytest.raises(ConfigError):
            mean_and_ci([])
        with pytest.raises(ConfigError):
            mean_and_ci([1, 2], method="jackknife")


# ----------------------------------------------------------------------------- JSONL


def _write(tmp_path, lines, name="suite.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


GOOD = {"id": "a", "prompt": "What is 2+2?", "answers": ["4"], "metric": "contains"}


def _rec(**kw):
    r = dict(GOOD, **kw)
    return json.dumps({k: v for k, v in r.items() if v is not ...})


class TestLoadJsonl:
    def test_good_file(self, tmp_path):
        p = _write(tmp_path, [
            _rec(),
            "",
            _rec(id="b", metric="rouge_l", max_new_tokens=64, chat=False, answer_prefix="Sum:", task="t",
                 length=100),
            "   ",
        ])
        s = load_jsonl(p)
        assert [x.id for x in s] == ["a", "b"]
        assert s[0].max_new_tokens == 32 and s[0].chat is True and s[0].answer_prefix == ""
        assert s[1] == Sample(id="b", prompt="What is 2+2?", answers=["4"], metric="rouge_l", max_new_tokens=64,
                              chat=False, answer_prefix="Sum:", task="t", length=100)
        assert load_suite(str(p)) == s

    def test_roundtrip_save(self, tmp_path):
        samples = ruler_mini(ws_count, lengths=(256,), samples_per_task=1, tasks=["niah_single", "faith_continue"])
        p = tmp_path / "frozen.jsonl"
        save_jsonl(samples, p)
        back = load_jsonl(p)
        assert [(s.id, s.prompt, s.answers, s.metric, s.chat, s.answer_prefix) for s in back] == \
            [(s.id, s.prompt, s.answers, s.metric, s.chat, s.answer_prefix) for s in samples]

    @pytest.mark.parametrize("bad, pattern", [
        ("{not json", "invalid JSON"),
        ('["a list"]', "must be a JSON object"),
        (_rec(id=...), "missing required key 'id'"),
        (_rec(prompt=...), "missing required key 'prompt'"),
        (_rec(answers=...), "missing required key 'answers'"),
        (_rec(metric=...), "missing required key 'metric'"),
        (_rec(id=3), "'id' must be a string"),
        (_rec(prompt=None), "'prompt' must be a string"),
        (_rec(answers="4"), "'answers' must be a list"),
        (_rec(answers=[4]), r"answers\[0\] must be a string"),
        (_rec(answers=[]), "'answers' is empty"),
        (_rec(answers=["4", " "]), r"answers\[1\] is empty"),
        (_rec(metric="bleu"), "unknown metric"),
        (_rec(max_new_tokens=0), "'max_new_tokens' must be a positive"),
        (_rec(max_new_tokens=-3), "'max_new_tokens' must be a positive"),
        (_rec(max_new_tokens=2.5), "'max_new_tokens' must be an integer"),
        (_rec(max_new_tokens=True), "'max_new_tokens' must be an integer"),
        (_rec(chat="yes"), "'chat' must be true or false"),
        (_rec(length=-1), "'length' must be >= 0"),
        (_rec(answer=["4"]), "unknown key 'answer'"),
        (_rec(id=""), "'id' is empty"),
        (_rec(prompt="  "), "'prompt' is empty"),
        ('{"id": "a", "prompt": "\\ud800", "answers": ["x"], "metric": "exact"}', "lone surrogate"),
        ("[" * 100000, "invalid JSON"),
    ])
    def test_bad_line_names_file_and_line(self, tmp_path, bad, pattern):
        p = _write(tmp_path, [_rec(id="first"), "", bad])
        with pytest.raises(ConfigError, match=pattern) as ei:
            load_jsonl(p)
        msg = str(ei.value)
        assert msg.startswith(f"{p}:3: ") and "\n" not in msg

    def test_duplicate_id_names_both_lines(self, tmp_path):
        p = _write(tmp_path, [_rec(), _rec(id="b"), _rec()])
        with pytest.raises(ConfigError, match=r":3: duplicate id 'a' \(first on line 1\)"):
            load_jsonl(p)

    def test_not_utf8(self, tmp_path):
        p = tmp_path / "x.jsonl"
        p.write_bytes(_rec().encode() + b"\n\xff\xfe\n")
        with pytest.raises(ConfigError, match=r"x.jsonl:2: not valid UTF-8"):
            load_jsonl(p)

    def test_empty_and_missing_file(self, tmp_path):
        p = _write(tmp_path, ["", "  "])
        with pytest.raises(ConfigError, match="no samples"):
            load_jsonl(p)
        with pytest.raises(ConfigError, match="cannot read"):
            load_jsonl(tmp_path / "nope.jsonl")

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(lines=st.lists(st.one_of(
        st.text(max_size=60),
        st.builds(json.dumps, st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(
                st.sampled_from(["id", "prompt", "answers", "metric", "max_new_tokens", "chat", "x"]), c,
                max_size=6),
            max_leaves=12)),
        st.fixed_dictionaries({}, optional={
            "id": st.one_of(st.text(max_size=3), st.integers()),
            "prompt": st.one_of(st.text(max_size=10), st.none()),
            "answers": st.one_of(st.lists(st.one_of(st.text(max_size=4), st.integers()), max_size=3), st.text()),
            "metric": st.sampled_from(["contains", "exact", "rouge_l", "bleu"]),
            "max_new_tokens": st.one_of(st.integers(-2, 5), st.floats(), st.booleans()),
            "chat": st.one_of(st.booleans(), st.integers(0, 1)),
        }).map(json.dumps),
    ), max_size=6))
    def test_fuzz_only_config_error(self, tmp_path, lines):
        p = tmp_path / "fuzz.jsonl"
        p.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            samples = load_jsonl(p)
        except ConfigError as e:
            assert "\n" not in str(e)
            assert re.match(re.escape(str(p)) + r"(:\d+)?: ", str(e))
        else:
            assert samples and all(isinstance(s, Sample) and s.answers for s in samples)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.binary(max_size=200))
    def test_fuzz_bytes_only_config_error(self, tmp_path, data):
        p = tmp_path / "bytes.jsonl"
        p.write_bytes(data)
        try:
            load_jsonl(p)
        except ConfigError:
            pass


class TestLoadSuite:
    def test_dispatch(self, tmp_path):
        s = load_suite("ruler-mini", ws_count, lengths=(256,), samples_per_task=1, tasks=["niah_single"])
        assert [x.id for x in s] == ["niah_single-256-0"]
        with pytest.raises(ConfigError, match="count_tokens"):
            load_suite("ruler-mini")
        with pytest.raises(ConfigError, match="unknown suite"):
            load_suite("longbench")
        p = _write(tmp_path, [_rec()])
        with pytest.raises(ConfigError, match="generated suites"):
            load_suite(p, lengths=(1,))


# ----------------------------------------------------------------------------- ruler-mini


@pytest.fixture(scope="module")
def suite():
    return ruler_mini(ws_count, lengths=(512, 1024, 2048, 4096), samples_per_task=3, seed=0)


class TestRulerMini:
    def test_shape_and_ids(self, suite):
        assert len(suite) == len(TASKS) * 4 * 3
        assert len({s.id for s in suite}) == len(suite)
        assert {s.task for s in suite} == set(TASKS)
        assert set(RETRIEVAL_TASKS) | set(AGGREGATION_TASKS) | set(FAITHFULNESS_TASKS) == set(TASKS)

    def test_deterministic(self, suite):
        again = ruler_mini(ws_count, lengths=(512, 1024, 2048, 4096), samples_per_task=3, seed=0)
        assert again == suite
        other = ruler_mini(ws_count, lengths=(512,), samples_per_task=3, seed=1, tasks=["niah_single"])
        assert [s.prompt for s in other] != [s.prompt for s in suite if s.id.startswith("niah_single-512")]

    def test_sample_independent_of_other_tasks_and_lengths(self, suite):
        alone = ruler_mini(ws_count, lengths=(2048,), samples_per_task=2, seed=0, tasks=["vt"])
        assert alone == [s for s in suite if s.id in ("vt-2048-0", "vt-2048-1")]

    def test_lengths_within_tolerance(self, suite):
        for s in suite:
            n = ws_count(s.prompt)
            assert abs(n - s.length) <= max(0.03 * s.length, 8), (s.id, n)

    def test_lengths_with_a_subword_like_counter(self):
        count = lambda t: len(re.findall(r"\w{1,4}|[^\w\s]", t))  # noqa: E731  ~chars/4, punctuation
        for s in ruler_mini(count, lengths=(1024,), samples_per_task=1):
            assert abs(count(s.prompt) - 1024) <= 0.03 * 1024, s.id

    def test_retrieval_answers_in_prompt_and_question_last(self, suite):
        for s in suite:
            if s.task in RETRIEVAL_TASKS or s.task in AGGREGATION_TASKS:
                for a in s.answers:
                    assert a in s.prompt, (s.id, a)
            if s.task in RETRIEVAL_TASKS:
                tail = s.prompt[-300:]
                assert "?" in tail, s.id
                # the needle (answer) lies in the haystack, before the question
                q = s.prompt.rfind("\n\n")
                assert all(s.prompt.find(a) < q for a in s.answers), s.id

    def test_single_needle_once(self, suite):
        for s in suite:
            if s.task in ("niah_single", "niah_single_text", "niah_multikey"):
                assert len(s.answers) == 1
                assert len(re.findall(rf"\b{s.answers[0]}\b", s.prompt)) >= 1

    def test_aggregation_answers_are_the_most_frequent(self, suite):
        for s in suite:
            if s.task == "cwe":
                words = re.findall(r"^\d+\. (\w+)$", s.prompt, flags=re.M)
            elif s.task == "fwe":
                words = s.prompt.split("\n\n")[1].split()
            else:
                continue
            counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
            top = {w for _, w in counts[: len(s.answers)]}
            assert top == set(s.answers), s.id
            assert counts[len(s.answers) - 1][0] > counts[len(s.answers)][0], s.id

    def test_faithfulness_samples(self, suite):
        for s in suite:
            if s.task == "faith_continue":
                assert s.chat is False and s.metric == "rouge_l" and s.answers[0] not in s.prompt
            if s.task == "faith_summarize":
                assert s.chat is True and s.metric == "rouge_l" and s.prompt.rstrip().endswith(".")

    def test_answer_prefix_present_for_retrieval(self, suite):
        for s in suite:
            if s.task in RETRIEVAL_TASKS:
                assert s.answer_prefix and s.chat

    def test_bad_arguments(self):
        with pytest.raises(ConfigError, match="unknown task"):
            ruler_mini(ws_count, tasks=["nope"])
        with pytest.raises(ConfigError, match="lengths"):
            ruler_mini(ws_count, lengths=(0,))
        with pytest.raises(ConfigError, match="samples_per_task"):
            ruler_mini(ws_count, samples_per_task=0)
        with pytest.raises(ConfigError, match="too short"):
            ruler_mini(ws_count, lengths=(64,), tasks=["niah_multiquery"])
        with pytest.raises(ConfigError, match="never reached"):
            ruler_mini(lambda t: 1, lengths=(256,), tasks=["niah_single"])
