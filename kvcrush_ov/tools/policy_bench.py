"""Micro-benchmark: milliseconds per keep_mask call at SmolLM2-135M scale (not a test).

    PYTHONPATH=. python -m kvcrush_ov.tools.policy_bench [--tokens 4096 --budget 1024 --repeats 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from kvcrush_ov.core.policies import POLICIES, AttentionStats, make_policy


def bench(layers: int = 30, q_heads: int = 9, kv_heads: int = 3, tokens: int = 4096,
          budget: int = 1024, repeats: int = 20, seed: int = 0) -> dict[str, tuple[float, float]]:
    """(median, min) ms per keep_mask call for every registered policy with its defaults.
    The min is the better figure on a shared machine; the median shows the noise."""
    rng = np.random.default_rng(seed)
    # heavy-tailed like real attention: most mass on few slots
    scores = (rng.random((layers, q_heads, tokens), dtype=np.float32) ** 8).astype(np.float32)
    stats = AttentionStats(scores, num_kv_heads=kv_heads)
    out = {}
    for name in POLICIES:
        policy = make_policy(name)
        policy.keep_mask(stats, budget)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            policy.keep_mask(stats, budget)
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = (float(np.median(times)), float(np.min(times)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--q-heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    res = bench(a.layers, a.q_heads, a.kv_heads, a.tokens, a.budget, a.repeats)
    print(f"keep_mask, L={a.layers} Hq={a.q_heads} Hkv={a.kv_heads} T={a.tokens} budget={a.budget} "
          f"({a.repeats} calls)")
    print(f"  {'policy':14s} {'median':>9s} {'min':>9s}")
    for name, (med, best) in res.items():
        print(f"  {name:14s} {med:6.2f} ms {best:6.2f} ms")


if __name__ == "__main__":
    main()
