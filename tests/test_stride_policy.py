"""The adaptive stride's math (idlm/decoding/stride_policy.py) against independent oracles."""

import random

import numpy as np
import pytest

from idlm.decoding.acceptance import analytic_tpf
from idlm.decoding.stride_policy import (
    StepCostModel,
    acceptance_estimate,
    choose_stride,
    default_prior,
    isd_tpf,
    query_len_of,
)


def simulate_isd(accept, forwards=200_000, seed=0) -> float:
    """Monte Carlo of ISD's cold/verify alternation: committed tokens per forward."""
    rng = random.Random(seed)
    mode, committed = "C", 0
    for _ in range(forwards):
        if mode == "C":
            committed += 1
            mode = "V"
            continue
        j = 0
        while j < len(accept) and rng.random() < accept[j]:
            j += 1
        committed += j + 1
        mode = "V" if j == len(accept) else "C"
    return committed / forwards


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_isd_tpf_matches_the_closed_form(p, n):
    assert isd_tpf([p] * (n - 1)) == pytest.approx(analytic_tpf(p, n), rel=1e-12)


@pytest.mark.parametrize("accept", [[0.9, 0.0], [0.9, 0.6, 0.3], [0.5], [0.8, 0.8, 0.8, 0.1, 0.9]])
def test_isd_tpf_matches_simulation(accept):
    assert isd_tpf(accept) == pytest.approx(simulate_isd(accept), rel=0.01)


def test_isd_tpf_is_not_monotone_in_the_stride():
    # far drafts never accepted: a longer stride cold-starts after every verify and loses
    assert isd_tpf([0.9]) > isd_tpf([0.9, 0.0])
    assert isd_tpf([]) == 1.0
    with pytest.raises(ValueError):
        isd_tpf([1.5])


def test_acceptance_estimate_and_prior():
    prior = default_prior([80, 30], [100, 80], length=4)
    assert prior == [0.8, 0.375, 0.375, 0.375]
    assert default_prior([], [], length=2, fallback=0.4) == [0.4, 0.4]
    est = acceptance_estimate([10, 0], [10, 10], prior, strength=10)
    assert est[0] == pytest.approx((10 + 8) / 20) and est[1] == pytest.approx(3.75 / 20)
    assert est[2:] == prior[2:]  # no counts: the prior


def test_cost_model_fit_recovers_coefficients():
    true = StepCostModel(base=2e-3, per_row=1e-5, per_token=3e-6)
    samples = [(b, q, true.cost(b, q)) for b in (1, 8, 64, 256) for q in (1, 3, 7, 15)]
    fit = StepCostModel.fit(samples)
    for name in ("base", "per_row", "per_token"):
        assert getattr(fit, name) == pytest.approx(getattr(true, name), rel=1e-6)
    with pytest.raises(ValueError):
        StepCostModel(base=-1)
    with pytest.raises(ValueError):
        StepCostModel.fit([])
    # one batch only (an engine of max_num_seqs 1): no per-row term, the points themselves fitted exactly
    ones = [(1, q, true.cost(1, q)) for q in (1, 7)]
    fit = StepCostModel.fit(ones)
    assert fit.per_row == 0 and all(fit.cost(1, q) == pytest.approx(t, rel=1e-9) for _, q, t in ones)
    fit = StepCostModel.fit(ones[:1])
    assert fit.per_row == fit.per_token == 0 and fit.cost(1, 1) == pytest.approx(ones[0][2])


def test_choose_stride():
    weight_bound = StepCostModel(base=1e-3, per_row=0, per_token=1e-8)  # small batch: extra query tokens ~free
    good = [[0.9] * 7]
    assert choose_stride(good, weight_bound).stride == 8
    bad = [[0.02] * 7]
    assert choose_stride(bad, StepCostModel(base=1e-3, per_token=1e-5)).stride == 1  # 2% acceptance: AR
    compute_bound = StepCostModel(base=1e-3, per_row=0, per_token=1e-4)
    assert choose_stride([[0.6] * 7] * 256, compute_bound).stride == 1  # a big batch pays per token
    mixed = [[0.95, 0.0] + [0.0] * 5]  # the second draft is never accepted: N = 2
    assert choose_stride(mixed, weight_bound).stride == 2
    # hysteresis: a marginally better stride does not replace the current one
    c = choose_stride(good, weight_bound, strides=(7, 8), current=7, hysteresis=0.5)
    assert c.stride == 7 and set(c.rates) == {7, 8}
    assert query_len_of(1) == 1 and query_len_of(4) == 7
    with pytest.raises(ValueError):
        choose_stride([], weight_bound)


