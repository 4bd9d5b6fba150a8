"""ISD and R-ISD decoding (SPEC §4, §5, §7) through the reference runner, against exact oracles.

Oracles:
- greedy AR (`ARDecoder` through the same runner) for a real random tiny Transformer: greedy ISD and
  R-ISD must emit exactly its token ids, whatever the drafts;
- the `MarkovModel` fake (tests/fake_models.py), whose greedy output is a known chain and whose drafter
  is perfect, i.i.d. wrong with probability 1 − p, or wrong at scripted steps: TPF, acceptance and
  every counter of `DecodeStats` are then known exactly (hand traces) or analytically (SPEC §7);
- the error contract of `idlm.errors` (bad input names the bad parameter);
- stop rules (SPEC §4.4) and per-request seeds.
"""

from __future__ import annotations

import re

import pytest
import torch
from fake_models import MarkovModel
from safetensors.torch import load_file

from idlm.decoding import make_decoder
from idlm.decoding.acceptance import analytic_tpf
from idlm.decoding.ar import ARDecoder
from idlm.decoding.base import DecodeStats
from idlm.decoding.isd import ISDDecoder, ISDState, draft_slots, isd_block
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams
from idlm.errors import CheckpointError, ConfigError
from idlm.layers.lora import LoRAAdapter, LoRAConfig
from idlm.models.config import ModelConfig
from idlm.models.transformer import Transformer

STRIDES = (2, 3, 4, 8)
VOCAB, MASK = 64, 63
PROMPT_LENS = (1, 5, 17, 9)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The decode loops run tiny ops: one thread is faster and immune to other processes on the box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(mask: bool = True, **overrides) -> ModelConfig:
    cfg = dict(family="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
               max_position_embeddings=160, eos_token_id=0, mask_token_id=MASK if mask else None)
    cfg.update(overrides)
    return ModelConfig(**cfg)


@pytest.fixture(scope="module")
def model():
    return Transformer(tiny_config()).init_weights(std=0.6, seed=0).eval()


@pytest.fixture(scope="module")
def model_no_mask():
    return Transformer(tiny_config(mask=False)).init_weights(std=0.6, seed=2).eval()


