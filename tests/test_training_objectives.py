"""Training masks and objectives (SPEC §3) against brute-force constructions and inference.

- The I-DLM and SDAR-style masks equal loop-by-loop constructions of SPEC §3.2 / §3.5, both as the
  dense SDPA mask and as FlexAttention's mask (evaluated with create_mask).
- The x0 half of a training forward equals an ordinary causal forward.
- Training/inference consistency: a MASK's logits in the training forward equal those of the same
  MASK in the ISD inference block after the same committed prefix (cold start and verify layouts).
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_transformer

from idlm.decoding.isd import ISDState, isd_block
from idlm.layers.attention import DenseAttention, KVCache
from idlm.models.transformer import Transformer
from idlm.training.masks import dense_mask, idlm_mask_fn, sdar_mask_fn
from idlm.training.objectives import ar_loss, idlm_loss, pair_positions, sdar_loss


def brute_idlm(L: int, B: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            if q < L and k < L:  # x_t -> x_t: causal inside its own block only
                m[q, k] = q // B == k // B and k <= q
            elif q < L <= k:  # x_t -> x0: clean tokens of strictly earlier blocks
                m[q, k] = (k - L) // B < q // B
            elif q >= L and k >= L:  # x0 -> x0: plain causal
                m[q, k] = k <= q
            # x0 -> x_t: never
    return m


def brute_sdar(L: int, B: int) -> torch.Tensor:
    m = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            if q < L and k < L:
                m[q, k] = q // B == k // B
            elif q < L <= k:
                m[q, k] = (k - L) // B < q // B
            elif q >= L and k >= L:
                m[q, k] = (k - L) // B <= (q - L) // B
    return m


@pytest.mark.parametrize("L,B", [(1, 1), (5, 1), (8, 3), (12, 4), (7, 7), (16, 5)])
def test_masks_equal_brute_force(L, B):
    assert torch.equal(dense_mask(idlm_mask_fn(L, B), 2 * L)[0, 0], brute_idlm(L, B))
    assert torch.equal(dense_mask(sdar_mask_fn(L, B), 2 * L)[0, 0], brute_sdar(L, B))


def test_flex_mask_mod_equals_dense_mask():
    from torch.nn.attention.flex_attention import create_mask
    for L, B in [(8, 3), (16, 4)]:
        for fn in (idlm_mask_fn(L, B), sdar_mask_fn(L, B)):
            flex = create_mask(lambda b, h, q, k: fn(q, k), None, None, 2 * L, 2 * L, device="cpu")
            assert torch.equal(flex[0, 0], dense_mask(fn, 2 * L)[0, 0])


@pytest.mark.filterwarnings("ignore")
def test_flex_attention_output_equals_sdpa_with_dense_mask():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    L, B = 16, 3
    fn = idlm_mask_fn(L, B)
    q, k, v = (torch.randn(2, 4, 2 * L, 8) for _ in range(3))
    bm = create_block_mask(lambda b, h, qi, ki: fn(qi, ki), None, None, 2 * L, 2 * L, device="cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(fn, 2 * L))
    assert (flex_attention(q, k, v, block_mask=bm) - ref).abs().max() < 1e-5
    # the x_t rows alone (R-ISD's split forward: `risd_halves`): queries 0..L−1 against all 2L keys
    from idlm.training.masks import flex_block_mask
    rows = flex_block_mask(fn, 2 * L, device="cpu", rows=L)
    assert torch.equal(dense_mask(fn, 2 * L, rows=L)[0, 0], dense_mask(fn, 2 * L)[0, 0, :L])
    out = flex_attention(q[:, :, :L], k, v, block_mask=rows)
    assert (out - ref[:, :, :L]).abs().max() < 1e-5



@pytest.fixture(scope="module")
def model():
    return tiny_transformer(40, std=0.3, mask_token_id=39)


@torch.no_grad()
def test_x0_half_equals_ordinary_causal_forward(model):
    L, B = 12, 3
    x0 = torch.randint(0, 39, (2, L))
    x_t = torch.full_like(x0, 39)
    attn = DenseAttention(dense_mask(idlm_mask_fn(L, B), 2 * L))
    h = model(torch.cat([x_t, x0], 1), pair_positions(2, L, "cpu"), attn)
    ref = model(x0)
    assert (h[:, L:] - ref).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("N", [2, 3, 4])
def test_training_mask_logits_equal_isd_inference_block(model, N):
    """MASK at block offset j of the training block starting at s (clean prefix x0[:s]) vs the same MASK in
    the ISD cold-start block [x0[s-1], MASK...] at P = s-1, and in the verify block after the prefix x0[:s-N+...]."""
    B = N - 1
    L = 4 * B + 1
    x0 = torch.randint(0, 39, (1, L))
    x_t = torch.full_like(x0, 39)
    attn = DenseAttention(dense_mask(idlm_mask_fn(L, B), 2 * L))
    h = model(torch.cat([x_t, x0], 1), pair_positions(1, L, "cpu"), attn)
    train_logits = model.compute_logits(h[0, :L])  # x_t half
    for s in range(B, L - B + 1, B):  # every block start after the first block
        # inference, cold start: prefix x0[:s-1] in the KV cache, block [x0[s-1], MASK x (2N-2)] at P = s-1
        cache = KVCache.for_model(model.config, 1, 64)
        model(x0[:, : s - 1], torch.arange(s - 1)[None], cache.view()) if s > 1 else None
        cache.lengths[0] = s - 1
        blk = isd_block(ISDState("C", int(x0[0, s - 1])), N, 39)
        hi = model(torch.tensor([blk.tokens]), torch.arange(s - 1, s - 1 + 2 * N - 1)[None], cache.view())
        inf = model.compute_logits(hi[0])
        for j in range(B):  # MASK at position s+j: block index 1+j in the cold block
            assert (train_logits[s + j] - inf[1 + j]).abs().max() < 1e-4
        # verify layout: pending = x0[s-N], specs = x0[s-N+1 .. s-1] (all accepted), MASKs at s..
        if s - N >= 0:
            cache.lengths[0] = s - N
            blk = isd_block(ISDState("V", int(x0[0, s - N]), x0[0, s - N + 1: s].tolist()), N, 39)
            hi = model(torch.tensor([blk.tokens]), torch.arange(s - N, s - N + 2 * N - 1)[None], cache.view())
            inf = model.compute_logits(hi[0])
            for j in range(B):
                assert (train_logits[s + j] - inf[N + j]).abs().max() < 1e-4


def test_losses_are_finite_and_have_gradients(model):
    tokens = torch.randint(0, 39, (2, 13))
    lossmask = torch.ones_like(tokens, dtype=torch.bool)
    lossmask[0, :4] = False  # a prompt
    m = Transformer(model.config).init_weights(seed=1)
    for out in (ar_loss(m, tokens, lossmask), idlm_loss(m, tokens, lossmask, 3, 39, "auto"),
                idlm_loss(m, tokens, lossmask, 3, 39, 0.2),
                sdar_loss(m, tokens, lossmask, 3, 39, generator=torch.Generator().manual_seed(0))):
        assert torch.isfinite(out["loss"])
        m.zero_grad()
        out["loss"].backward()
        assert m.model.embed_tokens.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_clean_loss_of_idlm_objective_equals_ar_loss(model):
    tokens = torch.randint(0, 39, (2, 10))
    lossmask = torch.rand(2, 10) > 0.3
    a = ar_loss(model, tokens, lossmask)["loss"]
    b = idlm_loss(model, tokens, lossmask, 2, 39, 0.2)["l_clean"]
    assert abs(float(a) - float(b)) < 1e-5


def test_risd_soft_targets_are_the_base_models_own_distribution():
    """distill_weight = w: loss = mean over MASK targets of (1 − w)·CE(token) + w·CE(p), p taken from an
    independent plain causal forward of the base model (no LoRA) — the oracle for the teacher rows."""
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.training.objectives import pair_attention

    m = tiny_transformer(41, mask_token_id=None)
    lora = LoRAAdapter(m.config, LoRAConfig(rank=4, alpha=8)).init_weights(std=0.3, seed=1, zero_b=False)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (2, 15), generator=g)
    lossmask = torch.rand(2, 15, generator=g) > 0.25
    lossmask[:, :3] = False  # prompts
    x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
    B, L = x0.shape
    block, mask_id = 3, 0
    with torch.no_grad():
        p = torch.softmax(m.compute_logits(m(x0)).float(), -1)  # [B, L, V]: the base model alone
        is_mask = lossmask[:, :-1]
        x_t = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
        half = torch.zeros(B, 2 * L, dtype=torch.bool)
        half[:, :L] = True
        hidden = m(torch.cat([x_t, x0], 1), pair_positions(B, L, "cpu"), pair_attention("idlm", L, block, x0.device),
                   lora=lora, lora_gate=half.float(), is_mask=torch.cat([is_mask, torch.zeros_like(is_mask)], 1))
        log_q = torch.log_softmax(m.compute_logits(hidden[:, :L]).float(), -1)
    noisy = is_mask & valid
    n = valid.sum()
    hard = -log_q.gather(-1, tgt[..., None]).squeeze(-1)[noisy].sum() / n
    soft = -(p * log_q).sum(-1)[noisy].sum() / n
    assert noisy.sum() > 5 and abs(float(soft) - float(hard)) > 1e-3  # the two targets differ here
    plain = idlm_loss(m, tokens, lossmask, block, mask_id, lora=lora)
    assert torch.allclose(plain["loss"], hard, atol=1e-5) and "l_soft" not in plain
    for w in (0.3, 1.0):
        out = idlm_loss(m, tokens, lossmask, block, mask_id, lora=lora, distill_weight=w)
        assert torch.allclose(out["loss"], (1 - w) * hard + w * soft, atol=1e-5)
    for w, tau in ((0.3, 1.0), (0.0, 0.7)):  # tv_weight t: (1 − t)·(CE mix) + t·TV(p̃, q̃) at τ, the rejection rate
        with torch.no_grad():
            z_p, z_q = m.compute_logits(m(x0)).float(), m.compute_logits(hidden[:, :L]).float()
        tv = 1 - torch.minimum(torch.softmax(z_p / tau, -1), torch.softmax(z_q / tau, -1)).sum(-1)
        tv = tv[noisy].sum() / n
        out = idlm_loss(m, tokens, lossmask, block, mask_id, lora=lora, distill_weight=w, tv_weight=0.5,
                        tv_temperature=tau)
        assert torch.allclose(out["loss"], 0.5 * ((1 - w) * hard + w * soft) + 0.5 * tv, atol=1e-5)
        assert torch.allclose(out["l_tv"], tv, atol=1e-5) and torch.allclose(out["l_noisy"], hard, atol=1e-5)
        assert torch.allclose(out["l_noisy"], hard, atol=1e-5) and torch.allclose(out["l_soft"], soft, atol=1e-5)
    # chunked rows give the same sums, and only the adapter gets gradients (the teacher is detached)
    from idlm.training import objectives
    x = torch.randn(7, m.config.hidden_size)
    t = torch.randn(7, m.config.hidden_size)
    y = torch.randint(0, 41, (7,))
    r = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.5, 1.0])  # row weights; 0 leaves a row out of every sum
    whole = objectives._distill_ce_sums(m, x, t, y, 0.5, row_weight=r)
    parts = objectives._distill_ce_sums(m, x, t, y, 0.5, row_weight=r, chunk=3)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, parts))
    kept = r > 0  # the oracle: the kept rows selected by index
    sel = objectives._distill_ce_sums(m, x[kept], t[kept], y[kept], 0.5, row_weight=r[kept])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, sel))
    ce = torch.nn.functional.cross_entropy(m.compute_logits(x), y, reduction="none")
    both = objectives._ce_sum(m, x, y, r, kept.float(), chunk=2)
    assert torch.allclose(both[0], (ce * r).sum(), atol=1e-5) and torch.allclose(both[1], ce[kept].sum(), atol=1e-5)
    for prm in m.parameters():
        prm.requires_grad_(False)
    out = idlm_loss(m, tokens, lossmask, block, mask_id, lora=lora, distill_weight=1.0)
    out["loss"].backward()
    assert all(prm.grad is None for prm in m.parameters())
    assert sum(float(q.grad.abs().sum()) for q in lora.parameters() if q.grad is not None) > 0


def _conversion_batch(m, seed: int, low: int, high: int, mask_id: int, block: int = 3) -> dict:
    """A random conversion batch (2 × 15 tokens in [low, high), a quarter of the tokens prompt) and the oracle's
    pieces from an explicit [x_t | x0] forward of `m` with the I-DLM mask (with autograd): the noisy rows'
    log q̃ and the clean rows' log p, [B, L, V] each, beside the targets and the noisy / valid row masks."""
    from idlm.training.objectives import pair_attention

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(low, high, (2, 15), generator=g)
    lossmask = torch.rand(2, 15, generator=g) > 0.25
    lossmask[:, :3] = False
    x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
    B, L = x0.shape
    is_mask = lossmask[:, :-1]
    x_t = torch.where(is_mask, torch.full_like(x0, mask_id), x0)
    hidden = m(torch.cat([x_t, x0], 1), pair_positions(B, L, "cpu"), pair_attention("idlm", L, block, x0.device))
    return dict(tokens=tokens, lossmask=lossmask, x0=x0, tgt=tgt, valid=valid, noisy=is_mask & valid,
                n=valid.sum(), log_q=torch.log_softmax(m.compute_logits(hidden[:, :L]).float(), -1),
                log_c=torch.log_softmax(m.compute_logits(hidden[:, L:]).float(), -1))


