"""`lora_linear_rows` (a projection and its gated LoRA in one Triton kernel) against the eager `lora_linear`, and
`lowrank_factors` against the adapter's own per-projection math: in Triton's interpreter on CPU, on a GPU where
there is one.

The oracles: `lora_linear` is plain matmuls, checked here against a LoRA applied projection by projection
(y = W x + gate · scale · B(A x), `idlm/layers/lora.py`'s definition); the kernel is checked against it. The
interpreter rounds float32 to bf16 by truncation where a GPU rounds to nearest, and sums in another order than
a matmul, so bf16 is held to two rounding steps of the output's scale and float32 to float32 accumulation error.
Rows with gate 0 must give the base projection x·Wᵀ (R-ISD's verification reads them)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the LoRA kernel's tests need the triton package (dev extra)")

from idlm.layers.lora import LoRAAdapter, LoRAConfig  # noqa: E402
from idlm.layers.lora_kernel import lora_linear, lora_linear_rows, lowrank_factors  # noqa: E402
from idlm.models.config import ModelConfig  # noqa: E402
from idlm.models.transformer import Transformer  # noqa: E402

# (M rows, K in, N out, R rank): a decode block of idlm-tiny-ar's q/k/v, its down projection, ragged edges
SHAPES = [(7, 384, 640, 96), (1, 896, 384, 32), (19, 70, 130, 5), (16, 64, 64, 16)]


def _tiny_config(**kw) -> ModelConfig:
    base = dict(family="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return ModelConfig(**{**base, **kw})


def _case(dtype, M, K, N, R, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    a = (torch.randn(R, K, generator=g) / K ** 0.5).to(dtype)
    b = (0.5 * torch.randn(N, R, generator=g) / R ** 0.5).to(dtype)
    gate = torch.rand(M, generator=g) > 0.4
    return [t.to(device) for t in (x, w, a, b, gate)]


def _tolerance(dtype, ref):
    if dtype == torch.float32:
        return 1e-5 * (1 + ref.abs().max().item())
    # bf16: two rounding steps of the output's scale (the adapted rows round x·Wᵀ, the LoRA term and their sum;
    # the interpreter truncates)
    return 2 ** -6 * (1 + ref.abs().max().item())


def test_lora_linear_is_the_gated_lora_of_each_projection():
    """The reference with `lowrank_factors` of q/k/v (two of three targeted) equals the adapter's definition
    applied projection by projection, gate on and off."""
    cfg = _tiny_config()
    model = Transformer(cfg)
    lora = LoRAAdapter(cfg, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))).init_weights(
        std=0.1, seed=0, zero_b=False)
    attn, la = model.model.layers[0].self_attn, lora.layers[0]
    named = [("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj)]
    w, a, b, segments = lowrank_factors(la, named)
    assert a.shape == (8, cfg.hidden_size) and b.shape == (w.shape[0], 8)
    assert segments == ((64, 0, 4), (96, 4, 0), (128, 4, 4))  # q rows 0..63 (A 0..3), k none, v A 4..7
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    gate = torch.tensor([True, False, True, True, False])
    want = []
    for name, m in named:
        y = x @ m.weight.t()
        if name in la.pairs:
            p = la.pairs[name]
            y = y + gate[:, None] * (la.scale * ((x @ p.lora_A.weight.t()) @ p.lora_B.weight.t()))
        want.append(y)
    torch.testing.assert_close(lora_linear(x, w, a, b, gate), torch.cat(want, 1), rtol=1e-5, atol=1e-6)
    w2, a2, b2, s2 = lowrank_factors(la, [("k_proj", attn.k_proj)])  # nothing targeted: no factors
    assert a2 is None and b2 is None and s2 is None and torch.equal(w2, attn.k_proj.weight)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_reference_in_the_interpreter(dtype, shape):
    x, w, a, b, gate = _case(dtype, *shape)
    got = lora_linear_rows(x, w, a, b, gate)
    ref = lora_linear(x.float(), w.float(), a.float(), b.float(), gate) if dtype != torch.float32 else \
        lora_linear(x, w, a, b, gate)
    assert got.shape == ref.shape and got.dtype == dtype
    assert (got.float() - ref.float()).abs().max().item() <= _tolerance(dtype, ref)
    base = x.float() @ w.float().t()  # gate-0 rows: the base projection alone
    off = ~gate
    assert (got[off].float() - base[off]).abs().max().item() <= _tolerance(dtype, base) if off.any() else True


def _block_diagonal(segments, n, k, dtype, seed=5):
    """A [R, K] and a block-diagonal B' [N, R] of projections side by side (`segments` as `lowrank_factors`)."""
    g = torch.Generator().manual_seed(seed)
    r = sum(s[2] for s in segments)
    a = (torch.randn(r, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.zeros(n, r)
    start = 0
    for end, first, rank in segments:
        b[start:end, first:first + rank] = 0.5 * torch.randn(end - start, rank, generator=g) / max(rank, 1) ** 0.5
        start = end
    return a, b.to(dtype)


@pytest.mark.parametrize("segments", [((64, 0, 8), (128, 8, 8), (192, 16, 8)),  # blocks inside one projection
                                      ((70, 0, 8), (100, 8, 0), (130, 8, 4)),  # blocks across two; k untargeted
                                      ((96, 0, 6), (160, 6, 6))])  # two projections (gate/up)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_each_projections_own_lora_rows(dtype, segments):
    """With `segments`, a program reads only its projection's A rows (all of them where its columns span two):
    the same values as the reference over the whole block-diagonal B'."""
    n, k = segments[-1][0], 96
    x, w, _, _, gate = _case(dtype, 7, k, n, 4, seed=2)
    a, b = _block_diagonal(segments, n, k, dtype)
    ref = lora_linear(x.float(), w.float(), a.float(), b.float(), gate)
    for bn in (32, 64):
        got = lora_linear_rows(x, w, a, b, gate, segments, block_n=bn)
        assert (got.float() - ref).abs().max().item() <= _tolerance(dtype, ref), bn
    with pytest.raises(ValueError, match="segments"):
        lora_linear_rows(x, w, a, b, gate, ((n - 1, 0, a.shape[0]),))



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_xa_equals_the_reference_and_leaves_its_counters_at_zero(dtype):
    """`shared_xa`: x·Aᵀ by the producer programs, read by the column programs — the reference's values (two row
    blocks, three projections of ranks 8/0/4 side by side, a 16-column tile), call after call on one workspace,
    whose counters are back at 0 after every launch (what lets a CUDA graph replay it)."""
    from idlm.layers.lora_kernel import lora_workspace

    segments = ((64, 0, 8), (96, 8, 0), (128, 8, 4))
    n, k, m = 128, 96, 19
    g = torch.Generator().manual_seed(7)
    a, b = _block_diagonal(segments, n, k, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    ws = lora_workspace(m, a.shape[0], dtype, "cpu")
    for seed in (0, 1):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
        gate = torch.arange(m) % 3 == 0
        want = lora_linear(x, w, a, b, gate)
        got = lora_linear_rows(x, w, a, b, gate, segments, block_n=16, shared_xa=True, workspace=ws)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.float(), want.float(), **tol)
        torch.testing.assert_close(got[~gate], lora_linear(x, w)[~gate], **tol)  # gate 0: x·Wᵀ
        assert ws[1].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="workspace"):
        lora_linear_rows(x, w, a, b, gate, segments, shared_xa=True, workspace=lora_workspace(m, 40, dtype, "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_without_lora_or_gate(dtype):
    x, w, a, b, gate = _case(dtype, 7, 96, 80, 8, seed=3)
    ref = x.float() @ w.float().t()
    assert (lora_linear_rows(x, w).float() - ref).abs().max().item() <= _tolerance(dtype, ref)
    every = lora_linear(x.float(), w.float(), a.float(), b.float())  # no gate: every row adapted
    assert (lora_linear_rows(x, w, a, b).float() - every).abs().max().item() <= _tolerance(dtype, every)
    float_gate = gate.to(dtype)  # a 0/1 gate in the activations' dtype works as the bool one
    assert torch.equal(lora_linear_rows(x, w, a, b, float_gate), lora_linear_rows(x, w, a, b, gate))


def test_bad_arguments_are_named():
    x, w, a, b, gate = _case(torch.float32, 4, 32, 48, 4)
    with pytest.raises(ValueError, match="columns"):
        lora_linear_rows(x[:, :16], w)
    with pytest.raises(ValueError, match="both LoRA factors"):
        lora_linear_rows(x, w, a, None)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_rows(x, w, a, b[:, :2])
    with pytest.raises(ValueError, match="gate values"):
        lora_linear_rows(x, w, a, b, gate[:3])
    with pytest.raises(ValueError, match="one dtype"):
        lora_linear_rows(x, w.to(torch.bfloat16))
    assert lora_linear_rows(x[:0], w, a, b, gate[:0]).shape == (0, 48)


_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                           reason="needs a CUDA device and Triton compiled for it (TRITON_INTERPRET=0)")


@_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_the_gpu(dtype, shape):
    """On the GPU: the reference's values (the same roundings; float32 in IEEE, not TF32), gate-0 rows within
    accumulation order of cuBLAS's x·Wᵀ."""
    x, w, a, b, gate = _case(dtype, *shape, device="cuda")
    got = lora_linear_rows(x, w, a, b, gate)
    ref = lora_linear(x, w, a, b, gate)
    assert (got.float() - ref.float()).abs().max().item() <= _tolerance(dtype, ref)
    base = x @ w.t()
    off = ~gate
    if off.any():
        assert (got[off].float() - base[off].float()).abs().max().item() <= _tolerance(dtype, base)
    segments = ((70, 0, 8), (100, 8, 0), (130, 8, 4))  # per-projection A rows, a block across two projections
    a2, b2 = (t.to("cuda") for t in _block_diagonal(segments, 130, shape[1], dtype))
    w2 = w[:130] if w.shape[0] >= 130 else torch.cat([w] * (-(-130 // w.shape[0])))[:130]
    ref2 = lora_linear(x, w2, a2, b2, gate)
    got2 = lora_linear_rows(x, w2, a2, b2, gate, segments)
    assert (got2.float() - ref2.float()).abs().max().item() <= _tolerance(dtype, ref2)


# the kernel's Triton IR for an sm_90 CUDA target, after the TTIR passes (`triton_cuda.run_ttir_script`):
# {variant: "ok" or the error}
_TTIR_BODY = r"""
from idlm.layers.lora_kernel import _kernel, BLOCK_M, kernel_tile

fn = _kernel()
BLOCK_N, BLOCK_K, _ = kernel_tile(384)  # the default tile (idlm-tiny-ar's hidden size)

def build(lora, gated, dt, shared=False):
    ce = dict(BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, BR=32, R=24, LORA=lora, GATED=gated, IEEE=dt == "*fp32",
              UPCAST=False, SHARED=shared, RS=32)
    text = ttir(fn, {"X": dt, "W": dt, "A": dt, "B": dt, "G": "*i1", "OUT": dt, "XA": dt, "SYNC": "*i32"}, ce,
                optimize=True)
    ok = "tt.func" in text and "tt.dot" in text
    if shared:  # the producers' release, the spin's acquire, the resets
        ok = ok and "tt.atomic_rmw" in text and "scf.while" in text
    return ok or text

report([(f"lora={lora} gated={gated} dtype={dt[1:]}", lambda lora=lora, gated=gated, dt=dt: build(lora, gated, dt))
        for lora, gated, dt in itertools.product((False, True), (False, True), ("*bf16", "*fp32"))]
       + [(f"shared dtype={dt[1:]}", lambda dt=dt: build(True, True, dt, True)) for dt in ("*bf16", "*fp32")])
"""


@_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_xa_on_the_gpu_in_a_cuda_graph(dtype):
    """On the GPU: `shared_xa` (producers, the spin, the counters' reset) gives the plain kernel's values on
    idlm-tiny-ar's q/k/v shape, and a CUDA graph of 20 launches on one workspace replays to the same output
    three times with the counters back at 0 (a hang here means the spin never saw its producers)."""
    from idlm.layers.lora_kernel import lora_workspace

    segments = ((384, 0, 32), (512, 32, 32), (640, 64, 32))
    a, b = (t.to("cuda") for t in _block_diagonal(segments, 640, 384, dtype))
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(640, 384, generator=g) / 384 ** 0.5).to(dtype).cuda()
    x = torch.randn(7, 384, generator=g).to(dtype).cuda()
    gate = (torch.arange(7) >= 3).cuda()
    plain = lora_linear_rows(x, w, a, b, gate, segments)
    ws = lora_workspace(7, 96, dtype, "cuda")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lora_linear_rows(x, w, a, b, gate, segments, shared_xa=True, workspace=ws), plain,
                               **tol)
    out = torch.empty_like(plain)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            out.copy_(lora_linear_rows(x, w, a, b, gate, segments, shared_xa=True, workspace=ws))
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, plain, **tol)
        assert ws[1].tolist() == [0, 0]


def test_kernel_compiles_for_cuda():
    """Every variant (with and without the LoRA and the gate, bf16 / fp32, and shared_xa's producers and spin)
    passes Triton's CUDA front end and its TTIR passes, built on the CPU (tensor-core dots: tl.dot survives)."""
    from triton_cuda import run_ttir_script

    result = run_ttir_script(_TTIR_BODY)
    assert len(result) == 10 and all(v == "ok" for v in result.values()), result


@pytest.mark.parametrize("shared", [False, True])
def test_engine_with_the_kernel_emits_greedy_ar(monkeypatch, shared):
    """The "lowrank" layout with every projection through the kernel (Triton's interpreter standing in for the
    GPU: `lora_mm` forced onto `lora_linear_rows`): R-ISD's greedy tokens on the embedded idlm-tiny-ar and its
    adapter are AR's, float32, and it drafts (TPF > 1); with `shared_xa` too (x·Aᵀ by the producer programs).
    (Two short requests and wide tiles: the interpreter is slow.)"""
    import idlm.models.transformer as tr
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.layers.lora_kernel import lora_mm, lora_workspace
    from idlm.models import registry
    from idlm.models.loader import load_pretrained

    calls = []

    def through_kernel(x, factors, gate=None, mm=None):
        w, a, b, bias, segments, _ = factors
        assert bias is None
        calls.append(x.shape)
        g = None if gate is None else gate.reshape(-1)
        x2 = x.reshape(-1, x.shape[-1])
        space = lora_workspace(x2.shape[0], a.shape[0], x.dtype, "cpu") if shared and a is not None else None
        return lora_linear_rows(x2, w, a, b, g, segments, block_n=256, block_k=128, shared_xa=shared,
                                workspace=space).reshape(*x.shape[:-1], w.shape[0])

    model, tok = load_pretrained("idlm-tiny-ar", dtype="float32")
    lora = LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), model.config)
    prompts = [tok.encode(t) for t in ("def add(a, b):", "for i in range(")]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cfg = dict(stride=4, max_num_seqs=2, num_pages=64, fuse_projections=True)
    ar = LLMEngine(model, tok, EngineConfig(decoder="ar", **cfg)).run(prompts, sp)
    monkeypatch.setattr(tr, "lora_mm", through_kernel)
    eng = LLMEngine(model, tok, EngineConfig(decoder="risd", lora_layout="lowrank", **cfg), lora=lora)
    out = eng.run(prompts, sp)
    assert calls and [o.token_ids for o in out] == [o.token_ids for o in ar]
    assert sum(o.stats.committed for o in out) > sum(o.stats.forwards for o in out)
    assert lora_mm is not through_kernel


