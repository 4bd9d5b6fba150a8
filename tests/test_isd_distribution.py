"""ISD and R-ISD sample from exactly the AR distribution (SPEC §4.3, §5; the decoders issue's statistical Must-show).

Oracle: on a random 8-token-vocabulary model, the exact AR law of the first L = 5 emitted tokens after a
fixed prompt, P(x1..x5) = Π p̃(x_i | prompt, x_<i), enumerated over all 8^5 continuations with one full
(cache-free) forward of the base model over the 8^4 contexts and `filtered_probs`. Each case draws 20,000
samples with ONE batched `generate` call (global RNG, seeded, no per-request seeds) and runs chi-square
goodness-of-fit tests (cells with expected count < 5 merged; p-value = Q(df/2, chi2/2)) of three views of
the joint law against the oracle: the first 3 tokens (the Must-show), the last 3, and all 5 (sparse).

Every decoder path emits a tested token: x1 comes from prefill, x2 from the cold-start round C, x3 is an
accepted draft s0 or a correction. With N = 2, x4 is the V round's bonus token (KV advance N) or, after a
rejection, the next C round's token (advance 1); x5 is a draft made in a V round's MASK slots verified
after an all-accepted V (a wrong KV advance shows up here), or the verification after a C. With N = 3, x4
is s1, a correction at draft 1, or a C round's token after a rejection at draft 0. The (untrained) MASK
drafts are partly right (acceptance asserted in 0.2-0.8), so acceptance and correction both carry mass.

Exact rules (ISD and R-ISD, draft = "sample" and "argmax", with and without top-k/top-p) must pass
(p-value > 1e-3 for every view). The same first-3 test must reject (p-value < 1e-6) the reference
release's biased rule (draft = "argmax-ratio": argmax draft accepted with min(1, p̃/q̃), SPEC §10.1) for two
seeds, and the lossy verify_alpha = 0.5. AR sampling through the same harness is the positive control.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from idlm.decoding.ar import ARDecoder
from idlm.decoding.isd import ISDDecoder
from idlm.decoding.reference import generate
from idlm.decoding.sampling import SamplingParams, filtered_probs
from idlm.layers.lora import LoRAAdapter, LoRAConfig
from idlm.models.config import ModelConfig
from idlm.models.transformer import Transformer

pytestmark = pytest.mark.slow

V, MASK = 8, 7
PROMPT = [3, 0, 5]
L = 5  # tokens per sample whose joint law is known exactly (V**L cells)
N_SAMPLES = 20_000
PASS_P, FAIL_P = 1e-3, 1e-6

FULL = dict(temperature=1.0)
TRUNC = dict(temperature=0.8, top_k=5, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    # std 0.5, seed 0, prompt [3, 0, 5]: clean laws far from uniform and from deterministic (H(x1..x3) ≈ 3.3
    # nats at T = 1), MASK drafts right 30-50% of the time, and the biased rule's error large (chosen by
    # computing the biased rule's exact law for several seeds).
    cfg = ModelConfig(family="qwen3", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True,
                      max_position_embeddings=64, mask_token_id=MASK)
    return Transformer(cfg).init_weights(std=0.5, seed=0).eval()


@pytest.fixture(scope="module")
def adapter(model):
    """A random gated LoRA with B != 0: its drafts differ from the base model's (and are partly right)."""
    return LoRAAdapter(model.config, LoRAConfig(rank=4, alpha=4.0)).init_weights(std=0.3, seed=1, zero_b=False).eval()


