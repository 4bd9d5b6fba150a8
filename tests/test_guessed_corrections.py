"""ISD / R-ISD guessed corrections (`idlm.decoding.isd`, "Guessed corrections"): with rejection branches, each
draft s_j also gets G guessed groups — a clean row holding one of the drafter's next-best tokens at j, then
MASK rows — so that a correction equal to a guess is followed by drafts that saw it; with `guess_rows` W a
group is W rows and the drafts past them after a right guess come from the branch.

Oracles:
- a brute-force visibility matrix for the layout (`branch_layout(n, guesses)`);
- plain causal forwards: a guess row's logits are the unchanged model's after [prefix, s_0..s_{j−1}, guess]
  (the target's p̃ of the token after the correction, when the guess is right), and its MASK rows draft as a
  block [pending, s_0..s_{j−1}, guess, MASK…] would;
- greedy AR: greedy ISD and R-ISD with guesses emit its tokens (reference runner and engine);
- the reference runner for the engine (greedy and seeded sampling; the kernel and the graph input layout:
  tests/test_rejection_branches.py's kernel test, with guesses);
- (the chi-square of sampling with guesses against the enumerated AR law: tests/test_isd_distribution.py;
  overlapped steps with guesses: tests/test_overlap.py's CASES).
"""

from __future__ import annotations

import pytest
import torch
from test_isd import MASK, greedy, random_prompts, tiny_config
from test_rejection_branches import _visible

from idlm.decoding import make_decoder
from idlm.decoding.ar import ARDecoder
from idlm.decoding.base import DecodeStats
from idlm.decoding.isd import ISDDecoder, ISDState, branch_layout, guess_tokens
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError
from idlm.layers.attention import KVCache
from idlm.layers.lora import LoRAAdapter, LoRAConfig
from idlm.models.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_config()).init_weights(std=0.6, seed=0).eval()


@pytest.mark.parametrize("n,g,w", [(2, 1, None), (3, 2, None), (4, 1, None), (5, 3, None), (4, 1, 1), (4, 2, 2),
                                   (5, 2, 1), (3, 1, 9)])
def test_guessed_groups_see_the_accepted_prefix_their_guess_and_their_own_rows(n, g, w):
    k, main = n - 1, 2 * n - 1
    rows = k if w is None else min(w, k)  # (a W past K is K)
    dec = ISDDecoder(n, MASK, branches=True, guesses=g, guess_rows=w)
    offsets, hide = branch_layout(n, g, dec.guess_rows)
    q = main + k * k + g * k * rows
    assert len(offsets) == len(hide) == q == dec.query_len
    assert (offsets[:main + k * k], hide[:main + k * k]) == branch_layout(n)  # the branches' rows are unchanged
    vis = _visible(offsets, hide)
    for j in range(k):
        for m in range(g):
            start = main + k * k + (j * g + m) * rows
            assert dec._guess_rows[j * g + m] == start
            for i in range(rows):
                t = start + i
                assert offsets[t] == j + 1 + i  # the guess where the correction of s_j goes, MASKs after it
                assert vis[t] == [r <= j or start <= r <= t for r in range(q)], (n, g, j, m, i)


def test_guess_tokens_are_the_next_best_other_than_the_draft():
    sel = torch.tensor([[[0.1, 0.9, 0.5, 0.3], [0.8, 0.1, 0.7, 0.2]]])  # [1, K = 2, V = 4]
    # draft 0 is the argmax (1): guesses 2, 3; draft 1 is a sampled low token (3): guesses 0, 2
    assert guess_tokens(sel, torch.tensor([[1, 3]]), 2).tolist() == [[2, 3, 0, 2]]
    assert guess_tokens(sel, torch.tensor([[2, 0]]), 1).tolist() == [[1, 2]]
    # one guess takes a masked argmax rather than topk: the same tokens (random logits: no ties), the draft being
    # the argmax (greedy) or any token (sampled)
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        sel = torch.randn(3, 4, 50, generator=g)
        drafts = sel.argmax(-1) if trial % 2 else torch.randint(0, 50, (3, 4), generator=g)
        top = sel.topk(2, dim=-1).indices
        assert torch.equal(guess_tokens(sel, drafts, 1), torch.where(top[..., 0] == drafts, top[..., 1], top[..., 0]))