def _ce(log_probs: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, n) -> torch.Tensor:
    """Σ over the chosen rows of −log_probs[target], / n."""
    return -log_probs.gather(-1, tgt[..., None]).squeeze(-1)[rows].sum() / n


def test_clean_teacher_holds_the_clean_half_to_the_original_models_distribution():
    """clean_distill_weight c with a frozen original (one vocabulary row fewer: the added MASK): clean term =
    mean over targets of (1 − c)·CE(token) + c·CE(p0), p0 from the original's own plain causal forward,
    padded with probability 0 for the MASK id; the noisy term is untouched; the original gets no gradient."""
    m = tiny_transformer(41, mask_token_id=40)
    teacher = tiny_transformer(40, seed=5).requires_grad_(False)
    block, mask_id = 3, 40
    with torch.no_grad():
        o = _conversion_batch(m, 4, 0, 40, mask_id, block)
        tokens, lossmask, tgt, valid, n = o["tokens"], o["lossmask"], o["tgt"], o["valid"], o["n"]
        p0 = torch.softmax(teacher.compute_logits(teacher(o["x0"])).float(), -1)  # [B, L, 40]
        p0 = torch.cat([p0, torch.zeros(*p0.shape[:2], 1)], -1)
    l_noisy = _ce(o["log_q"], tgt, o["noisy"], n)
    hard = _ce(o["log_c"], tgt, valid, n)
    soft = -(p0 * o["log_c"]).sum(-1)[valid].sum() / n
    assert abs(float(soft) - float(hard)) > 1e-3
    for c in (0.5, 1.0):
        term = (1 - c) * hard + c * soft
        out = idlm_loss(m, tokens, lossmask, block, mask_id, clean_teacher=teacher, clean_distill_weight=c)
        assert torch.allclose(out["loss"], l_noisy + l_noisy / term * term, atol=1e-5)
        assert torch.allclose(out["clean_scale"], l_noisy / term, atol=1e-5)
        assert torch.allclose(out["l_clean"], hard, atol=1e-5) and torch.allclose(out["l_clean_soft"], soft, atol=1e-5)
        assert torch.allclose(out["l_noisy"], l_noisy, atol=1e-5)
    out["loss"].backward()
    assert all(q.grad is None for q in teacher.parameters()) and m.model.embed_tokens.weight.grad is not None
    plain = idlm_loss(m, tokens, lossmask, block, mask_id, clean_teacher=teacher)  # weight 0: the teacher unused
    assert "l_clean_soft" not in plain and torch.allclose(plain["l_clean"], hard, atol=1e-5)


