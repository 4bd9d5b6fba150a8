"""Raw logprobs, top-k logprobs and prompt logprobs (vLLM semantics) from the decoders and the engine.

Oracle: an independent teacher-forced forward of the plain model (no cache, no LoRA) over prompt +
generated tokens in float32, `log_softmax(model.compute_logits(model(ids)))`: position t's row is the
distribution of token t + 1. Every logprob the reference runner or the engine reports (emitted tokens,
their top-k ids and values, prompt tokens) must equal it, for AR, ISD (N = 2, 4) and R-ISD (whose oracle
is the base model without the adapter), greedy and sampled with temperature/top-k/top-p (logprobs stay
the raw ones, not p̃'s), under chunked prefill, prefix caching and forced preemption, and in batches
mixing requests with different k and without logprobs. SDAR's oracle is the dense block-bidirectional
forward of its unmasking step. Also: the default path computes nothing, the block manager caps prefix
hits for prompt logprobs, and bad values are ConfigErrors naming the parameter.
"""

from __future__ import annotations

import math

import pytest
import torch

from idlm.decoding import make_decoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import MAX_LOGPROBS, SamplingParams
from idlm.engine import model_runner
from idlm.engine.llm_engine import EngineConfig, LLMEngine
from idlm.errors import ConfigError
from idlm.layers.attention import DenseAttention

ATOL = 1e-4
TEXTS = ["def fibonacci(n):", "What is 17 + 25?", "class Stack:\n    def push(self, x):", "import os\n",
         "Reverse the order of the words in this text:\none two three"]


@torch.no_grad()
def oracle(model, ids: list[int]) -> torch.Tensor:
    """[T, V] float32: row t = log p(token t + 1 | ids[: t + 1]) of the plain model."""
    hidden = model(torch.tensor([ids]))
    return torch.log_softmax(model.compute_logits(hidden)[0].float(), dim=-1)


def check_top(top, row: torch.Tensor, k: int):
    vals, ids = row.topk(k)
    assert [t for t, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(vals.tolist(), abs=ATOL)


def check_output(model, out, k: int | None, prompt_k: int | None = None):
    """out's logprobs / prompt logprobs against the teacher-forced oracle."""
    prompt, gen = out.prompt_token_ids, out.token_ids
    lsm = oracle(model, prompt + gen)
    P = len(prompt)
    if k is None:
        assert out.logprobs == [] and out.top_logprobs == []
    else:
        assert len(out.logprobs) == len(out.top_logprobs) == len(gen) > 0
        want = [lsm[P - 1 + i, t].item() for i, t in enumerate(gen)]
        assert out.logprobs == pytest.approx(want, abs=ATOL)
        assert all(isinstance(x, float) for x in out.logprobs)
        for i, top in enumerate(out.top_logprobs):
            assert len(top) == k
            if k:
                check_top(top, lsm[P - 1 + i], k)
    if prompt_k is None:
        assert out.prompt_logprobs == [] and out.prompt_top_logprobs == []
    else:
        assert len(out.prompt_logprobs) == len(out.prompt_top_logprobs) == P
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] == []
        want = [lsm[i - 1, prompt[i]].item() for i in range(1, P)]
        assert out.prompt_logprobs[1:] == pytest.approx(want, abs=ATOL)
        for i in range(1, P):
            assert len(out.prompt_top_logprobs[i]) == prompt_k
            if prompt_k:
                check_top(out.prompt_top_logprobs[i], lsm[i - 1], prompt_k)


def prompts_of(tok, n=4):
    return [tok.encode(TEXTS[i % len(TEXTS)]) for i in range(n)]


def sampled(seed, **kw):
    return SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=seed, **kw)


def greedy(**kw):
    return SamplingParams(temperature=0, **kw)


def engine_of(model, tok, decoder, stride, lora=None, **kw):
    cfg = dict(decoder=decoder, stride=stride, page_size=8, num_pages=96, max_num_batched_tokens=256,
               max_num_seqs=8)
    cfg.update(kw)
    return LLMEngine(model, tok, EngineConfig(**cfg), lora=lora)


CASES = [("ar", 4), ("isd", 2), ("isd", 4), ("risd", 4)]


@pytest.mark.parametrize("decoder,stride", CASES)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_emitted_logprobs_equal_the_teacher_forced_oracle(tiny, tiny_ar, decoder, stride, mode):
    if decoder in ("ar", "risd"):
        model, tok, lora = tiny_ar
    else:
        (model, tok), lora = tiny, None
    lora = lora if decoder == "risd" else None
    prompts = prompts_of(tok)
    ks = [3, 0, MAX_LOGPROBS, 1]
    if mode == "greedy":
        params = [greedy(max_tokens=20, ignore_eos=True, logprobs=k) for k in ks]
    else:
        params = [sampled(i, max_tokens=20, ignore_eos=True, logprobs=k) for i, k in enumerate(ks)]
    ref = generate(model, make_decoder(decoder, stride, model.config, tok), prompts, params, lora=lora)
    got = engine_of(model, tok, decoder, stride, lora=lora).run(prompts, params)
    for r, g, k in zip(ref, got, ks):
        assert g.token_ids == r.token_ids
        check_output(model, r, k)  # the oracle is the plain (base) model: for R-ISD without the adapter
        check_output(model, g, k)
    # raw logprobs, not the distribution the tokens were drawn from (q = 1 under greedy decoding)
    lp = [x for o in got for x in o.logprobs]
    q = [math.log(x) for o in got for x in o.token_probs]
    assert max(abs(a - b) for a, b in zip(lp, q)) > 0.1
    if decoder != "ar":  # multi-token steps happened: emitted token i is scored at clean index i
        assert sum(o.stats.committed for o in got) > sum(o.stats.forwards for o in got)


