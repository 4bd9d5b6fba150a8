"""`idlm.bench.policy`: drafts accepted with a known probability, for measuring the adaptive stride on
weights that draft nothing useful (issue 13's Qwen3-8B-shaped table), and its GPU driver CPU-sized."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import run_script

from idlm.bench.policy import bench_policy, leading_successes, synthetic_acceptance, virtual_device
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


SMALL = dict(model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
             mask_token_id=255)


def _per_request_tok_s(engine, prompts, params) -> float:
    before = dict(engine.counters)
    engine.run(prompts, params)
    tokens = engine.counters["generated_tokens"] - before["generated_tokens"] - len(prompts)
    return tokens / (engine.counters["decode_time_s"] - before["decode_time_s"]) / len(prompts)


def _closed_loop(p: float, ar_ms, isd_ms, runs: int = 3, requests: int = 4, **config) -> tuple[list[float], dict]:
    """AR and `--stride auto` engines on a virtual device whose decode step costs ar_ms(batch) for a plain
    AR step and isd_ms(batch, phase) for an ISD one (phase = the auto engine's run index), drafts
    accepted with probability p -> (auto / AR per-request tok/s of each run, the last run's stride mix).
    The AR engine's steps cost ar_ms(batch, None)."""
    from idlm.models.random import random_model

    model = random_model(SMALL, dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 250, 16).tolist() for _ in range(requests)]
    params = [SamplingParams(temperature=1.0, max_tokens=96, ignore_eos=True, seed=i) for i in range(requests)]
    cfg = dict(max_num_seqs=4, num_pages=64, cuda_graphs=False)
    phase = [0]
    with virtual_device() as clock:
        ar = LLMEngine(model, None, EngineConfig(decoder="ar", stride=1, **cfg))
        clock.attach(ar, lambda n, b: ar_ms(b, None) * 1e-3)
        ar_tok_s = _per_request_tok_s(ar, prompts, params)
        auto = LLMEngine(model, None, EngineConfig(decoder="isd", stride="auto", step_cost=(5e-4, 2e-6, 2.5e-7),
                                                   **cfg, **config))
        synthetic_acceptance(auto, p, seed=1)
        clock.attach(auto, lambda n, b: (ar_ms(b, phase[0]) if n == 1 else isd_ms(b, phase[0])) * 1e-3)
        ratios = []
        for run in range(runs):
            phase[0] = run
            mix0 = dict(auto.stride_mix)
            ratios.append(_per_request_tok_s(auto, prompts, params) / ar_tok_s)
        mix = {n: c - mix0.get(n, 0) for n, c in auto.stride_mix.items() if c != mix0.get(n, 0)}
    return ratios, mix


def test_auto_falls_back_to_ar_steps_where_isd_loses_and_keeps_isd_where_it_wins():
    """The closed loop (measured step times, acceptance estimates, choices) on a virtual device with the
    H200's idlm-tiny costs at batch 1–8 (an AR step 0.66–0.78 ms, an ISD step 1.04–1.32 ms: 1.6x): at
    p = 0.5 (T = 1-like, TPF ~1.5 < 1.6) ISD loses, and after its first run's exploration `auto` runs plain
    AR steps and matches AR; at p = 0.9 (TPF ~2.9 at N = 4) ISD wins and `auto` keeps it."""
    ar_ms = lambda b, phase: 0.66 + 0.02 * b  # noqa: E731
    isd_ms = lambda b, phase: 1.04 + 0.04 * b  # noqa: E731
    lose, mix = _closed_loop(0.5, ar_ms, isd_ms)
    assert lose[0] > 0.85 and min(lose[1:]) > 0.97, lose  # exploration costs the first run a little
    assert mix.get(1, 0) > 0.9 * sum(mix.values()), mix
    win, mix = _closed_loop(0.9, ar_ms, isd_ms)
    assert min(win[1:]) > 1.5, win
    assert mix.get(1, 0) < 0.2 * sum(mix.values()), mix


def test_auto_re_measures_a_stride_first_measured_at_a_slow_moment():
    """Plain AR steps cost 1 ms during the first run (a slow moment of the host: the policy measures them,
    rates them below ISD and stops running them) and 0.66 ms afterwards (ISD steps 1.04 ms, p = 0.5: AR
    is then better). Once that measurement expires the policy runs AR steps again (the other kind's probe,
    and the refresh of expired strides), sees them faster and moves to them. One request (C = 1): no
    batch tail where rows finishing at small batch sizes would measure AR steps afresh anyway."""
    ar_ms = lambda b, phase: 1.0 if phase == 0 else 0.66  # noqa: E731
    isd_ms = lambda b, phase: 1.04  # noqa: E731
    ratios, mix = _closed_loop(0.5, ar_ms, isd_ms, runs=12, requests=1, auto_refresh=64)  # ~70 steps a run
    assert min(ratios[:4]) < 0.97  # ISD at first, from the slow reading
    assert ratios[-1] > 0.97 and mix.get(1, 0) > 0.8 * sum(mix.values()), (ratios, mix)


@pytest.mark.slow
def test_bench_policy_script_smoke(tmp_path):
    run_script("bench_policy.py", SMOKE="1", OUT=str(tmp_path))
    rec = json.loads((tmp_path / "bench_policy.json").read_text())
    assert set(rec["auto"]) == {"0.9", "0.7", "0.5"} and set(rec["auto"]["0.9"]) == {"1", "2"}
    assert all(c["over_ar"] > 0 for cells in rec["auto"].values() for c in cells.values())


def test_a_sampled_phase_after_a_greedy_one_falls_back_to_ar_steps():
    """The H200 table's T = 1 cells ran after its greedy ones, and `auto` kept N = 4 there (0.91x AR): each new
    T = 1 request started from an acceptance prior pooled over every request served, mostly greedy ones with
    far higher acceptance. With the prior pooled per sampling class, the same sequence on a virtual device
    (greedy drafts accepted with p = 0.9, T = 1 ones with p = 0.5; the H200's idlm-tiny costs, an ISD step
    1.6x an AR one) matches AR in the T = 1 phase, after its first run."""
    from idlm.models.random import random_model

    model = random_model(SMALL, dtype="float32", device="cpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 250, 16).tolist() for _ in range(4)]

    def params(temperature):
        return [SamplingParams(temperature=temperature, max_tokens=96, ignore_eos=True, seed=i) for i in range(4)]

    cfg = dict(max_num_seqs=4, num_pages=64, cuda_graphs=False)
    ar_ms, isd_ms = (lambda b: 0.66 + 0.02 * b), (lambda b: 1.04 + 0.04 * b)
    with virtual_device() as clock:
        ar = LLMEngine(model, None, EngineConfig(decoder="ar", stride=1, **cfg))
        clock.attach(ar, lambda n, b: ar_ms(b) * 1e-3)
        ar_tok_s = _per_request_tok_s(ar, prompts, params(1.0))
        auto = LLMEngine(model, None, EngineConfig(decoder="isd", stride="auto", step_cost=(5e-4, 2e-6, 2.5e-7), **cfg))
        synthetic_acceptance(auto, lambda p: 0.9 if p.greedy else 0.5, seed=1)
        clock.attach(auto, lambda n, b: (ar_ms(b) if n == 1 else isd_ms(b)) * 1e-3)
        greedy = [_per_request_tok_s(auto, prompts, params(0.0)) / _per_request_tok_s(ar, prompts, params(0.0))
                  for _ in range(3)]
        sampled = []
        for _ in range(3):
            mix0 = dict(auto.stride_mix)
            sampled.append(_per_request_tok_s(auto, prompts, params(1.0)) / ar_tok_s)
        mix = {n: c - mix0.get(n, 0) for n, c in auto.stride_mix.items() if c != mix0.get(n, 0)}
    assert min(greedy[1:]) > 1.5, greedy  # ISD where it wins
    assert min(sampled[1:]) > 0.97, sampled  # AR steps where it loses, whatever came before
    assert mix.get(1, 0) > 0.9 * sum(mix.values()), mix