def test_distill_weight_is_validated_and_keeps_old_fingerprints():
    from idlm.errors import ConfigError
    from idlm.training.config import TrainConfig

    base = dict(kind="lora", data="d", out="o", init="m")
    assert TrainConfig(**base).fingerprint() == TrainConfig(**base, distill_weight=0).fingerprint()
    assert TrainConfig(**base).fingerprint() != TrainConfig(**base, distill_weight=0.5).fingerprint()
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="distill_weight"):
            TrainConfig(**base, distill_weight=bad)
    with pytest.raises(ConfigError, match="kinds lora .* and convert"):
        TrainConfig(**{**base, "kind": "sdar"}, distill_weight=0.5)
    assert TrainConfig(**{**base, "kind": "convert"}, distill_weight=0.5).distill_weight == 0.5


def test_conversion_soft_targets_are_the_models_own_clean_distribution_without_gradient():
    """A conversion with distill_weight w: noisy term = mean over MASK targets of (1 − w)·CE(token) + w·CE(p),
    p from an independent plain causal forward of the same model (the oracle for the clean rows), clean
    term unchanged, auto scale = noisy term / L_clean; and no gradient flows through p: the gradient equals
    that of the same loss with p given as a constant."""
    m = tiny_transformer(41, mask_token_id=0)
    block, mask_id = 3, 0
    o = _conversion_batch(m, 3, 1, 41, mask_id, block)
    tokens, lossmask, tgt, noisy, n = o["tokens"], o["lossmask"], o["tgt"], o["noisy"], o["n"]
    with torch.no_grad():
        p = torch.softmax(m.compute_logits(m(o["x0"])).float(), -1)  # [B, L, V]: a plain causal forward
    hard = _ce(o["log_q"], tgt, noisy, n)
    soft = -(p * o["log_q"]).sum(-1)[noisy].sum() / n
    clean = _ce(o["log_c"], tgt, o["valid"], n)
    assert noisy.sum() > 5 and abs(float(soft) - float(hard)) > 1e-3
    for w in (0.5, 1.0):
        term = (1 - w) * hard + w * soft
        oracle = term + (term / clean).detach() * clean
        out = idlm_loss(m, tokens, lossmask, block, mask_id, distill_weight=w)
        assert torch.allclose(out["loss"], oracle, atol=1e-5)
        assert torch.allclose(out["l_noisy"], hard, atol=1e-5) and torch.allclose(out["l_soft"], soft, atol=1e-5)
        assert torch.allclose(out["l_clean"], clean, atol=1e-5)
        grads = torch.autograd.grad(out["loss"], list(m.parameters()), allow_unused=True)
        want = torch.autograd.grad(oracle, list(m.parameters()), allow_unused=True, retain_graph=True)
        assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want))
    plain = idlm_loss(m, tokens, lossmask, block, mask_id)
    assert "l_soft" not in plain and torch.allclose(plain["l_noisy"], hard, atol=1e-5)


