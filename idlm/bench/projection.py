"""Projected per-request speed of AR and ISD for a model measured only step by step (issue 14's
`docs/projection.md`).

A decode step of a batch of C requests with Q query tokens each costs latency(C, Q) (measured by
`idlm bench latency`: the engine's decode forward with every request holding `context` tokens of KV).
At stride N an ISD step has Q = 2N − 1 and commits TPF(N) tokens per request on average, so in steady
state a request sees TPF(N) / latency(C, 2N − 1) tokens per second, and AR 1 / latency(C, 1). The
"best N" column is what a per-step adaptive stride could reach with these TPFs: the N that maximises
it at each C (N = 1 is AR). Nothing is interpolated: an (C, Q) the measurement lacks is left out.
This ignores what a measured step leaves out (prefill of arriving requests, sampling) and assumes the
TPF does not depend on C, as the paper's MATH-500 numbers (SPEC §9) do.
"""

from __future__ import annotations

PAPER_TPF = {2: 1.80, 3: 2.48, 4: 2.96, 8: 4.01}  # SPEC §9, I-DLM-8B
# SPEC §9: per-request tok/s on one H100, MATH-500, N = 4: C -> (AR Qwen3-8B, I-DLM-8B)
PAPER_SPEED = {1: (142, 326), 4: (130, 305), 16: (123, 237), 32: (111, 201), 64: (93, 125)}


def latency_table(rows: list[dict]) -> dict[tuple[int, int], float]:
    """`idlm bench latency` result rows -> {(batch, query_len): latency in ms}."""
    return {(int(r["batch"]), int(r["query_len"])): float(r["latency_ms"]) for r in rows}


def project(rows: list[dict], tpf: dict[int, float]) -> list[dict]:
    """One row per measured batch size C: AR tok/s and, for each stride N with a measured Q = 2N − 1,
    ISD tok/s = TPF(N) / latency(C, 2N − 1) and its ratio to AR; the best N (1 = AR) and its speed."""
    lat = latency_table(rows)
    out = []
    for c in sorted({b for b, _ in lat}):
        if (c, 1) not in lat:
            continue
        ar = 1e3 / lat[(c, 1)]
        row = {"concurrency": c, "ar_tok_s": round(ar, 1), "isd": {}}
        best_n, best = 1, ar
        for n, t in sorted(tpf.items()):
            q = 2 * n - 1
            if (c, q) not in lat:
                continue
            speed = t * 1e3 / lat[(c, q)]
            row["isd"][n] = {"tok_s": round(speed, 1), "over_ar": round(speed / ar, 3),
                             "step_over_ar_step": round(lat[(c, q)] / lat[(c, 1)], 3)}
            if speed > best:
                best_n, best = n, speed
        row.update(best_n=best_n, best_tok_s=round(best, 1), best_over_ar=round(best / ar, 3))
        out.append(row)
    return out


def render_markdown(projection: list[dict], tpf: dict[int, float], title: str) -> str:
    """A markdown table of `project`'s rows, the paper's measured speeds beside them where it has the C."""
    ns = sorted(tpf)
    head = ["C", "AR tok/s"] + [f"N={n} (TPF {tpf[n]:.2f})" for n in ns] + ["best N", "paper AR / I-DLM N=4"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in projection:
        cells = [str(r["concurrency"]), f"{r['ar_tok_s']:.0f}"]
        for n in ns:
            e = r["isd"].get(n)
            cells.append(f"{e['tok_s']:.0f} ({e['over_ar']:.2f}×)" if e else "not measured")
        cells.append(f"{r['best_n']} ({r['best_over_ar']:.2f}×)")
        paper = PAPER_SPEED.get(r["concurrency"])
        cells.append(f"{paper[0]} / {paper[1]} ({paper[1] / paper[0]:.2f}×)" if paper else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
