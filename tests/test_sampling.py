"""p̃ (temperature, top-k, top-p) against a brute-force oracle, and the sampler's distribution."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding.sampling import RequestRNG, SamplingParams, filtered_probs, params_tensors, sample
from idlm.errors import ConfigError


def brute_force(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """One row, written the slow obvious way."""
    V = logits.numel()
    if t == 0:
        out = torch.zeros(V)
        out[int(logits.argmax())] = 1
        return out
    probs = torch.softmax(logits.double() / t, -1)
    order = sorted(range(V), key=lambda i: (-probs[i].item(), i))
    kept = order[: k] if k > 0 else order
    mass = sum(probs[i].item() for i in kept)
    chosen, acc = [], 0.0
    for i in kept:
        chosen.append(i)
        acc += probs[i].item() / mass
        if acc >= p - 1e-12:
            break
    out = torch.zeros(V, dtype=torch.float64)
    for i in chosen:
        out[i] = probs[i]
    return (out / out.sum()).float()


CASES = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 10, 0.5), (0.0, 0, 1.0), (0.0, 3, 0.2),
         (2.0, 1, 1.0), (1.0, 0, 0.01)]


def test_filtered_probs_matches_brute_force_with_per_row_params():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), 50, generator=g) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in CASES]
    got = filtered_probs(logits, *params_tensors(params, "cpu"))
    for row, (t, k, p) in enumerate(CASES):
        assert torch.allclose(got[row], brute_force(logits[row], t, k, p), atol=1e-6), CASES[row]


def test_sampler_follows_the_distribution_and_seeds_reproduce():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]])
    n = 40_000
    stream = RequestRNG(1)  # each call takes the next draw of the same request
    draws = torch.stack([sample(probs, [stream]) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=5).double() / n
    sigma = (probs[0].double() * (1 - probs[0].double()) / n).sqrt()
    assert ((freq - probs[0]).abs() <= 5 * sigma + 1e-12).all(), freq
    assert freq[4] == 0  # a filtered-out token is never drawn
    a = [sample(probs, [SamplingParams(seed=3).rng()]).item() for _ in range(20)]
    assert len(set(a)) == 1  # a fresh stream with the same seed draws the same token


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(max_tokens=0), "max_tokens"), (dict(seed="x"), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(draft_temperature=0.0), "draft_temperature"),
    (dict(draft_temperature=float("inf")), "draft_temperature"), (dict(draft_temperature="0.5"), "draft_temperature"),
    (dict(verification="joint"), "verification"), (dict(verification=None), "verification"),
])
def test_bad_sampling_parameters_name_the_parameter(kwargs, name):
    with pytest.raises(ConfigError, match=f"invalid sampling parameter {name}="):
        SamplingParams(**kwargs)


def test_top_k_selection_path_equals_the_brute_force_and_the_sort():
    """truncate=K (every row 0 < top_k <= K): a top-K selection instead of the sort, same p̃."""
    from idlm.decoding.sampling import TOPK_CAP, truncation

    cases = [(1.0, 5, 1.0), (0.7, 10, 0.5), (1.3, 1, 1.0), (0.0, 3, 0.2), (2.0, 16, 0.9), (1.0, 7, 0.01)]
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(cases), 300, generator=g) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in cases]
    assert truncation(params) == 16  # the largest top_k, rounded up to a power of two
    tensors = params_tensors(params, "cpu")
    fast, full = filtered_probs(logits, *tensors, truncate=16), filtered_probs(logits, *tensors, truncate=True)
    assert torch.allclose(fast, full, atol=1e-6)
    for row, (t, k, p) in enumerate(cases):
        assert torch.allclose(fast[row], brute_force(logits[row], t, k, p), atol=1e-6), cases[row]
    # the decision: no truncation, a selection, or the full sort (a row without top_k, or top_k too large)
    sp = SamplingParams
    assert truncation([sp(temperature=1.0), sp(temperature=0.5)]) is False
    assert truncation([sp(top_k=3), sp(top_k=40, top_p=0.9)]) == 64
    assert truncation([sp(top_k=3), sp(top_p=0.9)]) is True
    assert truncation([sp(top_k=TOPK_CAP + 1)]) is True
    assert filtered_probs(logits[:1, :8], *params_tensors([sp(top_k=5)], "cpu"), truncate=16).shape == (1, 8)


def test_a_row_that_filters_nothing_keeps_its_bits_in_a_batch_that_filters():
    """The batch decides `truncate` (any row with top-k / top-p: a sort or a top-K selection); a row with
    neither gets, bit for bit, the p̃ it gets alone (truncate=False) — every token with its mass. Before session
    40 it went through the sort: renormalised twice, and its float32 cumulative mass reached 1 before the tail,
    so top_p = 1 dropped the last ~100 of 8,192 tokens; seeded requests then drew other tokens in such batches
    than alone (found by scripts/fuzz_engine.py: cases 2029 and 5066). Rows that do filter get the same p̃
    at every truncate mode their params allow."""
    g = torch.Generator().manual_seed(0)
    V = 8192
    logits = torch.randn(4, V, generator=g) * 3
    temp = torch.tensor([1.0, 1.0, 0.7, 1.3])

    def probs(top_k, top_p, truncate, rows=4):
        return filtered_probs(logits[:rows], temp[:rows], torch.tensor(top_k[:rows]), torch.tensor(top_p[:rows]),
                              truncate)

    alone = probs([0], [1.0], False, rows=1)[0]
    assert (alone > 0).all()
    for mates_k, mates_p, truncate in (([0, 0, 0], [0.9, 0.9, 0.9], True), ([20, 0, 5], [1.0, 0.5, 1.0], True)):
        assert torch.equal(probs([0, *mates_k], [1.0, *mates_p], truncate)[0], alone)
    for top_p in (1.0, 0.9):  # a top_k row: its selection (K = 32 alone, 128 beside top_k 100) or the sort
        own = probs([20, 20, 20, 20], [top_p] * 4, 32)[0]
        assert torch.equal(probs([20, 100, 20, 20], [top_p] * 4, 128)[0], own)
        assert torch.equal(probs([20, 0, 20, 20], [top_p, 0.9, 1.0, 1.0], True)[0], own)


def test_engine_with_top_k_rows_equals_the_reference_runner():
    """A seeded top-k (+ top-p) batch takes the selection path in the engine and in the reference runner
    alike: identical tokens, ISD and AR."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_transformer

    from idlm.decoding import make_decoder
    from idlm.decoding.reference import generate
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    model = tiny_transformer(64, mask_token_id=3, max_position_embeddings=256)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    params = [SamplingParams(temperature=1.0, top_k=8, seed=1, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=2, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.2, top_k=3, seed=3, max_tokens=12, ignore_eos=True)]
    for decoder in ("ar", "isd"):
        eng = LLMEngine(model, None, EngineConfig(decoder=decoder, stride=3, num_pages=64, max_num_seqs=4))
        got = [o.token_ids for o in eng.run(prompts, params)]
        ref = [o.token_ids for o in generate(model, make_decoder(decoder, 3, model.config), prompts, params)]
        assert got == ref and all(len(t) == 12 for t in got)