def test_compile_does_not_change_the_fingerprint():
    """A compiled run resumes eagerly (scripts/smollm2_risd.py retries without the compiler when it fails), and
    runs saved before `compile` was left out keep their fingerprint (the value the code had then)."""
    from idlm.training.config import TrainConfig

    base = dict(kind="lora", data="d", out="o", init="m")
    assert TrainConfig(**base).fingerprint() == "2a8912187c696cdc"
    assert TrainConfig(**base, compile=True).fingerprint() == TrainConfig(**base).fingerprint()
    assert TrainConfig(**base, lr=2e-3).fingerprint() != TrainConfig(**base).fingerprint()


def test_draft_positions_equal_a_loop():
    from idlm.training.objectives import draft_positions

    g = torch.Generator().manual_seed(3)
    for block in (1, 2, 3, 5):
        is_mask = torch.rand(4, 17, generator=g) > 0.3
        want = torch.zeros(4, 17, dtype=torch.long)
        for b in range(4):
            for i in range(17):
                start = i // block * block
                want[b, i] = int(is_mask[b, start:i].sum())  # MASKs before i in its block
        assert torch.equal(draft_positions(is_mask, block), want)


def test_position_decay_weighs_draft_positions():
    """loss = Σ γ^j·ce / (n·mean γ^j) over MASK targets (soft targets too); γ = 1 is the plain loss; the
    reported l_noisy stays the unweighted mean; other kinds refuse it."""
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.training.objectives import draft_positions

    m = tiny_transformer(41, mask_token_id=None)
    lora = LoRAAdapter(m.config, LoRAConfig(rank=4, alpha=8)).init_weights(std=0.3, seed=1, zero_b=False)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 40, (2, 15), generator=g)
    lossmask = torch.rand(2, 15, generator=g) > 0.2
    lossmask[:, :2] = False
    block, gamma = 3, 0.5
    plain = idlm_loss(m, tokens, lossmask, block, 0, lora=lora)
    assert torch.allclose(idlm_loss(m, tokens, lossmask, block, 0, lora=lora, position_decay=1.0)["loss"],
                          plain["loss"])
    # the per-target CEs from the plain loss's own definition, one target at a time (by masking the rest)
    is_mask, valid = lossmask[:, :-1], lossmask[:, 1:]
    noisy = is_mask & valid
    n = valid.sum()
    j = draft_positions(is_mask, block)[noisy].float()
    w = gamma ** j
    assert j.max() >= 1  # several draft positions occur
    out = idlm_loss(m, tokens, lossmask, block, 0, lora=lora, position_decay=gamma)
    assert torch.allclose(out["l_noisy"], plain["l_noisy"], atol=1e-6)
    # the per-target CEs (the oracle: the forward written out, as in the soft-target test)
    with torch.no_grad():
        from idlm.training.objectives import pair_attention
        x0, tgt = tokens[:, :-1], tokens[:, 1:]
        B, L = x0.shape
        x_t = torch.where(is_mask, torch.zeros_like(x0), x0)
        half = torch.zeros(B, 2 * L, dtype=torch.bool)
        half[:, :L] = True
        hidden = m(torch.cat([x_t, x0], 1), pair_positions(B, L, "cpu"), pair_attention("idlm", L, block, x0.device),
                   lora=lora, lora_gate=half.float(), is_mask=torch.cat([is_mask, torch.zeros_like(is_mask)], 1))
        ce = torch.nn.functional.cross_entropy(m.compute_logits(hidden[:, :L][noisy]), tgt[noisy], reduction="none")
    assert torch.allclose(ce.sum() / n, plain["loss"], atol=1e-5)  # the oracle reproduces the plain loss
    assert torch.allclose(out["loss"], (w * ce).sum() / (n * w.mean()), atol=1e-5)
    soft = idlm_loss(m, tokens, lossmask, block, 0, lora=lora, position_decay=gamma, distill_weight=1.0)
    assert torch.allclose(soft["l_noisy"], plain["l_noisy"], atol=1e-5) and "l_soft" in soft
    with pytest.raises(ValueError, match="position_decay"):
        idlm_loss(m, tokens, lossmask, block, 0, position_decay=0.5)
    from idlm.errors import ConfigError
    from idlm.training.config import TrainConfig
    with pytest.raises(ConfigError, match="position_decay"):
        TrainConfig(kind="convert", data="d", out="o", init="m", position_decay=0.5)
    for bad in (0, 1.5, "x"):
        with pytest.raises(ConfigError, match="position_decay"):
            TrainConfig(kind="lora", data="d", out="o", init="m", position_decay=bad)


