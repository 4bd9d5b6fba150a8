"""The 8B projection (idlm.bench.projection): tok/s = TPF / step latency, nothing interpolated."""

from idlm.bench.projection import PAPER_TPF, project, render_markdown


def test_projection_arithmetic_and_best_stride():
    rows = [{"batch": 1, "query_len": 1, "latency_ms": 4.0}, {"batch": 1, "query_len": 7, "latency_ms": 4.4},
            {"batch": 64, "query_len": 1, "latency_ms": 10.0}, {"batch": 64, "query_len": 7, "latency_ms": 40.0},
            {"batch": 64, "query_len": 3, "latency_ms": 15.0}, {"batch": 8, "query_len": 7, "latency_ms": 5.0}]
    out = project(rows, PAPER_TPF)
    assert [r["concurrency"] for r in out] == [1, 64]  # batch 8 has no AR step: left out
    one, big = out
    assert one["ar_tok_s"] == 250.0 and one["isd"][4]["tok_s"] == round(2.96e3 / 4.4, 1)
    assert one["isd"][4]["over_ar"] == round(2.96 * 4.0 / 4.4, 3) and one["isd"][4]["step_over_ar_step"] == 1.1
    assert set(one["isd"]) == {4} and one["best_n"] == 4  # Q = 3, 5, 15 not measured at C = 1
    # at C = 64 a 4x costlier Q = 7 step loses to AR (2.96 / 4 < 1), N = 2 wins (1.8 / 1.5)
    assert big["isd"][4]["over_ar"] < 1 and big["best_n"] == 2 and big["best_over_ar"] == round(1.8 / 1.5, 3)
    md = render_markdown(out, PAPER_TPF, "t")
    assert "not measured" in md and "142 / 326 (2.30×)" in md and "| 64 | 100 |" in md