def test_an_isd_stride_must_clearly_beat_the_ar_step():
    """ar_margin: N >= 2 replaces N = 1 only when rated more than the margin faster, whatever runs now."""
    rows = [[0.5] * 7]
    # measured: N = 1 at 1.0 ms, N = 2 at 1.25 ms -> TPF(2) = 1 + 0.5 / 1.5 = 4/3: rated 1.067x the AR step
    measured = {1: 1e-3, 2: 1.25e-3}
    c = choose_stride(rows, StepCostModel(), strides=(1, 2), measured=measured, ar_margin=0.0)
    assert c.stride == 2 and c.rates[2] / c.rates[1] == pytest.approx(16 / 15)
    for current in (None, 1, 2):  # a margin of 10%: the AR step, also when N = 2 is running
        assert choose_stride(rows, StepCostModel(), strides=(1, 2), measured=measured, current=current).stride == 1
    # a clear win is taken: N = 2 at 1.1 ms is rated 1.21x
    assert choose_stride(rows, StepCostModel(), strides=(1, 2), measured={1: 1e-3, 2: 1.1e-3}).stride == 2
    # without N = 1 among the candidates the margin plays no part
    assert choose_stride(rows, StepCostModel(), strides=(2, 3), measured={2: 1.25e-3, 3: 9e-3}).stride == 2


def test_cost_tracker_fills_unrun_strides_from_the_nearest():
    from idlm.decoding.stride_policy import CostTracker

    t = CostTracker(StepCostModel(base=1e-3, per_token=0.0), window=3)
    assert t.scales([1, 4]) == {1: 1.0, 4: 1.0}
    t.observe(4, 8, 2e-3)  # twice the model
    assert t.scales([1, 2, 4, 8]) == {1: 2.0, 2: 2.0, 4: 2.0, 8: 2.0}
    t.observe(1, 8, 1e-3)
    t.observe(4, 8, 4e-3)  # median of (2, 4)
    assert t.scales([1, 2, 3, 4]) == {1: 1.0, 2: 1.0, 3: 3.0, 4: 3.0}
    with pytest.raises(ValueError):
        CostTracker(StepCostModel(), window=0)


def test_cost_tracker_one_slow_step_does_not_exile_a_stride():
    """A stride's estimate is a windowed median: one step thousands of times slower than the rest (a
    kernel compiled on first use; seen on the H200) moves it little, and is forgotten after `window`."""
    from idlm.decoding.stride_policy import CostTracker

    t = CostTracker(StepCostModel(base=1e-3, per_token=0.0), window=4)
    t.observe(4, 8, 4.0)  # a first step that compiled: 4000x the model
    for _ in range(2):
        t.observe(4, 8, 1e-3)
    assert t.scale[4] == 1.0
    for _ in range(4):
        t.observe(4, 8, 1.5e-3)
    assert t.scale[4] == 1.5  # the outlier left the window