def random_prompts(lens=PROMPT_LENS, seed: int = 0, high: int = MASK) -> list[list[int]]:
    """Random ids in [0, high): with high = MASK no prompt holds the MASK token."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (n,), generator=g).tolist() for n in lens]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def total(outs) -> DecodeStats:
    s = DecodeStats()
    for o in outs:
        s = s.merge(o.stats)
    return s


# ----------------------------------------------------------------------- 1. greedy ISD == greedy AR
@pytest.mark.parametrize("n", STRIDES)
def test_greedy_isd_equals_greedy_ar_on_a_real_untrained_model(model, n):
    """A random Transformer is a bad drafter (acceptance near 0), so almost every token comes from a
    rejection's correction or a C round; the output must still be greedy AR's, request by request,
    for mixed prompt lengths and both draft modes."""
    prompts = random_prompts()
    ar = generate(model, ARDecoder(), prompts, greedy(40))
    for mode in ("sample", "argmax"):
        outs = generate(model, ISDDecoder(n, MASK), prompts, greedy(40, draft=mode))
        for a, o in zip(ar, outs):
            assert o.token_ids == a.token_ids, (n, mode)
            assert len(o.token_ids) == 40 and o.finish_reason == "length"
        s = total(outs)
        assert s.acceptance is not None and s.acceptance < 0.5
        assert s.committed == 4 * 39  # the first token of each request comes from the prefill
        assert sum(s.rounds.values()) == s.forwards


@pytest.mark.parametrize("n", STRIDES)
def test_greedy_isd_with_a_perfect_drafter_commits_n_per_verify_round(n):
    """MarkovModel with a perfect drafter: output = the Markov chain = greedy AR; acceptance exactly 1;
    the prefill gives token 1, the first decode forward is a C round (1 token), then every forward is
    an all-accepted V round committing N. With max_tokens = 2 + m·N: forwards = 1 + m, committed =
    1 + m·N, TPF = (1 + m·N)/(1 + m) exactly."""
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=1.0, seed=n)
    prompts = random_prompts(seed=n)
    ms = (1, 3, 10)
    params = [greedy(2 + m * n) for m in ms] + [greedy(2 + ms[-1] * n)]  # 4 prompts, 4 requests
    ar = generate(fake, ARDecoder(), prompts, params)
    for mode in ("sample", "argmax"):
        for p in params:
            p.draft = mode
        outs = generate(fake, ISDDecoder(n, MASK), prompts, params)
        for prompt, p, a, o in zip(prompts, params, ar, outs):
            assert o.token_ids == a.token_ids == fake.chain(prompt, p.max_tokens), (n, mode)
            assert o.finish_reason == "length"
            assert o.token_probs == [1.0] * len(o.token_ids)  # greedy: every token drawn from a point mass
        for m, o in zip(ms + (ms[-1],), outs):
            st = o.stats
            assert (st.forwards, st.committed) == (1 + m, 1 + m * n)
            assert st.tpf == (1 + m * n) / (1 + m)
            assert st.rounds == {"verify_accepted": m, "verify_rejected": 0, "cold": 1}
            assert st.verified_per_position == st.accepted_per_position == [m] * (n - 1)
            assert st.acceptance == 1.0


def test_tpf_tends_to_stride_with_a_perfect_drafter():
    """TPF = (1 + m·N)/(1 + m) increases with the length and tends to N (only the first C round costs)."""
    n = 4
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=1.0)
    ms = (1, 5, 25, 100)
    outs = generate(fake, ISDDecoder(n, MASK), [[1]] * len(ms), [greedy(2 + m * n) for m in ms])
    tpfs = [o.stats.tpf for o in outs]
    assert tpfs == sorted(tpfs) and len(set(tpfs)) == len(tpfs)
    assert n - tpfs[-1] == pytest.approx((n - 1) / 101)
    assert tpfs[-1] > 0.97 * n


# ---------------------------------------------------------------------------- 2. R-ISD is lossless
def random_adapter(cfg: ModelConfig, seed: int = 1) -> LoRAAdapter:
    return LoRAAdapter(cfg, LoRAConfig(rank=4, alpha=8.0)).init_weights(std=0.3, seed=seed, zero_b=False).eval()


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask-token", "no-mask-token"])
@pytest.mark.parametrize("n", STRIDES)
def test_risd_greedy_equals_base_model_greedy_ar(model, model_no_mask, n, with_mask):
    """R-ISD with a random (non-zero B) gated LoRA: every logit used to emit a token is the base model's
    own, so the output is the base model's greedy AR output, also on a model without a MASK token."""
    base = model if with_mask else model_no_mask
    adapter = random_adapter(base.config)
    dec = make_decoder("risd", n, base.config)
    assert dec.uses_lora and dec.query_len == 2 * n - 1
    prompts = random_prompts(seed=10 + n, high=MASK if with_mask else VOCAB)
    ar = generate(base, ARDecoder(), prompts, greedy(40))
    outs = generate(base, dec, prompts, greedy(40), lora=adapter)
    for a, o in zip(ar, outs):
        assert o.token_ids == a.token_ids
    assert total(outs).committed == 4 * 39


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask-token", "no-mask-token"])
def test_risd_adapter_changes_draft_logits_only(model, model_no_mask, with_mask):
    """Non-vacuity of the R-ISD test: on a V block after a prompt, the adapter leaves every clean
    position's logits bit-identical and changes the logits of the gated MASK (draft) slots."""
    base = model if with_mask else model_no_mask
    n = 4
    adapter = random_adapter(base.config)
    dec = ISDDecoder(n, base.config.mask_token_id, lora=True)
    blk = dec.block(ISDState("V", 5, [7, 9, 11]))
    assert blk.gate == [i in draft_slots("V", n) for i in range(2 * n - 1)] == blk.is_mask
    prompt = random_prompts((6,), seed=3)[0]
    tokens = torch.tensor([prompt + blk.tokens])
    pad = [False] * len(prompt)
    gate, is_mask = torch.tensor([pad + blk.gate]), torch.tensor([pad + blk.is_mask])
    with torch.no_grad():
        plain = base.compute_logits(base(tokens))
        with_lora = base.compute_logits(base(tokens, lora=adapter, lora_gate=gate, is_mask=is_mask))
    clean = len(prompt) + n  # prompt, pending and the N−1 specs
    assert torch.equal(plain[:, :clean], with_lora[:, :clean])
    assert (plain[:, clean:] - with_lora[:, clean:]).abs().amax() > 1.0


