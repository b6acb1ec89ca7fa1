"""Per-head scores for one eviction: what the policies rank, float32 [layers, Hq, slots], in numpy.

One interface, two sources of scores:
  window    the attention that queries already seen (a sequence's newest W, or a probe of its prompt's
            tail) paid to each cached key (attention_scores.py);
  expected  the attention that the queries still to come are expected to pay, from running statistics
            of every query seen so far (expected_attention.py): needs no question.
Keys are read from the paged pool through the sequence's block tables, a group of layers per numpy
call (a few calls per eviction instead of one per layer; the group bounds the temporaries). This numpy
code is the reference the compiled scorer (compiled_scorer.py, the default on float caches; expected
attention weighted by value norms stays in numpy) must match; KVCRUSH_OV_SCORER=numpy (or Scorer(backend="numpy")) scores with it instead.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from . import expected_attention
from .attention_scores import window_scores
from .compiled_scorer import CompiledScorer
from .expected_attention import ExpectedOptions, QueryStats, Rope
from .model_runner import ModelRunner

_GROUP_ELEMENTS = 1 << 15  # layers per numpy call x slots: bounds the [group, Hq, W, slots] temporaries
BACKENDS = ("openvino", "numpy")
BACKEND_ENV = "KVCRUSH_OV_SCORER"


class Scorer:
    def __init__(self, runner: ModelRunner, backend: str | None = None) -> None:
        """backend: "openvino" (compiled window scores where the cache allows, else numpy) or "numpy" (the
        reference); default from $KVCRUSH_OV_SCORER, else openvino."""
        backend = backend or os.environ.get(BACKEND_ENV) or "openvino"
        if backend not in BACKENDS:
            raise ConfigError(f"scorer backend {backend!r} is not one of {', '.join(BACKENDS)} (${BACKEND_ENV})")
        self.runner = runner
        self.backend = backend
        self._compiled = (CompiledScorer(runner) if backend == "openvino" and CompiledScorer.supports(runner)
                          else None)
        if self._compiled is not None and not self._compiled.reads_pool_in_place:
            self._compiled = None  # the device would convert the whole pool per eviction: numpy reads less
        self._rope: Rope | None = None  # the model's RoPE, built when expected attention is first asked for

    def rope(self) -> Rope:
        """The model's RoPE (from config.json), to take it out of the exposed post-RoPE queries."""
        if self._rope is None:
            r = self.runner
            try:
                self._rope = Rope.from_config(r.hf_config, r.num_layers, r.head_size, r.sliding_windows)
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"expected attention needs the model's RoPE from config.json: {e}; use "
                                  f"prefill_scores/scores 'window'") from None
        return self._rope

    def prepare_expected(self) -> None:
        """Checks the model's RoPE and compiles the expected-attention graph now, not in an eviction."""
        self.rope()
        if self._compiled is not None:
            self._compiled.prepare("expected")

    def add_queries(self, stats: QueryStats | None, queries: np.ndarray, first_position: int,
                    options: ExpectedOptions) -> QueryStats:
        """Running statistics with queries [L, T, Hq, hd] (post-RoPE, at positions first_position..) added."""
        if stats is None:
            stats = QueryStats.empty(self.runner.num_layers, self.runner.num_q_heads, self.runner.head_size)
        return stats.add(expected_attention.pre_rope_rows(self.rope(), queries, first_position, options.skip_first))

    def window(self, tables: list, queries: np.ndarray, num_slots: int, layers: np.ndarray,
               causal: bool = True) -> np.ndarray:
        """[len(layers), Hq, num_slots]: the attention queries [L, W, Hq, hd] paid to each of the first
        num_slots cached slots (causal: the queries are the newest W slots; else they come after all)."""
        if not queries.shape[1]:
            return np.zeros((len(layers), self.runner.num_q_heads, num_slots), np.float32)
        if self._compiled is not None:
            return self._compiled.window(tables, queries, num_slots, layers, causal)
        out = np.empty((len(layers), self.runner.num_q_heads, num_slots), np.float32)
        scales = np.asarray(self.runner.softmax_scales, dtype=np.float32)[layers]
        windows = np.asarray(self.runner.sliding_windows, dtype=np.int64)[layers]
        group = max(1, _GROUP_ELEMENTS // max(num_slots, 1))
        keys = np.empty((min(group, len(layers)), self.runner.num_kv_heads, num_slots, self.runner.head_size),
                        np.float32)
        for lo in range(0, len(layers), group):
            sel = layers[lo:lo + group]
            for i, layer in enumerate(sel):
                keys[i] = self.runner.kv.read_keys(int(layer), tables[layer], num_slots)
            out[lo:lo + len(sel)] = window_scores(queries[sel], keys[:len(sel)], scales[lo:lo + len(sel)],
                                                  windows[lo:lo + len(sel)], causal)
        return out

    def expected(self, tables: list, stats: QueryStats, options: ExpectedOptions, position: int, num_slots: int,
                 layers: np.ndarray) -> np.ndarray:
        """[len(layers), Hq, num_slots]: the attention expected from the queries at position.. onwards."""
        scales = np.asarray(self.runner.softmax_scales, dtype=np.float32)
        if self._compiled is not None and not options.value_norm:  # (value norms: numpy reads the values)
            mean, cov = expected_attention.future_moments(stats, self.rope(), position, options.future, layers,
                                                          options.covariance)
            return self._compiled.expected(tables, mean, cov, scales[layers], num_slots, layers)
        group = max(1, _GROUP_ELEMENTS // max(num_slots, 1))
        out = np.empty((len(layers), self.runner.num_q_heads, num_slots), np.float32)
        for lo in range(0, len(layers), group):
            sel = layers[lo:lo + group]
            keys = np.stack([self.runner.kv.read_keys(int(layer), tables[layer], num_slots) for layer in sel])
            norms = (np.stack([np.linalg.norm(self.runner.kv.read_values(int(layer), tables[layer], num_slots), axis=-1)
                               for layer in sel]) if options.value_norm else None)
            out[lo:lo + len(sel)] = expected_attention.score(stats, self.rope(), keys, scales[sel], position, options,
                                                             sel, norms)
        return out