def test_stride_to_probe_measures_the_other_kind_of_step_once():
    from idlm.decoding.stride_policy import StrideChoice, stride_to_probe

    choice = StrideChoice(4, 1.0, {1: 0.8, 2: 0.9, 4: 1.0, 8: 0.5})
    assert stride_to_probe(choice, measured=set()) is None  # nothing run yet: nothing to borrow a scale from
    assert stride_to_probe(choice, measured={4}) == 1  # only ISD steps have run: the AR step, rated close
    assert stride_to_probe(choice, measured={4, 1}) is None  # both kinds measured (2 borrows 4's scale)
    assert stride_to_probe(choice, measured={4}, within=0.85) is None  # AR not close enough to be worth it
    # ISD committing 1.46 tokens a step (T = 1) rates the AR step at 1 / 1.46 with a borrowed scale: probed
    assert stride_to_probe(StrideChoice(4, 1.46, {1: 1.0, 4: 1.46}), measured={4}) == 1
    ar_choice = StrideChoice(1, 1.0, {1: 1.0, 2: 0.7, 4: 0.9, 8: 0.4})
    assert stride_to_probe(ar_choice, measured={1}) == 4  # only AR steps have run: the best ISD stride
    assert stride_to_probe(StrideChoice(4, 1.0, {4: 1.0}), measured={1}) is None  # the choice itself: no probe


def test_measured_step_times_override_the_model():
    """A stride that has run at this batch size is costed by its measured step time, not by the model:
    the model (query tokens nearly free) prefers N = 8, but N = 8's steps were measured 3x slower than
    N = 4's, so N = 4 wins; N = 6, never run, keeps its modelled cost (the model's scale) and is rated by it."""
    weight_bound = StepCostModel(base=1e-3, per_row=0.0, per_token=1e-7)
    rows = [[0.8] * 7] * 4
    assert choose_stride(rows, weight_bound, strides=(1, 4, 8)).stride == 8
    c = choose_stride(rows, weight_bound, strides=(1, 4, 8), measured={8: 3e-3, 4: 1e-3, 1: 0.9e-3})
    assert c.stride == 4
    assert c.rates[4] == pytest.approx(4 * isd_tpf([0.8] * 3) / 1e-3)
    assert c.rates[1] == pytest.approx(4 / 0.9e-3)
    c = choose_stride(rows, weight_bound, strides=(1, 4, 6, 8), measured={8: 3e-3, 4: 1e-3},
                      cost_scale={6: 1.0})
    assert c.stride == 6  # modelled at ~1 ms with more tokens per step: tried next


def test_step_timer_window_buckets_and_staleness():
    from idlm.decoding.stride_policy import StepTimer

    t = StepTimer(window=4, min_samples=2, stale_steps=10)
    t.observe(4, 8, 1e-3)
    assert t.seconds(8) == {}  # one sample is not a measurement
    t.observe(4, 8, 1e-3)
    assert t.seconds(8) == {4: 1e-3} and t.seconds(16) == {}  # per batch bucket
    t.observe(1, 8, 0.5e-3)
    t.observe(1, 8, 2.0)  # a step that stalled: the median shrugs it off once there are more
    t.observe(1, 8, 0.5e-3)
    assert t.seconds(8) == {4: 1e-3, 1: 0.5e-3}
    for _ in range(4):  # the window forgets older steps
        t.observe(4, 8, 2e-3)
    assert t.seconds(8)[4] == 2e-3
    for _ in range(10):  # stride 1 not run for stale_steps steps: re-measure it
        t.observe(4, 8, 2e-3)
    assert t.seconds(8) == {4: 2e-3}
    t.observe(4, 8, 0.0)  # nothing measured, no sample
    with pytest.raises(ValueError):
        StepTimer(window=2, min_samples=3)


def test_batched_estimates_equal_the_per_row_functions():
    """The engine's vectorised path (position_counts -> acceptance_rows -> isd_tpf_rows) gives what the
    per-row reference functions give, for rows whose count lists have any length."""
    import numpy as np

    from idlm.decoding.base import DecodeStats
    from idlm.decoding.stride_policy import acceptance_rows, isd_tpf_rows, position_counts

    rng = random.Random(5)
    stats = []
    for _ in range(40):
        st = DecodeStats()
        st.verified_per_position = [rng.randint(0, 30) for _ in range(rng.randint(0, 9))]
        st.accepted_per_position = [rng.randint(0, v) for v in st.verified_per_position]
        stats.append(st)
    acc, ver = position_counts(stats, 7)
    assert acc.shape == ver.shape == (40, 7)
    prior = default_prior(list(acc.sum(0)), list(ver.sum(0)), 7)
    rows = acceptance_rows(acc, ver, prior)
    for st, row in zip(stats, rows):
        want = acceptance_estimate(st.accepted_per_position, st.verified_per_position, prior)
        assert list(row) == want
        for n in range(1, 9):
            assert isd_tpf_rows(np.array([row[: n - 1]]))[0] == pytest.approx(isd_tpf(want[: n - 1]), abs=1e-12)
    assert list(isd_tpf_rows(np.zeros((3, 0)))) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        isd_tpf_rows(np.array([[1.5]]))
    with pytest.raises(ValueError):
        choose_stride([[0.5] * 3], StepCostModel(), strides=(1, 8))  # rows shorter than the longest stride