def _graph_ops(fn, *args) -> set[str]:
    """The ops of the FX graph torch.compile hands its backend for fn(*args) (no inductor: aot_eager's input)."""
    seen: set[str] = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_compiled_cumulative_sums_are_opaque_calls_with_eager_values():
    """Inside a compiled function the CDF's and top-p's cumulative sums are the `idlm::cumsum_last` op (ATen's
    cumsum, opaque to inductor, whose split-scan kernel fails on a long vocabulary in torch 2.11: the whole
    sampled step then ran eagerly on the H200), eagerly plain cumsum; same numbers either way."""
    from idlm.decoding.sampling import cumsum_last, inverse_cdf

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4096, generator=g), -1)
    u = torch.rand(3, generator=g)
    ops = _graph_ops(inverse_cdf, probs, u)
    assert any("cumsum_last" in o for o in ops) and not any(o.endswith("cumsum") for o in ops), ops
    assert torch.equal(torch.compile(inverse_cdf)(probs, u), inverse_cdf(probs, u))
    assert torch.equal(cumsum_last(probs), probs.cumsum(-1))
    temperature, top_k, top_p = torch.ones(3), torch.zeros(3, dtype=torch.long), torch.full((3,), 0.9)
    ops = _graph_ops(filtered_probs, probs.log(), temperature, top_k, top_p)
    assert any("cumsum_last" in o for o in ops) and not any(o.endswith("cumsum") for o in ops), ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor's Triton kernels)")