@pytest.mark.parametrize("lora,w", [(False, None), (True, None), (True, 2), (False, 1)])
def test_guess_rows_equal_the_blocks_a_right_guess_stands_for(model, lora, w):
    """Guessed group (j, m) of a verify block [pending, s_0..s_{K−1}, …] computes what a plain causal block
    [pending, s_0..s_{j−1}, guess, MASK × (W−1)] over the same prefix would: its first row (clean, gate off)
    the unchanged model's logits after the guess, its MASK rows the drafts that follow it (W rows; None:
    K). fp32."""
    n, k, g = 4, 3, 2
    rows = k if w is None else w
    prompt = random_prompts((9,), seed=3)[0]
    adapter = None
    if lora:
        adapter = LoRAAdapter(model.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=1, zero_b=False)
    dec = ISDDecoder(n, MASK, lora=lora, branches=True, guesses=g, guess_rows=w)
    guesses = [21, 22, 31, 32, 41, 42]
    blk = dec.block(ISDState("V", last=7, specs=[11, 12, 13], guesses=guesses))
    kw = {}

    def forward(tokens, offsets, start, is_mask, gate, hide=None):
        cache = KVCache.for_model(model.config, 1, 64)
        model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache.view(starts=torch.tensor([0])))
        if lora:
            kw.update(lora=adapter, lora_gate=torch.tensor([gate]), is_mask=torch.tensor([is_mask]))
        view = cache.view(starts=torch.tensor([start]), hide=None if hide is None else torch.tensor([hide]))
        h = model(torch.tensor([tokens]), (start + torch.tensor(offsets))[None], view, **kw)
        return model.compute_logits(h)[0]

    P = len(prompt)
    with torch.no_grad():
        got = forward(blk.tokens, blk.offsets, P, blk.is_mask, blk.gate, blk.hide)
        plain = model.logits  # the model alone: no adapter, no MASK
        for j in range(k):
            for m in range(g):
                guess = guesses[j * g + m]
                start = 2 * n - 1 + k * k + (j * g + m) * rows
                assert blk.tokens[start] == guess and not blk.is_mask[start]
                assert blk.is_mask[start + 1: start + rows] == [True] * (rows - 1)
                tokens = [7, *[11, 12, 13][:j], guess] + [MASK] * (rows - 1)
                flags = [False] * (j + 2) + [True] * (rows - 1)
                want = forward(tokens, list(range(len(tokens))), P, flags, flags)
                torch.testing.assert_close(got[start: start + rows], want[j + 1:], rtol=1e-5, atol=1e-5)
                ar = plain(torch.tensor([prompt + tokens[:j + 2]]))[0, -1]
                torch.testing.assert_close(got[start], ar, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,g,w", [(2, 1, None), (3, 2, None), (4, 1, None), (4, 1, 1), (4, 2, 2)])
def test_greedy_with_guesses_equals_greedy_ar(model, n, g, w):
    prompts = random_prompts()
    ar = generate(model, ARDecoder(), prompts, greedy(40))
    for mode in ("sample", "argmax"):
        outs = generate(model, ISDDecoder(n, MASK, branches=True, guesses=g, guess_rows=w), prompts,
                        greedy(40, draft=mode))
        assert [o.token_ids for o in outs] == [a.token_ids for a in ar], (n, g, w, mode)
        s = DecodeStats.total([o.stats for o in outs])
        assert s.rounds["cold"] == len(prompts) and s.guessed > 0  # corrections met their guesses


def test_risd_greedy_with_guesses_equals_the_base_models_ar():
    base = Transformer(tiny_config(mask=False)).init_weights(std=0.6, seed=2).eval()
    adapter = LoRAAdapter(base.config, LoRAConfig(rank=4)).init_weights(std=0.3, seed=0, zero_b=False)
    prompts = random_prompts(seed=5)
    ar = generate(base, ARDecoder(), prompts, greedy(30))
    outs = generate(base, ISDDecoder(3, None, lora=True, branches=True, guesses=2), prompts, greedy(30),
                    lora=adapter)
    assert [o.token_ids for o in outs] == [a.token_ids for a in ar]
    assert DecodeStats.total([o.stats for o in outs]).guessed > 0


@pytest.mark.parametrize("w", [None, 1])
def test_guesses_raise_the_tpf_of_a_trained_drafter(tiny, w):
    """The embedded idlm-tiny at N = 4: the same greedy tokens in fewer forwards with one guess a draft than
    with branches alone, in full groups and in groups of the guess row alone (CPU, fp32; docs/risd.md
    "Session 34", "Session 35")."""
    m, tok = tiny
    prompts = [tok.encode(t) for t in ("The cat", "Once upon a time", "1 + 2 =", "Hello")]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    tree = generate(m, make_decoder("isd", 4, m.config, tok, branches=True), prompts, params)
    guessed = generate(m, make_decoder("isd", 4, m.config, tok, branches=True, guesses=1, guess_rows=w), prompts,
                       params)
    assert [o.token_ids for o in guessed] == [o.token_ids for o in tree]
    t, g = DecodeStats.total([o.stats for o in tree]), DecodeStats.total([o.stats for o in guessed])
    assert g.guessed > 0 and g.tpf > t.tpf, (t.to_dict(), g.to_dict())


@pytest.mark.parametrize("stride,g,w", [(2, 1, None), (4, 2, None), (4, 1, 1), (5, 2, 2)])
def test_engine_with_guesses_equals_reference_greedy_and_seeded(tiny, stride, g, w):
    m, tok = tiny
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 200, (int(n),), generator=gen).tolist() for n in (3, 17, 8, 30, 5, 12)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, top_k=0 if i % 3 else 20, seed=i,
                             max_tokens=10 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    ref = generate(m, make_decoder("isd", stride, m.config, tok, branches=True, guesses=g, guess_rows=w), prompts,
                   params)
    eng = LLMEngine(m, None, EngineConfig(decoder="isd", stride=stride, page_size=8, num_pages=96, branches=True,
                                          guesses=g, guess_rows=w))
    got = eng.run(prompts, params)
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages  # nothing leaked
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.stats.forwards for o in got] == [o.stats.forwards for o in ref]
    assert [o.stats.guessed for o in got] == [o.stats.guessed for o in ref]
    k = stride - 1
    assert eng.max_query_len == 2 * stride - 1 + k * k + g * k * (k if w is None else w)


