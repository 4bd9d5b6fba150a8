"""SDAR-style block-diffusion decoding (SPEC §6): the runner's KV-cache decoder equals a brute-force
reference that recomputes every forward from scratch with an explicit dense attention mask."""

from __future__ import annotations

import pytest
import torch

from idlm.decoding import make_decoder
from idlm.decoding.base import DecodeStats
from idlm.decoding.reference import generate
from idlm.decoding.sampling import RequestRNG, SamplingParams, filtered_probs, sample
from idlm.decoding.sdar import SDARDecoder, unmask_choice
from idlm.errors import ConfigError
from idlm.layers.attention import DenseAttention
from idlm.models.config import ModelConfig
from idlm.models.transformer import Transformer

MASK = 63
CFG = dict(family="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=256)


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig(**CFG, mask_token_id=MASK)).init_weights(std=0.5, seed=0).eval()


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 63, (n,), generator=g).tolist() for n in lengths]


def dense_mask(prompt_len: int, total: int, block: int) -> torch.Tensor:
    """[T, T] bool, True = may attend: the prompt causal; each generated block (committed or current)
    sees the prompt, every earlier block and its whole own block."""
    pos = torch.arange(total)
    blk = torch.where(pos < prompt_len, -1, (pos - prompt_len).div(block, rounding_mode="floor"))
    q, k = pos[:, None], pos[None, :]
    prompt_q = (q < prompt_len) & (k <= q)
    gen_q = (q >= prompt_len) & ((k < prompt_len) | (blk[None, :] <= blk[:, None]))
    return prompt_q | gen_q


@torch.no_grad()
def reference_sdar(model, prompt, block, threshold, max_tokens, params=None, rng=None, eos=()):
    """Brute force: every forward recomputes [prompt | committed blocks | current block] from scratch.
    Greedy when params is None; else candidates ~ p̃ drawn with `sample` from `rng` (the same
    random stream the decoder consumes: one [B, V] exponential draw per forward).
    Returns (tokens, forwards, q): q = p̃(token) when it was drawn (1 under greedy decoding)."""
    seq, out, qs, forwards = list(prompt), [], [], 0
    while len(out) < max_tokens:
        cur, masked, q = [MASK] * block, [True] * block, [None] * block
        while any(masked):
            ids = seq + cur
            T = len(ids)
            attn = DenseAttention(dense_mask(len(prompt), T, block)[None, None])
            logits = model.logits(torch.tensor([ids]), torch.arange(T)[None], attn)[0, -block:]  # [B, V]
            forwards += 1
            if params is None:
                conf, cand = torch.softmax(logits, -1).max(-1)
                prob = torch.ones(block)
            else:
                rep = lambda x: torch.tensor([x] * block)  # noqa: E731
                p = filtered_probs(logits, rep(float(params.temperature)), rep(params.top_k), rep(float(params.top_p)))
                cand = sample(p[None], [rng])[0]
                conf = prob = p.gather(-1, cand[:, None])[:, 0]
            conf, cand, prob = conf.tolist(), cand.tolist(), prob.tolist()
            open_slots = [j for j in range(block) if masked[j]]
            best = max(open_slots, key=lambda j: (conf[j], -j))
            for j in open_slots:
                if conf[j] >= threshold or j == best:
                    cur[j], masked[j], q[j] = cand[j], False, prob[j]
        seq += cur
        for t, qt in zip(cur, q):
            out.append(t)
            qs.append(qt)
            if t in eos or len(out) == max_tokens:
                return out, forwards, qs
    return out, forwards, qs


@pytest.mark.parametrize("block", [1, 2, 4])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0])
def test_greedy_batched_equals_brute_force_reference(model, block, threshold):
    prompts = prompts_of((1, 5, 11, 3))
    outs = generate(model, SDARDecoder(block, MASK, threshold), prompts,
                    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref, forwards, _ = reference_sdar(model, p, block, threshold, 12)
        assert o.token_ids == ref
        assert o.token_probs == [1.0] * 12
        assert o.finish_reason == "length"
        assert (o.stats.forwards, o.stats.committed) == (forwards, 12)


def test_seeded_sampling_equals_reference_and_is_batch_independent(model):
    sp = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True)
    greedy = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    prompts = prompts_of((6, 2))
    dec = SDARDecoder(4, MASK, 0.3)
    batched = generate(model, dec, prompts, [greedy, sp])
    alone = generate(model, dec, [prompts[1]], sp)[0]
    ref, forwards, qs = reference_sdar(model, prompts[1], 4, 0.3, 10, params=sp, rng=sp.rng())
    assert batched[1].token_ids == alone.token_ids == ref
    assert alone.stats.forwards == forwards
    assert alone.token_probs == pytest.approx(qs, abs=1e-5) and all(0 < q <= 1 for q in qs)
    assert batched[0].token_ids == reference_sdar(model, prompts[0], 4, 0.3, 7)[0]