_ORACLE: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def ar_law(model, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Exact P_AR(x1..x_L) of the base model after PROMPT, a float64 tensor of shape [V] * L."""
    key = (id(model), temperature, top_k, top_p)
    if key in _ORACLE:
        return _ORACLE[key]
    P = len(PROMPT)
    conts = list(itertools.product(range(V), repeat=L - 1))  # row r: the context of every x with x_<L = conts[r]
    ids = torch.tensor([PROMPT + list(c) for c in conts])
    logits = model.logits(ids)[:, P - 1:]  # [V^(L-1), L, V]: position P-1+i predicts x_{i+1}
    rows = logits.shape[0] * L
    probs = filtered_probs(logits.reshape(rows, V), torch.full((rows,), float(temperature)),
                           torch.full((rows,), top_k, dtype=torch.long),
                           torch.full((rows,), float(top_p))).view(-1, L, V).double()
    x = torch.cartesian_prod(*[torch.arange(V)] * L)  # [V^L, L], row-major like .view([V] * L)
    row = torch.zeros(len(x), dtype=torch.long)
    for i in range(L - 1):
        row = row * V + x[:, i]
    law = torch.ones(len(x), dtype=torch.float64)
    for i in range(L):
        law *= probs[row, i, x[:, i]]
    law = law.view([V] * L)
    assert abs(law.sum().item() - 1) < 1e-5
    _ORACLE[key] = law
    return law


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int]:
    """Goodness of fit of counts (flattened) to probs: cells with expected count < 5 merged into one
    (with the next-smallest cell if that is still < 5). Returns (p-value, chi2, degrees of freedom).
    Counts in cells of probability 0 are an outright failure (the emitted token left p̃'s support)."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = counts.sum()
    outside = counts[probs == 0].sum().item()
    assert outside == 0, f"{outside:.0f} samples fall where the exact law has probability 0"
    counts, expected = counts[probs > 0], probs[probs > 0] * n
    order = expected.argsort()
    counts, expected = counts[order], expected[order]
    n_small = int((expected < 5).sum())
    if 0 < n_small < len(expected) and expected[:n_small].sum() < 5:
        n_small += 1
    if n_small > 1:
        counts = torch.cat([counts[:n_small].sum(0, keepdim=True), counts[n_small:]])
        expected = torch.cat([expected[:n_small].sum(0, keepdim=True), expected[n_small:]])
    chi2 = ((counts - expected) ** 2 / expected).sum()
    df = len(expected) - 1
    pvalue = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2).item()
    return pvalue, chi2.item(), df


def run_case(model, decoder, sampling: dict, seed: int, lora=None,
             stats_out: list | None = None) -> tuple[torch.Tensor, float | None, dict]:
    """N_SAMPLES continuations of PROMPT in one batched call -> (counts [V] * L, acceptance, round counts);
    the merged `DecodeStats` appended to stats_out when given."""
    params = SamplingParams(max_tokens=L, ignore_eos=True, **sampling)
    torch.manual_seed(seed)
    outs = generate(model, decoder, [PROMPT] * N_SAMPLES, params, lora=lora)
    tokens = torch.tensor([o.token_ids for o in outs])
    assert tokens.shape == (N_SAMPLES, L)
    idx = torch.zeros(N_SAMPLES, dtype=torch.long)
    for i in range(L):
        idx = idx * V + tokens[:, i]
    counts = torch.bincount(idx, minlength=V**L).view([V] * L)
    stats = outs[0].stats
    for o in outs[1:]:
        stats = stats.merge(o.stats)
    if stats_out is not None:
        stats_out.append(stats)
    return counts, stats.acceptance, stats.rounds


def check(model, decoder, sampling, seed, lora=None,
          stats_out: list | None = None) -> tuple[dict[str, float], float | None, dict]:
    """p-values of three views of the joint law (first 3 tokens, last 3 tokens, all L), acceptance, rounds."""
    counts, acceptance, rounds = run_case(model, decoder, sampling, seed, lora, stats_out)
    law = ar_law(model, sampling["temperature"], sampling.get("top_k", 0), sampling.get("top_p", 1.0))
    rest = tuple(range(3, L))
    lead = tuple(range(L - 3))
    views = {"first3": (counts.sum(rest), law.sum(rest)), "last3": (counts.sum(lead), law.sum(lead)),
             f"all{L}": (counts, law)}
    pvalues, text = {}, []
    for name, (c, p) in views.items():
        pvalues[name], chi2, df = chi_square_pvalue(c, p)
        text.append(f"{name}: chi2 {chi2:.1f} df {df} p {pvalues[name]:.3g}")
    print(f"\n{decoder.name} {sampling} seed={seed}: {'; '.join(text)}; acceptance={acceptance} rounds={rounds}")
    return pvalues, acceptance, rounds


def test_chi_square_harness_accepts_ar_sampling(model):
    """Positive control: plain AR sampling fits the enumerated oracle (oracle and test are right)."""
    pvalues, _, _ = check(model, ARDecoder(), FULL, seed=0)
    assert min(pvalues.values()) > PASS_P, pvalues


EXACT = [
    # (decoder, draft mode, sampling, stride N)
    ("isd", "sample", FULL, 2),
    ("isd", "argmax", FULL, 3),
    ("isd", "sample", TRUNC, 3),
    ("isd", "argmax", TRUNC, 2),
    ("risd", "sample", TRUNC, 2),
    ("risd", "argmax", FULL, 3),
    # drafts from q̃ at another temperature than p̃'s (sharper and flatter): still AR's law
    ("isd", "sample", {**FULL, "draft_temperature": 0.5}, 3),
    ("risd", "sample", {**TRUNC, "draft_temperature": 1.5}, 2),
]


def _case_id(kind, draft, sampling, stride) -> str:
    name = "T1" if sampling["temperature"] == 1.0 else "T0.8-k5-p0.9"
    if "draft_temperature" in sampling:
        name += f"-Td{sampling['draft_temperature']}"
    return f"{kind}-{draft}-{name}-N{stride}"


@pytest.mark.parametrize("kind,draft,sampling,stride", EXACT, ids=[_case_id(*case) for case in EXACT])
def test_isd_joint_law_equals_ar(model, adapter, kind, draft, sampling, stride):
    decoder = ISDDecoder(stride, MASK) if kind == "isd" else ISDDecoder(stride, None, lora=True)
    pvalues, acceptance, rounds = check(model, decoder, {**sampling, "draft": draft}, seed=1,
                                        lora=adapter if kind == "risd" else None)
    # the verification really ran both ways: drafts partly accepted, corrections drawn often
    assert 0.2 < acceptance < 0.8
    assert rounds["verify_rejected"] > N_SAMPLES // 10
    for view, p in pvalues.items():
        assert p > PASS_P, f"joint law of the tokens ({view}) differs from AR's (p = {p:.3g})"


@pytest.mark.parametrize("layout", ["pair", "select"])
def test_fused_risd_joint_law_equals_ar(model, adapter, layout):
    """R-ISD with the LoRA folded into the projections (`Transformer.fuse_lora`, the engine's CUDA path,
    either layout): its tokens still follow AR's law exactly."""
    import copy

    fused = copy.deepcopy(model).fuse_projections().fuse_lora(adapter, layout)
    assert fused.model.layers[0].self_attn.qkv_lora is not None
    pvalues, acceptance, rounds = check(fused, ISDDecoder(2, None, lora=True), {**TRUNC, "draft": "sample"}, seed=4,
                                        lora=adapter)
    assert 0.2 < acceptance < 0.8 and rounds["verify_rejected"] > N_SAMPLES // 10
    for view, p in pvalues.items():
        assert p > PASS_P, f"joint law of the tokens ({view}) differs from AR's (p = {p:.3g})"


@pytest.mark.parametrize("seed", [2, 3])
def test_reference_biased_rule_is_detected(model, seed):
    """SPEC §10.1: argmax draft tested with min(1, p̃/q̃) and corrected from max(0, p̃ − q̃) is biased."""
    pvalues, acceptance, _ = check(model, ISDDecoder(2, MASK), {**FULL, "draft": "argmax-ratio"}, seed=seed)
    assert 0.2 < acceptance < 0.8
    p3 = pvalues["first3"]
    assert p3 < FAIL_P, f"the biased rule went undetected (p = {p3:.3g})"


def test_verify_alpha_below_one_is_detected(model):
    """verify_alpha = 0.5 accepts with min(1, p̃ / (0.5 q̃)): lossy, and the test sees it."""
    pvalues, _, _ = check(model, ISDDecoder(2, MASK), {**FULL, "draft": "sample", "verify_alpha": 0.5}, seed=4)
    p3 = pvalues["first3"]
    assert p3 < FAIL_P, f"verify_alpha = 0.5 went undetected (p = {p3:.3g})"


BRANCH_LAW = [("isd", "sample", FULL, 3), ("isd", "argmax", TRUNC, 2), ("risd", "sample", TRUNC, 3)]


@pytest.mark.parametrize("kind,draft,sampling,stride", BRANCH_LAW)
def test_sampling_with_branches_follows_the_ar_law(model, adapter, kind, draft, sampling, stride):
    """Chi-square of the joint law of the first tokens against the enumerated AR law: the branch drafts' q̃ is
    fixed before the correction is drawn, so verifying them next round is still exact."""
    decoder = ISDDecoder(stride, MASK if kind == "isd" else None, lora=kind == "risd", branches=True)
    pvalues, acceptance, rounds = check(model, decoder, {**sampling, "draft": draft}, seed=2,
                                        lora=adapter if kind == "risd" else None)
    # each sample's one cold round is its first (after the prefill); rejections were followed by branch drafts
    assert rounds["cold"] == N_SAMPLES and rounds["verify_rejected"] > N_SAMPLES // 10
    for view, p in pvalues.items():
        assert p > PASS_P, f"joint law ({view}) differs from AR's with branches (p = {p:.3g})"


# (kind, draft, sampling, stride, guesses, guess_rows)
GUESS_LAW = [("isd", "sample", FULL, 3, 1, None), ("isd", "argmax", TRUNC, 2, 2, None),
             ("risd", "sample", TRUNC, 3, 1, None), ("risd", "sample", FULL, 3, 2, 1)]


@pytest.mark.parametrize("kind,draft,sampling,stride,guesses,rows", GUESS_LAW)
def test_sampling_with_guessed_corrections_follows_the_ar_law(model, adapter, kind, draft, sampling, stride, guesses,
                                                              rows):
    """Chi-square as above with guessed corrections (`ISDDecoder(guesses=G)`): a correction that equals a
    guess takes the next drafts from that guess's group — the first from its clean row (p̃ itself), the rest
    from MASK rows that saw the correction (with `guess_rows` = 1: from the branch's, blind to it); every
    group's q̃ is fixed before the correction is drawn."""
    decoder = ISDDecoder(stride, MASK if kind == "isd" else None, lora=kind == "risd", branches=True, guesses=guesses,
                         guess_rows=rows)
    stats: list = []
    pvalues, acceptance, rounds = check(model, decoder, {**sampling, "draft": draft}, seed=3,
                                        lora=adapter if kind == "risd" else None, stats_out=stats)
    assert rounds["cold"] == N_SAMPLES and rounds["verify_rejected"] > N_SAMPLES // 10
    assert N_SAMPLES // 20 < stats[0].guessed < rounds["verify_rejected"]  # guesses both met and missed
    for view, p in pvalues.items():
        assert p > PASS_P, f"joint law ({view}) differs from AR's with guessed corrections (p = {p:.3g})"