# --------------------------------------------------------------------------- 3. statistics, by hand
def test_stats_equal_a_hand_computed_trace():
    """N = 3 (K = 2), drafts scripted wrong at (decode forward 2, draft 1) and (forward 4, draft 0):
      prefill  emits t0                                                     (not a decode forward)
      f1 C     emits 1, drafts from f1 correct                              cold
      f2 V     both accepted: emits 3; its draft 1 is wrong                 verify_accepted
      f3 V     s0 ok, s1 wrong: emits s0 + correction = 2                  verify_rejected
      f4 C     emits 1; its draft 0 is wrong                                cold
      f5 V     s0 wrong: emits the correction = 1                           verify_rejected
      f6 C     emits 1                                                      cold
      f7 V     both accepted: emits 3 -> 1 + 1+3+2+1+1+1+3 = 13 = max_tokens verify_accepted
    verified per position: f2 [1,1] f3 [1,1] f5 [1,0] f7 [1,1] -> [4, 3]; accepted [1,1]+[1,0]+[1,1] = [3, 2]."""
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=1.0, wrong_at={(2, 1), (4, 0)})
    prompt = [3, 1, 4]
    out = generate(fake, ISDDecoder(3, MASK), [prompt], greedy(13))[0]
    assert out.token_ids == fake.chain(prompt, 13)
    st = out.stats
    assert st.forwards == 7 and st.committed == 12
    assert st.verified_per_position == [4, 3]
    assert st.accepted_per_position == [3, 2]
    assert st.rounds == {"verify_accepted": 2, "verify_rejected": 2, "cold": 3}
    assert st.tpf == 12 / 7 and st.acceptance == 5 / 7
    d = st.to_dict()
    assert d["tpf"] == round(12 / 7, 4) and d["acceptance"] == round(5 / 7, 4)
    assert d["round_mix"] == {"verify_accepted": round(2 / 7, 4), "verify_rejected": round(2 / 7, 4),
                              "cold": round(3 / 7, 4)}


def test_decode_stats_merge_sums_and_to_dict():
    """merge sums every counter (padding the shorter per-position lists); to_dict reports tpf and round mix."""
    a = DecodeStats(forwards=3, committed=7)
    a.record_verify(2, 2)
    a.record_verify(2, 0)
    a.rounds["cold"] += 1
    b = DecodeStats(forwards=5, committed=9)
    b.record_verify(4, 1)
    b.rounds["cold"] += 4
    m = a.merge(b)
    assert (m.forwards, m.committed) == (8, 16)
    assert m.verified_per_position == [3, 2, 0, 0] and m.accepted_per_position == [2, 1, 0, 0]
    assert m.rounds == {"verify_accepted": 1, "verify_rejected": 2, "cold": 5}
    assert m.tpf == 2.0 and m.acceptance == 3 / 5
    assert a.merge(DecodeStats()).to_dict() == a.to_dict()
    other = DecodeStats(forwards=2, committed=2)
    other.rounds["block"] = 2  # a round kind of another decoder is kept, not dropped
    assert a.merge(other).rounds == {**a.rounds, "block": 2} and other.merge(a).rounds == a.merge(other).rounds
    d = m.to_dict()
    assert d["tpf"] == 2.0 and d["acceptance"] == 0.6
    assert d["round_mix"] == {"verify_accepted": 0.125, "verify_rejected": 0.25, "cold": 0.625}
    assert DecodeStats().to_dict()["tpf"] == 0.0 and DecodeStats().acceptance is None


# ---------------------------------------------------------------------------- 4. analytic TPF
@pytest.mark.parametrize("p", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("n", STRIDES)
def test_measured_tpf_matches_analytic(p, n):
    """Drafts i.i.d. right with probability p: aggregate TPF over 32 requests × 400 tokens within 5% of
    (2 + p + … + p^(N−2)) / (2 − p^(N−1)); per-draft acceptance ≈ p; the output is still the chain."""
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=p, seed=100 * n + int(10 * p))
    prompts = random_prompts([1 + i % 7 for i in range(32)], seed=n)
    outs = generate(fake, ISDDecoder(n, MASK), prompts, greedy(400))
    for prompt, o in zip(prompts, outs):
        assert o.token_ids == fake.chain(prompt, 400)
    s = total(outs)
    assert s.tpf == pytest.approx(analytic_tpf(p, n), rel=0.05)
    assert s.acceptance == pytest.approx(p, abs=0.03)
    # per position too, where enough drafts were tested
    for v, a in zip(s.verified_per_position, s.accepted_per_position):
        if v >= 500:
            assert a / v == pytest.approx(p, abs=0.05)