def test_mixed_batch_equals_each_request_alone(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, 5)
    params = [greedy(max_tokens=16, ignore_eos=True, logprobs=2), sampled(1, max_tokens=16, ignore_eos=True),
              sampled(2, max_tokens=16, ignore_eos=True, logprobs=7, prompt_logprobs=3),
              greedy(max_tokens=16, ignore_eos=True), greedy(max_tokens=16, ignore_eos=True, logprobs=0)]
    batched = engine_of(model, tok, "isd", 4).run(prompts, params)
    ref_batched = generate(model, make_decoder("isd", 4, model.config, tok), prompts, params)
    for p, sp, b, rb in zip(prompts, params, batched, ref_batched):
        alone = engine_of(model, tok, "isd", 4).run([p], [sp])[0]
        for o in (b, rb):
            assert o.token_ids == alone.token_ids
            assert o.logprobs == pytest.approx(alone.logprobs, abs=ATOL)
            assert [[t for t, _ in top] for top in o.top_logprobs] == \
                [[t for t, _ in top] for top in alone.top_logprobs]
            assert o.prompt_logprobs == pytest.approx(alone.prompt_logprobs, abs=ATOL)
        check_output(model, b, sp.logprobs, sp.prompt_logprobs)
        check_output(model, rb, sp.logprobs, sp.prompt_logprobs)


@pytest.mark.parametrize("decoder,budget", [("ar", 5), ("isd", 7)])
def test_prompt_logprobs_with_chunked_prefill(tiny, decoder, budget, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(model_runner, "SCORE_CHUNK", 3)  # the vocabulary projection in pieces, too
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in TEXTS[:3]] + [tok.encode("x")]
    assert max(len(p) for p in prompts) > 3 * budget  # several chunks per prompt
    params = [greedy(max_tokens=6, ignore_eos=True, prompt_logprobs=k, logprobs=1) for k in (0, 4, MAX_LOGPROBS, 2)]
    for kw in (dict(), dict(max_num_batched_tokens=budget)):
        eng = engine_of(model, tok, decoder, 4, **kw)
        outs = eng.run(prompts, params)
        for o, sp in zip(outs, params):
            check_output(model, o, 1, sp.prompt_logprobs)
        assert outs[3].prompt_logprobs == [None]  # a one-token prompt: nothing predicts its token
    ref = generate(model, make_decoder(decoder, 4, model.config, tok), prompts, params)
    for o, sp in zip(ref, params):
        check_output(model, o, 1, sp.prompt_logprobs)


def test_prompt_logprobs_take_no_prefix_cache_hit(tiny):
    model, tok = tiny
    shared = tok.encode_chat([{"role": "user", "content": TEXTS[4] + " four five six seven"}])
    assert len(shared) > 24
    eng = engine_of(model, tok, "isd", 4)
    eng.run([shared + tok.encode(" abc")], greedy(max_tokens=4))  # leaves the shared pages in the cache

    def prefilled(prompt, sp):
        n0 = eng.counters["prefill_tokens"]
        out = eng.run([prompt], sp)[0]
        return out, eng.counters["prefill_tokens"] - n0

    prompt = shared + tok.encode(" def")
    out, n = prefilled(prompt, greedy(max_tokens=4, prompt_logprobs=2, logprobs=2))
    assert n == len(prompt)  # every prompt position computed (no hit)
    check_output(model, out, 2, 2)
    _, n = prefilled(prompt, greedy(max_tokens=4))
    assert n < len(prompt) - 16  # without prompt logprobs the same prompt does take the hit
    out, n = prefilled(prompt + tok.encode(" ghi"), greedy(max_tokens=4, prompt_logprobs=1))
    assert n == len(out.prompt_token_ids)
    check_output(model, out, None, 1)