def test_choose_lora_layout_weighs_the_step_bytes_against_the_l2():
    """"lowrank" exactly where its step's weights fit L2_FIT of the L2 and the select layout's do not."""
    from idlm.layers.lora_kernel import L2_FIT, choose_lora_layout

    l2 = 50 << 20
    fit = int(L2_FIT * l2)
    assert choose_lora_layout(52_000_000, 34_000_000, l2) == "lowrank"  # idlm-tiny-ar on an H100 / H200
    assert choose_lora_layout(fit + 1, fit, l2) == "lowrank"
    assert choose_lora_layout(fit, fit - 1, l2) == "select"  # both fit: cuBLAS's GEMM
    assert choose_lora_layout(428_000_000, 216_000_000, l2) == "select"  # neither fits (SmolLM2-135M)
    assert choose_lora_layout(52_000_000, 34_000_000, None) == "select"  # no GPU
    assert choose_lora_layout(52_000_000, 34_000_000, 0) == "select"


def test_lora_step_bytes_count_the_weights_each_layout_reads():
    """`Transformer.lora_step_bytes` against a direct count of the embedded idlm-tiny-ar and its adapter:
    "select" reads every projection twice, "lowrank" once plus the factors, both the (tied) LM head; and the
    engine's "auto" resolves to "select" off the GPU (and in exact mode), the given layout otherwise."""
    from idlm.engine.model_runner import resolve_lora_layout
    from idlm.models import registry
    from idlm.models.loader import load_pretrained

    model, _ = load_pretrained("idlm-tiny-ar", dtype="bfloat16")
    lora = LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), model.config)
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    proj, head = 2 * c.num_hidden_layers * per_layer, 2 * c.vocab_size * c.hidden_size
    rank = lora.config.rank
    a_in = 5 * c.hidden_size + q + c.intermediate_size  # q, k, v, gate, up read the hidden state; o, down
    b_out = q + 2 * kv + c.hidden_size + 2 * c.intermediate_size + c.hidden_size
    fac = 2 * c.num_hidden_layers * rank * (a_in + b_out)  # A [r, in] and B [out, r] of all seven projections
    assert model.lora_step_bytes(lora) == {"select": 2 * proj + head, "lowrank": proj + fac + head}
    assert resolve_lora_layout("auto", model, lora) == "select"  # CPU
    assert resolve_lora_layout("lowrank", model, lora) == "lowrank"