def test_analytic_tpf_reference_values():
    """SPEC §7's anchors: p = 1 gives N, p = 0 gives 1, and the quoted values at p = 0.9."""
    for n in STRIDES:
        assert analytic_tpf(1.0, n) == pytest.approx(n) and analytic_tpf(0.0, n) == pytest.approx(1.0)
    assert [round(analytic_tpf(0.9, n), 2) for n in STRIDES] == [1.82, 2.44, 2.92, 4.09]


# ------------------------------------------------------------------------------ 5. bad input
def test_bad_stride_is_a_config_error():
    for stride in (1, 0, -3, 2.0):
        with pytest.raises(ConfigError, match="stride"):
            ISDDecoder(stride, 5)
    with pytest.raises(ConfigError, match="stride N=1"):
        make_decoder("isd", 1, tiny_config())
    with pytest.raises(ConfigError, match="stride N=1"):
        make_decoder("risd", 1, tiny_config(mask=False))


def test_bad_sampling_params_name_the_parameter():
    cases = [dict(temperature=-0.5), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
             dict(top_p=-0.1), dict(top_k=-1), dict(top_k=2.5)]
    for kw in cases:
        (name,) = kw
        with pytest.raises(ConfigError, match=f"invalid sampling parameter {name}="):
            SamplingParams(**kw)


def test_isd_on_a_model_without_mask_token_is_refused():
    cfg = tiny_config(mask=False)
    with pytest.raises(ConfigError, match="needs a MASK token"):
        make_decoder("isd", 4, cfg)
    with pytest.raises(ConfigError, match="needs a MASK token"):
        ISDDecoder(4, None)
    assert make_decoder("isd", 4, tiny_config()).mask_token_id == MASK


def test_risd_without_an_adapter_is_refused(model_no_mask):
    with pytest.raises(ConfigError, match="needs a LoRA adapter"):
        generate(model_no_mask, ISDDecoder(4, None, lora=True), [[1, 2]], greedy(5), lora=None)


def test_lora_with_wrong_shapes_names_the_tensor_and_both_shapes(tmp_path):
    saved_cfg, other_cfg = tiny_config(), tiny_config(hidden_size=16)
    path = random_adapter(saved_cfg).save(tmp_path / "a")
    with pytest.raises(CheckpointError) as e:
        LoRAAdapter.load(path, other_cfg)
    msg = str(e.value)
    hit = re.search(r"tensor '([^']+)' has shape (\([\d, ]*\)) but the model needs (\([\d, ]*\))", msg)
    assert hit, msg
    name, have, need = hit.groups()
    file_shape = tuple(load_file(str(path / "adapter_model.safetensors"))[name].shape)
    wanted = LoRAAdapter(other_cfg, LoRAConfig(rank=4, alpha=8.0))
    model_shapes = {"mask_embedding": tuple(wanted.mask_embedding.shape)}
    model_shapes.update({wanted._peft_name(k): tuple(v.shape) for k, v in wanted.named_parameters()
                         if k != "mask_embedding"})
    assert have == str(file_shape) and need == str(model_shapes[name]) and have != need


def test_lora_for_a_different_number_of_layers_is_refused(tmp_path):
    path = random_adapter(tiny_config(num_hidden_layers=3)).save(tmp_path / "deep")
    unexpected = r"tensor 'base_model\.model\.model\.layers\.2\.[A-Za-z_.]+' does not fit the model \(2 layers"
    with pytest.raises(CheckpointError, match=unexpected):
        LoRAAdapter.load(path, tiny_config())
    path = random_adapter(tiny_config(num_hidden_layers=1)).save(tmp_path / "shallow")
    with pytest.raises(CheckpointError, match=r"missing tensor 'base_model\.model\.model\.layers\.1\."):
        LoRAAdapter.load(path, tiny_config())


def test_lora_save_load_round_trip(tmp_path):
    cfg = tiny_config()
    a = LoRAAdapter(cfg, LoRAConfig(rank=3, alpha=5.0, targets=("q_proj", "v_proj", "down_proj")))
    a.init_weights(std=0.3, seed=1, zero_b=False)
    b = LoRAAdapter.load(a.save(tmp_path / "rt"), cfg)
    assert b.config == a.config
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert pa["layers.0.pairs.q_proj.lora_B.weight"].abs().sum() > 0  # non-trivial values were compared