@pytest.mark.parametrize("decoder", ["ar", "isd"])
def test_logprobs_survive_forced_preemption_without_duplicates(tiny, decoder):
    model, tok = tiny
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in TEXTS] * 2
    params = [greedy(max_tokens=12 + i, ignore_eos=True, logprobs=2, prompt_logprobs=1) if i % 2 else
              sampled(i, max_tokens=12 + i, ignore_eos=True, logprobs=3, prompt_logprobs=0)
              for i in range(len(prompts))]
    # a tiny pool and a small token budget: chunked prefills and constant preemption (recompute)
    eng = engine_of(model, tok, decoder, 4, num_pages=16, max_num_batched_tokens=12)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs = [eng.seqs[r].output for r in ids]
    step, mid_prefill = 0, 0
    while eng.has_unfinished():
        running = eng.scheduler.running
        if running and step % 3 == 1:  # also preempt by force, mid-prefill included
            victim = running[step % len(running)]
            mid_prefill += victim.prefilling
            eng.scheduler.preempt(victim)
        eng.step()
        step += 1
    assert eng.scheduler.num_preemptions > 10 and mid_prefill > 0
    for o, sp in zip(outs, params):
        check_output(model, o, sp.logprobs, sp.prompt_logprobs)
    assert eng.block_manager.num_free_pages == eng.block_manager.num_pages


@pytest.mark.parametrize("block", [1, 2])
def test_sdar_logprobs_are_the_unmasking_slots_own(tiny, block):
    """SDAR with a tiny threshold unmasks a whole block per forward, from the logits of [prompt | committed
    blocks | B MASKs], each block seeing itself bidirectionally (SPEC §3.5): the oracle is that dense forward
    (no logit shift: slot j's logits score the block's j-th token)."""
    model, tok = tiny
    mask = model.config.mask_token_id
    prompts = prompts_of(tok, 2)
    params = [greedy(max_tokens=6, ignore_eos=True, logprobs=2), sampled(3, max_tokens=6, ignore_eos=True)]
    ref = generate(model, make_decoder("sdar", block, model.config, tok, threshold=1e-9), prompts, params)
    got = engine_of(model, tok, "sdar", block, threshold=1e-9).run(prompts, params)
    assert got[0].token_ids == ref[0].token_ids and got[1].logprobs == ref[1].logprobs == []
    for o in (ref[0], got[0]):
        assert len(o.logprobs) == len(o.token_ids) == 6 and o.stats.forwards == 6 // block
        P = len(o.prompt_token_ids)
        for i in range(0, 6, block):
            ids = o.prompt_token_ids + o.token_ids[:i] + [mask] * block
            T = len(ids)
            pos = torch.arange(T)
            blk = torch.where(pos < P, -1, (pos - P).div(block, rounding_mode="floor"))
            q, k = pos[:, None], pos[None, :]  # the prompt causal; each block sees the prompt, earlier blocks, itself
            seen = torch.where(q < P, k <= q, (k < P) | (blk[None, :] <= blk[:, None]))
            with torch.no_grad():
                hidden = model(torch.tensor([ids]), attn=DenseAttention(seen[None, None]))
            rows = torch.log_softmax(model.compute_logits(hidden)[0, -block:].float(), dim=-1)
            for j in range(block):
                assert o.logprobs[i + j] == pytest.approx(rows[j, o.token_ids[i + j]].item(), abs=ATOL)
                check_top(o.top_logprobs[i + j], rows[j], 2)


def test_no_logprobs_means_no_columns_and_empty_lists(tiny):
    model, tok = tiny
    dec = make_decoder("isd", 4, model.config, tok)
    prompts = prompts_of(tok, 2)
    for sp in (greedy(max_tokens=8), sampled(0, max_tokens=8)):
        out = engine_of(model, tok, "isd", 4).run(prompts, sp)
        for o in out:
            assert o.logprobs == o.top_logprobs == o.prompt_logprobs == o.prompt_top_logprobs == []
        # the compute path: no static option, no extra columns (default steps and their graphs pay nothing)
        states, _ = dec.start(torch.zeros(2, model.config.vocab_size), [sp, sp], [None, None])
        tensors, static = dec.step_inputs(states, [sp, sp], [None, None], model.config.vocab_size, "cpu")
        assert static["logprobs"] is None
        packed, _ = dec.compute(torch.randn(2, dec.query_len, model.config.vocab_size), tensors, **static)
        assert packed.shape == (2, 2 * (dec.stride - 1) + 3)
        with_lp = SamplingParams(**{**sp.__dict__, "logprobs": 3})
        _, static = dec.step_inputs(states, [sp, with_lp], [None, None], model.config.vocab_size, "cpu")
        assert static["logprobs"] == 5  # bucketed: one graph serves k = 1..5


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [21, -1, True, "3", 2.0])
def test_bad_logprobs_values_name_the_parameter(name, value):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**{name: value})
    assert e.value.param == name and name in str(e.value)


def test_logprobs_bounds_are_valid():
    for k in (None, 0, MAX_LOGPROBS):
        sp = SamplingParams(logprobs=k, prompt_logprobs=k)
        assert sp.logprobs == sp.prompt_logprobs == k


def test_block_manager_caps_the_prefix_hit():
    from idlm.engine.block_manager import PageManager

    bm = PageManager(16, 4)
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages before the last token
    bm.allocate("a", prompt)
    bm.commit("a", len(prompt), prompt)
    assert [bm.allocate(s, prompt, max_hit=m) for s, m in (("b", 0), ("c", 7), ("d", 8), ("e", None))] == [0, 4, 8, 12]
    bm.check_invariants()