@pytest.mark.parametrize("vocab", [49152, 151936])
def test_sampled_isd_step_compiles_at_long_vocabularies(vocab):
    """The sampled ISD step compiles (no fallback attempt, no eager run) at SmolLM2's and Qwen3's vocabularies,
    where torch 2.11's inductor failed every attempt before the cumulative sums became opaque calls."""
    from idlm.decoding.isd import sampled_isd_step
    from idlm.layers.fused import compile_fallbacks

    torch._dynamo.reset()
    B, n = 2, 4
    k, dev = n - 1, "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, 2 * n - 1, vocab, device=dev, generator=g)
    args = (logits, torch.tensor([True, False], device=dev), torch.randint(0, vocab, (B, k), device=dev, generator=g),
            torch.full((B,), 0.7, device=dev), torch.zeros(B, dtype=torch.long, device=dev), torch.ones(B, device=dev),
            torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.bool, device=dev),
            torch.ones(B, device=dev), torch.randint(0, 2**31, (B, 2), device=dev, generator=g),
            torch.arange(B, device=dev), torch.softmax(torch.randn(B, k, vocab, device=dev, generator=g), -1), False)
    packed, _ = sampled_isd_step(*args)
    eager, _ = sampled_isd_step.__wrapped__(*args)
    assert "sampled_isd_step" not in compile_fallbacks()
    assert torch.equal(packed[:, :2 + k], eager[:, :2 + k])  # accepted count, final token and drafts


# ----------------------------------------------------------------- inverse_cdf in two levels