def test_threshold_one_unmasks_one_slot_per_forward(model):
    out = generate(model, SDARDecoder(4, MASK, 1.0), prompts_of((7,)),
                   SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    assert (out.stats.forwards, out.stats.committed) == (16, 16)
    assert out.stats.tpf == 1.0


def test_tiny_threshold_unmasks_the_whole_block_in_one_forward(model):
    for block in (1, 2, 4):
        out = generate(model, SDARDecoder(block, MASK, 1e-9), prompts_of((7,)),
                       SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
        assert (out.stats.forwards, out.stats.committed) == (16 // block, 16)
        assert out.stats.tpf == block
        assert out.token_ids == reference_sdar(model, prompts_of((7,))[0], block, 1e-9, 16)[0]


def test_max_tokens_not_a_multiple_of_the_block_truncates(model):
    prompt = prompts_of((4,))[0]
    dec = SDARDecoder(4, MASK, 0.9)
    full = generate(model, dec, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    for n in (1, 3, 6, 9):
        out = generate(model, dec, [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
        assert out.token_ids == full.token_ids[:n] and out.finish_reason == "length"
        assert out.stats.committed == n
        assert out.stats.forwards == reference_sdar(model, prompt, 4, 0.9, n)[1]


def test_eos_inside_a_block_truncates_after_it(model):
    prompt, block = prompts_of((5,), seed=3)[0], 4
    dec = SDARDecoder(block, MASK, 0.9)
    free = generate(model, dec, [prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
    k = next(i for i, t in enumerate(free) if i % block != block - 1 and free.index(t) == i)
    out = generate(model, dec, [prompt], SamplingParams(temperature=0, max_tokens=16), eos_token_ids=[free[k]])[0]
    assert out.token_ids == free[: k + 1] == reference_sdar(model, prompt, block, 0.9, 16, eos=(free[k],))[0]
    assert out.finish_reason == "stop"
    assert out.stats.committed == k + 1


def test_layout_and_kv_accounting_with_scripted_logits():
    """B = 2: [current | MASK pad] keeps nothing; after a finish [finished clean | new block] keeps B."""
    dec, V = SDARDecoder(2, 9, 0.9), 10
    rngs = [RequestRNG(0)]
    states, first = dec.start(torch.zeros(1, V), [SamplingParams(temperature=0)], rngs)
    assert [(r.emitted, r.advance) for r in first] == [([], 0)] and dec.query_len == 4

    def logits_for(rows):  # {query index: (token, logit)} -> [1, 4, V]
        lg = torch.zeros(1, 4, V)
        for i, (tok, val) in rows.items():
            lg[0, i, tok] = val
        return lg

    def run(rows):
        st = DecodeStats()
        res = dec.step(states, logits_for(rows), [SamplingParams(temperature=0)], rngs, [st])[0]
        return res.emitted, res.advance

    blk = dec.block(states[0])
    assert blk.tokens == [9, 9, 9, 9] and blk.is_mask == [True] * 4 and blk.visible == [1, 1, 3, 3]
    # slot 1 is confident (p ≈ 1), slot 0 is not: only slot 1 is unmasked
    assert run({0: (3, 1.0), 1: (4, 30.0)}) == ([], 0)
    assert dec.block(states[0]).tokens == [9, 4, 9, 9] and dec.block(states[0]).is_mask == [True, False, True, True]
    # nothing confident: the most confident open slot anyway; the block is full and emitted at once
    assert run({0: (5, 2.0), 2: (7, 30.0), 3: (7, 30.0)}) == ([5, 4], 0)
    blk = dec.block(states[0])
    assert blk.tokens == [5, 4, 9, 9] and blk.is_mask == [False, False, True, True] and blk.visible == [1, 1, 3, 3]
    # the commit forward: the current block is the second half; the clean first half is kept
    assert run({2: (1, 30.0), 3: (2, 30.0)}) == ([1, 2], 2)
    assert dec.block(states[0]).tokens == [1, 2, 9, 9]
    # a commit forward that does not finish the next block still keeps the clean block
    assert run({2: (6, 30.0), 3: (8, 0.5)}) == ([], 2)
    assert dec.block(states[0]).tokens == [6, 9, 9, 9]


def test_unmask_choice():
    conf = torch.tensor([[0.2, 0.95, 0.91, 0.3], [0.4, 0.4, 0.1, 0.0], [0.9, 0.9, 0.9, 0.9]])
    masked = torch.tensor([[True, True, False, True], [False, True, True, True], [False] * 4])
    got = unmask_choice(conf, masked, 0.9)
    assert got.tolist() == [[False, True, False, False], [False, True, False, False], [False] * 4]
    assert unmask_choice(conf, torch.ones_like(masked), 1.0).sum(-1).tolist() == [1, 1, 1]


def test_bad_configurations():
    with pytest.raises(ConfigError, match="block_size"):
        SDARDecoder(0, MASK)
    with pytest.raises(ConfigError, match="block_size"):
        SDARDecoder(2.0, MASK)
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            SDARDecoder(4, MASK, bad)
    with pytest.raises(ConfigError, match="MASK"):
        SDARDecoder(4, None)
    with pytest.raises(ConfigError, match="needs a MASK token"):
        make_decoder("sdar", 4, ModelConfig(**CFG))
    dec = make_decoder("sdar", 4, ModelConfig(**CFG, mask_token_id=MASK), threshold=0.5)
    assert isinstance(dec, SDARDecoder) and (dec.block_size, dec.mask_token_id, dec.threshold) == (4, MASK, 0.5)
    assert dec.name == "sdar" and dec.needs_mask_token and not dec.uses_lora and dec.query_len == 8
    assert dec.stride == 4