@_cuda
@pytest.mark.gpu
def test_auto_layout_on_the_gpu_is_lowrank_for_idlm_tiny_ar():
    """On an H100 / H200 (50 MiB L2) the engine's default "auto" builds the "lowrank" layout for idlm-tiny-ar
    in bf16 (~32 MB a step with it, ~52 MB with "select"; float32's twice that fit with neither) and its R-ISD
    greedy tokens are AR's (`bench_risd.py exact` with this layout: 64/64 in bf16, session 39)."""
    from idlm.decoding.sampling import SamplingParams
    from idlm.engine.llm_engine import EngineConfig, LLMEngine
    from idlm.models import registry
    from idlm.models.loader import load_pretrained

    model, tok = load_pretrained("idlm-tiny-ar", dtype="bfloat16", device="cuda")
    lora = LoRAAdapter.load(registry.fetch("idlm-tiny-ar-risd-lora"), model.config, device="cuda",
                            dtype=torch.bfloat16)
    if torch.cuda.get_device_properties(0).L2_cache_size < 44 << 20:
        pytest.skip("an L2 below 44 MiB: idlm-tiny-ar's lowrank step does not fit three quarters of it")
    prompts = [tok.encode(t) for t in ("def add(a, b):", "for i in range(")]
    sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ar = LLMEngine(model, tok, EngineConfig(decoder="ar", max_num_seqs=2)).run(prompts, sp)
    eng = LLMEngine(model, tok, EngineConfig(decoder="risd", stride=4, max_num_seqs=2), lora=lora)
    assert eng.runner.lora_layout == "lowrank"
    assert [o.token_ids for o in eng.run(prompts, sp)] == [o.token_ids for o in ar]