# ------------------------------------------------------------------------------ 6. stop rules
def test_stop_token_inside_an_accepted_verify_run_truncates_after_it():
    """N = 4, perfect drafter: token 0 from prefill, 1 from C, 2..5 from V1, 6..9 from V2. A stop id (or
    EOS) equal to token 7 — the second of V2's four — ends the output right after it; tokens 8, 9 of
    the same round are dropped and not counted as committed. Other requests of the batch go on."""
    n = 4
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=1.0, seed=5)
    prompt = [2, 7]
    chain = fake.chain(prompt, 30)
    stop = chain[7]
    params = [greedy(30, stop_token_ids=[stop]), greedy(30),
              SamplingParams(temperature=0, max_tokens=30),
              SamplingParams(temperature=0, max_tokens=30, draft="argmax")]
    outs = generate(fake, ISDDecoder(n, MASK), [prompt] * 4, params, eos_token_ids=[stop])
    for o in (outs[0], outs[2], outs[3]):  # stop id; EOS (ignore_eos False)
        assert o.token_ids == chain[:8] and o.finish_reason == "stop"
        assert (o.stats.forwards, o.stats.committed) == (3, 7)
        assert o.stats.rounds == {"verify_accepted": 2, "verify_rejected": 0, "cold": 1}
    assert outs[1].token_ids == chain and outs[1].finish_reason == "length"  # ignore_eos: EOS is just a token


@pytest.mark.parametrize("n", [3, 8])
def test_stop_at_every_position_with_an_imperfect_drafter(n):
    """Stop at chain token i for i = 0..39, one request each, drafts right with p = 0.7: the output is
    exactly chain[:i+1] (whichever round type emitted the stop token), finish_reason "stop"."""
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=0.7, seed=7)
    prompt = [11]
    chain = fake.chain(prompt, 40)
    assert len(set(chain)) == 40
    params = [greedy(40, stop_token_ids=[chain[i]]) for i in range(40)]
    outs = generate(fake, ISDDecoder(n, MASK), [prompt] * 40, params)
    for i, o in enumerate(outs):
        assert o.token_ids == chain[: i + 1] and o.finish_reason == "stop", i
        assert o.stats.committed == i
    assert total(outs).rounds["verify_accepted"] > 0 and total(outs).rounds["verify_rejected"] > 0


@pytest.mark.parametrize("p", [1.0, 0.6])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_max_tokens_is_never_exceeded(n, p):
    """max_tokens = 1..30: exactly max_tokens tokens (= the chain's), even when a round commits N."""
    fake = MarkovModel(VOCAB, MASK, draft_accuracy=p, seed=n)
    prompt = [9, 8, 7]
    outs = generate(fake, ISDDecoder(n, MASK), [prompt] * 30, [greedy(m) for m in range(1, 31)])
    chain = fake.chain(prompt, 30)
    for m, o in zip(range(1, 31), outs):
        assert o.token_ids == chain[:m] and o.finish_reason == "length", m
        assert o.stats.committed == m - 1


# --------------------------------------------------------------------------------- 7. seeds
@pytest.mark.parametrize("mode", ["sample", "argmax"])
def test_seeded_isd_sampling_is_reproducible_and_batch_independent(model, mode):
    """T = 1 with per-request seeds: the same seed gives the same output; a request's output does not
    depend on the other requests of its batch (their prompts, lengths, seeds, draft modes); another
    seed gives another output (so the first checks are not vacuous)."""
    dec = ISDDecoder(4, MASK)

    def sp(seed, **kw):
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True, draft=mode, **kw)

    prompt = [4, 4, 4, 9]
    alone = generate(model, dec, [prompt], sp(11))[0]
    again = generate(model, dec, [prompt], sp(11))[0]
    assert alone.token_ids == again.token_ids and len(alone.token_ids) == 30
    others = random_prompts((12, 1), seed=5)
    batch = generate(model, dec, [others[0], prompt, others[1]],
                     [sp(99, top_p=0.8), sp(11), SamplingParams(temperature=0.7, seed=5, max_tokens=12,
                                                                 ignore_eos=True, draft="argmax")])
    assert batch[1].token_ids == alone.token_ids
    assert batch[1].stats == alone.stats
    assert generate(model, dec, [prompt], sp(12))[0].token_ids != alone.token_ids