def test_tpf_table_is_isd_tpf_rows_at_every_stride():
    from idlm.decoding.stride_policy import isd_tpf_rows, tpf_table

    rng = np.random.default_rng(0)
    a = rng.random((5, 7))
    a[0] = 1.0  # every draft accepted
    a[1, 2:] = 0.0  # never past the second draft
    table = tpf_table(a, [1, 2, 3, 5, 8])
    for col, n in enumerate([1, 2, 3, 5, 8]):
        np.testing.assert_allclose(table[:, col], isd_tpf_rows(a[:, : n - 1]), rtol=1e-12)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        tpf_table(a + 1.0, [2])


def test_stride_to_refresh_re_measures_the_best_expired_stride():
    from idlm.decoding.stride_policy import StrideChoice, stride_to_refresh

    choice = StrideChoice(3, 1.0, {1: 0.7, 2: 0.8, 3: 1.0, 4: 0.95, 8: 0.5})
    assert stride_to_refresh(choice, expired=set()) is None  # every measurement fresh (or never taken)
    assert stride_to_refresh(choice, expired={4, 1}) == 4  # the best-rated expired one
    assert stride_to_refresh(choice, expired={1, 8}) == 1
    assert stride_to_refresh(choice, expired={8}) is None  # rated under `within` of the choice: not worth it
    assert stride_to_refresh(choice, expired={3}) is None  # the choice itself runs anyway


def test_step_timer_lists_expired_measurements_and_restarts_them_afresh():
    from idlm.decoding.stride_policy import StepTimer

    t = StepTimer(window=8, min_samples=2, stale_steps=4)
    for _ in range(2):
        t.observe(1, 1, 2e-3)  # measured at a slow moment
    for _ in range(4):
        t.observe(4, 1, 1e-3)
    assert t.expired(1) == {1} and t.seconds(1) == {4: 1e-3}
    assert t.expired(2) == set()
    for _ in range(2):
        t.observe(1, 1, 0.5e-3)  # re-measured: the old moment's samples are dropped, not mixed in
    assert t.seconds(1)[1] == 0.5e-3 and t.expired(1) == set()


def test_cost_scales_come_from_the_nearest_batch_size_class():
    """A sampled ISD step's extra work grows with the batch faster than the forward-only model: its ratio
    at batch 64 is not its ratio at batch 8. Each stride's scale comes from the nearest batch class
    (power of two) where it ran; strides never run borrow the nearest stride's at that batch."""
    from idlm.decoding.stride_policy import CostTracker

    model = StepCostModel(base=1.0, per_token=0.0)  # ratios = the seconds
    t = CostTracker(model, window=4)
    t.observe(7, 8, 1.3)
    t.observe(7, 64, 3.5)
    t.observe(1, 64, 2.0)
    assert t.scales([7], 64) == {7: 3.5} and t.scales([7], 8) == {7: 1.3}
    assert t.scales([7], 48) == {7: 3.5}  # class of 32..63: nearer 64 than 8
    assert t.scales([7], 1) == {7: 1.3}
    assert t.scales([1, 2], 8) == {1: 2.0, 2: 2.0}  # stride 1 ran only at 64: its own ratio, the nearest class
    assert t.scales([7]) == {7: 2.4}  # no batch: the all-batch median, as before