@pytest.mark.parametrize("kind", ["risd_soft", "risd_decay", "risd_tv", "convert", "sdar"])
def test_compiled_objective_does_not_recompile_for_each_batch(kind):
    """How many loss rows a batch has depends on its data; the objectives' shapes must not (dynamo traced a
    new graph per count before, up to its limit of 64, on the H200: docs/risd.md). Three batches with
    different prompt lengths: after the first, nothing is traced again."""
    from torch._dynamo.testing import CompileCounter

    from idlm.layers.lora import LoRAAdapter, LoRAConfig

    torch._dynamo.reset()
    m = tiny_transformer(41, mask_token_id=40)
    lora = LoRAAdapter(m.config, LoRAConfig(rank=4, alpha=8)).init_weights(std=0.3, seed=1, zero_b=False)
    g = torch.Generator().manual_seed(0)

    def objective(tokens, lossmask):
        if kind == "risd_soft":
            return idlm_loss(m, tokens, lossmask, 3, 0, lora=lora, distill_weight=1.0)["loss"]
        if kind == "risd_tv":
            return idlm_loss(m, tokens, lossmask, 3, 0, lora=lora, distill_weight=1.0, tv_weight=0.7,
                             tv_temperature=0.7)["loss"]
        if kind == "risd_decay":
            return idlm_loss(m, tokens, lossmask, 3, 0, lora=lora, position_decay=0.7)["loss"]
        if kind == "convert":
            return idlm_loss(m, tokens, lossmask, 3, 40, "auto")["loss"]
        return sdar_loss(m, tokens, lossmask, 3, 40, generator=torch.Generator().manual_seed(1))["loss"]

    counter = CompileCounter()
    compiled = torch.compile(objective, backend=counter)
    frames = []
    for prompt in (3, 7, 5):
        tokens = torch.randint(0, 40, (2, 17), generator=g)
        lossmask = torch.ones_like(tokens, dtype=torch.bool)
        lossmask[:, :prompt] = False
        lossmask[1, prompt + 4] = False  # a hole: the two rows differ
        expected = objective(tokens, lossmask)  # eager first: it also fills the model's lazy caches (rotary)
        assert torch.allclose(compiled(tokens, lossmask), expected, atol=1e-5)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0] and frames[2] == frames[0], frames