def _first_above(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brute-force oracle in float64: the first index whose cumulative mass exceeds u times the total."""
    cdf = p.double().cumsum(-1)
    x = u.double()[:, None] * cdf[:, -1:]
    return (cdf <= x).sum(-1)


@pytest.mark.parametrize("vocab", [4096 + 37, 49152, 3 * 1024 + 1])
def test_two_level_inverse_cdf_picks_the_token_of_the_flat_cdf(vocab):
    """Rows longer than two blocks are inverted block first, then inside the block: the token of the flat
    float64 cumulative sum, except where x lies within float32 rounding of an interval's edge."""
    from idlm.decoding.sampling import inverse_cdf

    g = torch.Generator().manual_seed(1)
    p = torch.softmax(3 * torch.randn(512, vocab, generator=g), -1)
    p[:, 5::11] = 0  # zeros everywhere, block edges included
    u = (torch.randint(0, 1 << 24, (512,), generator=g).float() + 0.5) / (1 << 24)
    got, want = inverse_cdf(p, u), _first_above(p, u)
    cdf = p.double().cumsum(-1)
    x = u.double() * cdf[:, -1]
    off = got != want
    # a difference only at an edge: x within 1e-5 of the cumulative mass at the oracle's token's boundary
    edge = torch.minimum((cdf.gather(-1, want[:, None]).squeeze(-1) - x).abs(),
                         (cdf.gather(-1, (want - 1).clamp(min=0)[:, None]).squeeze(-1) - x).abs())
    assert off.sum() <= 2 and bool((edge[off] < 1e-5).all()), (off.sum(), edge[off])
    assert bool((p.gather(-1, got[:, None]) > 0).all())


def test_two_level_inverse_cdf_follows_the_distribution_on_a_stratified_grid():
    """With u on an even grid of M points, token i must come ~M·p_i times (±2): a deterministic check of the
    law, over mass spread across blocks, a short last block and zeros between."""
    from idlm.decoding.sampling import CDF_BLOCK, inverse_cdf

    vocab, M = 5 * CDF_BLOCK + 300, 40_000
    g = torch.Generator().manual_seed(2)
    support = torch.randperm(vocab, generator=g)[:200]
    support[0] = vocab - 1  # the short last block's last id has mass
    p = torch.zeros(vocab)
    p[support] = torch.rand(200, generator=g) + 0.05
    p /= p.sum()
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    tokens = inverse_cdf(p.expand(M, vocab), u.float())
    counts = torch.bincount(tokens, minlength=vocab).double()
    assert bool((counts[p == 0] == 0).all())
    assert float((counts - M * p.double()).abs().max()) <= 2.0


def test_inverse_cdf_never_picks_a_token_without_mass():
    """u at its extremes, one-hot rows at either end of the vocabulary, mass only in the short last block,
    rounding onto the total: the token always has mass (flat and two-level paths)."""
    from idlm.decoding.sampling import CDF_BLOCK, inverse_cdf

    lo, hi = 0.5 / (1 << 24), 1 - 0.5 / (1 << 24)
    for vocab in (1000, 4 * CDF_BLOCK + 10):
        rows = torch.zeros(5, vocab)
        rows[0, 0] = 1.0
        rows[1, vocab - 1] = 1.0
        rows[2, -10:-3] = 1 / 7  # the short last block (two-level) / the row's end (flat)
        edge = CDF_BLOCK if vocab > CDF_BLOCK else vocab // 2
        rows[3, edge - 1] = 0.5  # a block's last id and the next block's first
        rows[3, edge] = 0.5
        rows[4, :] = 1 / vocab
        rows[4, -1] = 0.0
        for u in (lo, hi, 0.5):
            tok = inverse_cdf(rows, torch.full((5,), u))
            assert bool((rows.gather(-1, tok[:, None]) > 0).all()), (vocab, u, tok)


@pytest.mark.parametrize("vocab", [2047, 2048, 49152, 4 * 1024 + 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_argmax_is_torchs_argmax_with_ties_and_minus_inf(vocab, dtype, monkeypatch):
    """The chunked argmax (`chunk_stats`: a program per 1,024-entry chunk on the GPU) returns torch's index:
    the first maximum, also where the maximum repeats in several chunks, sits on a chunk's edge or in the
    padded last chunk, and beside chunks of −inf only."""
    from idlm.decoding import sampling
    from idlm.decoding.sampling import VOCAB_CHUNK, chunked_argmax

    monkeypatch.setattr(sampling, "CHUNKED_FROM", 0)  # chunks from two on (by default from 16: SmolLM2 has 48)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, vocab, generator=g).to(dtype)
    top = float(x.float().max()) + 1
    x[1, [5, VOCAB_CHUNK + 5]] = top  # one max in two chunks: the first wins
    x[2, [VOCAB_CHUNK - 1, VOCAB_CHUNK]] = top  # either side of a chunk edge
    x[3, vocab - 1] = top  # the last id (in the padded chunk when V is no multiple of the chunk)
    x[4, : min(vocab - 1, 3 * VOCAB_CHUNK)] = float("-inf")  # whole chunks of −inf before the max
    x[5] = 0.0  # all equal: id 0
    x[6, ::3] = top  # many ties
    got = chunked_argmax(x)
    assert torch.equal(got, x.argmax(-1))
    assert torch.equal(chunked_argmax(x.view(3, 4, vocab)), x.view(3, 4, vocab).argmax(-1))  # leading dims


@pytest.mark.parametrize("vocab", [1000, 49152, 3 * 1024 + 1])
def test_chunked_softmax_equals_torchs_softmax_within_rounding(vocab, monkeypatch):
    """Softmax from the chunks' maxima and partial sums: torch.softmax's values within float32 rounding (the
    sum is taken in another order), rows with −inf entries and whole chunks of −inf included; sums to 1."""
    from idlm.decoding import sampling
    from idlm.decoding.sampling import VOCAB_CHUNK, chunked_softmax

    monkeypatch.setattr(sampling, "CHUNKED_FROM", 0)

    g = torch.Generator().manual_seed(4)
    x = 4 * torch.randn(6, vocab, generator=g)
    x[1, ::7] = float("-inf")
    x[2, : min(vocab - 5, 2 * VOCAB_CHUNK)] = float("-inf")
    x[3] *= 40  # a row near one-hot
    got, want = chunked_softmax(x), torch.softmax(x, -1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    assert torch.allclose(got.double().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-5)
    assert bool((got[1, ::7] == 0).all())


def test_filtered_probs_one_hot_and_values_at_a_long_vocabulary(monkeypatch):
    """At a vocabulary long enough for the chunked path, p̃ is the brute force's (greedy rows: the one-hot of
    the first argmax; sampled rows: softmax(logits / T) with top-k / top-p)."""
    from idlm.decoding import sampling

    monkeypatch.setattr(sampling, "CHUNKED_FROM", 0)
    g = torch.Generator().manual_seed(5)
    V = 3 * 1024 + 11
    logits = torch.randn(len(CASES), V, generator=g) * 3
    logits[4, [17, 2 * 1024 + 3]] = 50.0  # a greedy row with a tie across chunks: id 17
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in CASES]
    got = filtered_probs(logits, *params_tensors(params, "cpu"))
    for row, (t, k, p) in enumerate(CASES):
        assert torch.allclose(got[row], brute_force(logits[row], t, k, p), atol=1e-6), CASES[row]
    assert int(got[4].argmax()) == 17 and float(got[4].sum()) == 1.0


def test_chunking_starts_at_chunked_from():
    """Short vocabularies keep torch's whole-row reductions (`chunk_stats` None), long ones are chunked."""
    from idlm.decoding.sampling import CHUNKED_FROM, VOCAB_CHUNK, chunk_stats

    assert chunk_stats(torch.randn(2, CHUNKED_FROM - 1)) is None
    cmax, carg, csum = chunk_stats(torch.randn(2, CHUNKED_FROM))
    assert cmax.shape == carg.shape == csum.shape == (2, CHUNKED_FROM // VOCAB_CHUNK)
