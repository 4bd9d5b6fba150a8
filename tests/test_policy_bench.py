"""`idlm.bench.policy`: drafts accepted with a known probability, for measuring the adaptive stride on
weights that draft nothing useful (issue 13's Qwen3-8B-shaped table), and its GPU driver CPU-sized."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from idlm.bench.policy import bench_policy, leading_successes, synthetic_acceptance
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine


def test_leading_successes_is_a_truncated_geometric():
    """P(j accepted of k) = p^j (1 − p) for j < k, p^k for j = k: counts of 40 000 rows against it."""
    rng = np.random.default_rng(0)
    p, k, n = 0.7, 3, 40_000
    got = np.bincount(leading_successes(rng, p, np.full(n, k)), minlength=k + 1) / n
    want = np.array([p**j * (1 - p) for j in range(k)] + [p**k])
    np.testing.assert_allclose(got, want, atol=0.01)
    mixed = leading_successes(rng, 1.0, np.array([0, 2, 5]))  # each row stops at its own k
    assert mixed.tolist() == [0, 2, 5]
    assert leading_successes(rng, 0.5, np.zeros(3, dtype=np.int64)).tolist() == [0, 0, 0]


@pytest.mark.parametrize("p", [0.9, 0.4])
def test_an_engine_with_synthetic_acceptance_accepts_each_draft_with_p(tiny, p):
    """The engine's own per-position statistics (what the adaptive stride reads) show conditional
    acceptance p at every draft position, whatever the model drafts."""
    model, tok = tiny
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride=4, max_num_seqs=16, num_pages=256))
    synthetic_acceptance(eng, p, seed=3)
    eng.run([[1 + i, 2, 3] for i in range(16)], [SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)] * 16)
    acc, ver = eng.decode_stats.accepted_per_position, eng.decode_stats.verified_per_position
    assert ver[0] > 150
    for a, v in zip(acc, ver):
        assert abs(a / v - p) < 3 * (p * (1 - p) / v) ** 0.5 + 0.02, (a, v)
    with pytest.raises(ValueError, match="probability"):
        synthetic_acceptance(eng, 1.5)


def test_bench_policy_reports_prediction_measurement_and_mix(tiny):
    model, tok = tiny
    eng = LLMEngine(model, tok, EngineConfig(decoder="isd", stride="auto", max_num_seqs=4, num_pages=256,
                                             step_cost=(1e-3, 1e-6, 1e-7)))
    synthetic_acceptance(eng, 0.9, seed=0)
    r = bench_policy(eng, [[1, 2, 3], [4, 5, 6]], concurrency=4, max_tokens=24)
    assert r["measured_tok_s_per_request"] > 0 and r["predicted_tok_s_per_request"] > 0
    assert sum(r["stride_mix"].values()) == r["decode_steps"]
    assert r["tpf"] >= 1.0
    assert eng._choose_stride.__name__ == "_choose_stride"  # the recording wrapper is gone


@pytest.mark.slow
def test_bench_policy_script_smoke(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_policy.py"
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["summary"] is True
    rec = json.loads((tmp_path / "bench_policy.json").read_text())
    assert set(rec["auto"]) == {"0.9", "0.7", "0.5"} and set(rec["auto"]["0.9"]) == {"1", "2"}
    assert all(c["over_ar"] > 0 for cells in rec["auto"].values() for c in cells.values())