def test_risd_split_forward_equals_the_joint_forward_with_its_gradients():
    """`risd_halves` (the clean half alone without autograd, then x_t over its recorded keys) gives the joint
    [x_t | x0] forward's hidden states and, through the loss, the same adapter gradients — the oracle is
    the joint forward written out (one forward, gate 1 on x_t, 0 on x0, the pair mask)."""
    from idlm.layers.lora import LoRAAdapter, LoRAConfig
    from idlm.training import objectives
    from idlm.training.objectives import pair_attention, risd_halves

    m = tiny_transformer(41, mask_token_id=None).requires_grad_(False)
    lora = LoRAAdapter(m.config, LoRAConfig(rank=4, alpha=8)).init_weights(std=0.3, seed=1, zero_b=False)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 40, (3, 17), generator=g)
    lossmask = torch.rand(3, 17, generator=g) > 0.3
    lossmask[:, :4] = False
    x0, tgt, valid = tokens[:, :-1], tokens[:, 1:], lossmask[:, 1:]
    B, L = x0.shape
    block = 3
    is_mask = lossmask[:, :-1]
    x_t = torch.where(is_mask, torch.zeros_like(x0), x0)
    half = torch.zeros(B, 2 * L)
    half[:, :L] = 1
    joint = m(torch.cat([x_t, x0], 1), pair_positions(B, L, "cpu"), pair_attention("idlm", L, block, x0.device),
              lora=lora, lora_gate=half, is_mask=torch.cat([is_mask, torch.zeros_like(is_mask)], 1))
    h_t, h_0 = risd_halves(m, x_t, x0, is_mask, block, lora)
    assert torch.allclose(h_t, joint[:, :L].flatten(0, 1), atol=1e-5)
    assert torch.allclose(h_0, joint[:, L:].flatten(0, 1), atol=1e-5) and not h_0.requires_grad
    w = (is_mask & valid).flatten().float()
    oracle = objectives._distill_ce_sums(m, joint[:, :L].flatten(0, 1), joint[:, L:].flatten(0, 1).detach(),
                                         tgt.flatten(), 0.5, row_weight=w)[0] / valid.sum()
    oracle.backward()
    want = {k: p.grad.clone() for k, p in lora.named_parameters() if p.grad is not None}
    lora.zero_grad()
    idlm_loss(m, tokens, lossmask, block, 0, lora=lora, distill_weight=0.5)["loss"].backward()
    got = {k: p.grad for k, p in lora.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys() and len(want) > 3
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), k