def test_guess_options_are_checked(tiny):
    m, _ = tiny
    with pytest.raises(ConfigError, match="guesses .* need branches"):
        EngineConfig(decoder="isd", stride=4, guesses=1)
    with pytest.raises(ConfigError, match="fixed stride"):
        EngineConfig(decoder="isd", stride="auto", branches=True, guesses=1)
    for bad in (-1, 9, True, 1.5):
        with pytest.raises(ConfigError, match="guesses"):
            EngineConfig(decoder="isd", stride=4, branches=True, guesses=bad)
    with pytest.raises(ConfigError, match="rejection branches"):
        make_decoder("sdar", 4, m.config, guesses=1)
    with pytest.raises(ConfigError, match="go with rejection branches"):
        ISDDecoder(4, MASK, guesses=1)
    with pytest.raises(ConfigError, match="guesses"):
        ISDDecoder(4, MASK, branches=True, guesses=-2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="guess_rows"):
            EngineConfig(decoder="isd", stride=4, branches=True, guesses=1, guess_rows=bad)
        with pytest.raises(ConfigError, match="guess_rows"):
            ISDDecoder(4, MASK, branches=True, guesses=1, guess_rows=bad)
    with pytest.raises(ConfigError, match="guess_rows .* needs guesses"):
        EngineConfig(decoder="isd", stride=4, branches=True, guess_rows=1)
    with pytest.raises(ConfigError, match="with guesses > 0"):
        ISDDecoder(4, MASK, branches=True, guess_rows=1)


def test_logprobs_with_guesses_are_the_base_models(model):
    """Raw logprobs of the emitted tokens sit after the guess columns of the packed output
    (`ISDDecoder.packed_width`): with guesses they are the same as without (greedy: the same tokens, each
    scored by the clean row that predicted it)."""
    prompts = random_prompts(seed=7)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    plain = generate(model, ISDDecoder(4, MASK, branches=True), prompts, params)
    guessed = generate(model, ISDDecoder(4, MASK, branches=True, guesses=2), prompts, params)
    assert DecodeStats.total([o.stats for o in guessed]).guessed > 0
    for a, b in zip(plain, guessed):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)
        assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
