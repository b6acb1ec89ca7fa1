"""The demo's prompts: several pass keys of 5-6 digits at different depths, deterministic."""
from __future__ import annotations

import inspect

from kvcrush_ov.tools.demo import DEPTHS, demo_cases, run_demo


def test_demo_cases_bury_each_key_at_its_depth():
    cases = demo_cases()
    assert cases == demo_cases() and len(cases) == len(DEPTHS)
    assert len({k for _, k in cases}) == len(cases) and all(len(k) in (5, 6) for _, k in cases)
    positions = [p.index(k) / len(p) for p, k in cases]
    assert positions == sorted(positions) and positions[0] < 0.25 and positions[-1] > 0.75
    assert all(p.endswith("Answer with the number only.") and p.count(k) == 1 for p, k in cases)


def test_run_demo_takes_typed_arguments():
    params = inspect.signature(run_demo).parameters
    assert list(params)[:4] == ["model_dir", "device", "scheduler", "budget_fraction"]