def test_the_tv_draft_loss_trains_a_blind_draft_to_the_best_acceptance_and_cross_entropy_to_the_marginal():
    """A draft that cannot see c (one logit vector z for every c) trained on rows (p̃_c, weight w_c) through
    `_distill_ce_sums`: soft cross-entropy reaches the marginal Σ w_c p̃_c and its acceptance
    (`marginal_draft_acceptance`), the TV term reaches `best_blind_draft_acceptance` — more, here."""
    from idlm.decoding.acceptance import best_blind_draft_acceptance, marginal_draft_acceptance
    from idlm.training import objectives

    class Logits:  # hidden states are the logits themselves
        @staticmethod
        def compute_logits(h):
            return h

    g = torch.Generator().manual_seed(2)
    K, V = 4, 12
    w = torch.softmax(torch.randn(K, generator=g), -1)
    p = torch.softmax(3 * torch.randn(K, V, generator=g), -1)
    targets = torch.zeros(K, dtype=torch.long)  # unused: the hard-target weight is 0
    accept = {}
    for name, kw in (("ce", {"weight": 1.0}), ("tv", {"weight": 1.0, "tv_weight": 1.0})):
        z = torch.zeros(V, requires_grad=True)
        opt = torch.optim.Adam([z], lr=0.1)
        for _ in range(800):
            opt.zero_grad()
            loss = objectives._distill_ce_sums(Logits, z.expand(K, V), p.log(), targets, row_weight=w, **kw)[0]
            loss.backward()
            opt.step()
        q = torch.softmax(z.detach(), -1)
        accept[name] = (w * torch.minimum(p, q).sum(-1)).sum().item()
    marginal, best = marginal_draft_acceptance(w, p).item(), best_blind_draft_acceptance(w, p).item()
    assert best > marginal + 0.02  # a case where the two differ
    assert accept["ce"] == pytest.approx(marginal, abs=2e-3)
    assert accept["tv"] == pytest.approx(best, abs=5e-3)