def test_isd_block_layouts():
    """The two query layouts of SPEC §4.2 for N = 3 (input to every test above)."""
    c = isd_block(ISDState("C", 5), 3, MASK)
    assert c.tokens == [5, MASK, MASK, MASK, MASK] and c.is_mask == [False, True, True, True, True]
    assert c.gate == [False, True, True, False, False]
    v = isd_block(ISDState("V", 5, [6, 7]), 3, MASK)
    assert v.tokens == [5, 6, 7, MASK, MASK] and v.is_mask == [False, False, False, True, True]
    assert v.gate == [False, False, False, True, True]


def test_in_memory_adapter_that_does_not_fit_is_refused():
    from idlm.decoding.isd import ISDDecoder
    from idlm.decoding.reference import generate
    from idlm.decoding.sampling import SamplingParams
    from idlm.errors import ConfigError
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.models.config import ModelConfig
    from idlm.models.transformer import Transformer
    base = dict(family="qwen3", vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True, max_position_embeddings=64)
    model = Transformer(ModelConfig(**base)).init_weights(seed=0)
    for change in (dict(hidden_size=16), dict(num_hidden_layers=3), dict(num_hidden_layers=1)):
        adapter = LoRAAdapter(ModelConfig(**{**base, **change}), LoRAConfig(rank=2, alpha=2))
        with pytest.raises(ConfigError, match=f"does not fit the model: it was built for {next(iter(change))}="):
            generate(model, ISDDecoder(3, None, lora=True), [[1, 2]], SamplingParams(max_tokens=3), lora=adapter)


def test_kept_q_takes_each_rows_own_columns_from_the_last_steps_output():
    """`_kept_q` (one gather from the last step's q̃ output) gives every V row with kept drafts its own
    first k_b columns, in any row order, when the step's K shrank or grew — as the per-row stack does."""
    from idlm.decoding.isd import ISDDecoder, ISDState

    V, g = 11, torch.Generator().manual_seed(0)
    out = torch.rand(4, 3, V, generator=g)  # a step's q̃ output: 4 rows, K' = 3

    def state(b, kb, mode="V"):
        return ISDState(mode, 1, [1] * kb, spec_q=(out, b), spec_qd=[0.5] * kb)

    for k in (2, 3, 5):
        dec = ISDDecoder.__new__(ISDDecoder)
        cases = [[state(0, min(k, 3)), state(1, 1), state(2, min(k, 2))],  # the output's rows in order
                 [state(3, 1), ISDState("C", 1), state(1, min(k, 3))]]  # reordered, a C row between
        for states in cases:
            q = dec._kept_q(states, k, V, "cpu")
            assert q.shape == (len(states), k, V) and torch.isfinite(q).all()
            for s, row in zip(states, q):
                if s.mode == "V":
                    kb = len(s.specs)
                    assert torch.equal(row[:kb], out[s.spec_q[1], :kb])
    # the last step's rows in their order, a cold row among them: a view of that output, no copy
    in_order = [state(0, 3), ISDState("C", 1), state(2, 2)]
    q = ISDDecoder.__new__(ISDDecoder)._kept_q(in_order, 3, V, "cpu")
    assert q.data_ptr() == out.data_ptr() and torch.equal(q[2, :2], out[2, :2])
    # rows from two different steps: the per-row path, zero padding
    other = torch.rand(1, 2, V, generator=g)
    mixed = [state(0, 2), ISDState("V", 1, [1], spec_q=(other, 0), spec_qd=[0.5])]
    q = ISDDecoder.__new__(ISDDecoder)._kept_q(mixed, 2, V, "cpu")
    assert torch.equal(q[0], out[0, :2]) and torch.equal(q[1, :1], other[0, :1]) and not q[1, 1].any()


def test_decode_stats_total_and_acceptance_per_position():
    """`DecodeStats.total` is the merge of many; acceptance per position is accepted / verified per index."""
    from idlm.decoding.base import DecodeStats

    a, b = DecodeStats(forwards=2, committed=5), DecodeStats(forwards=1, committed=1)
    a.record_verify(3, 3)  # all three accepted
    b.record_verify(3, 1)  # first accepted, second rejected (third not verified)
    t = DecodeStats.total([a, b])
    assert (t.forwards, t.committed) == (3, 6)
    assert t.verified_per_position == [2, 2, 1] and t.accepted_per_position == [2, 1, 1]
    assert t.acceptance_per_position == [1.0, 0.5, 1.0]
    assert DecodeStats.total([]).acceptance_per_position == []
