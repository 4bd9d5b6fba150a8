"""`cuda_fused`: the compile-or-eager wrapper of the elementwise chains. On CUDA it compiles `fn`; a failed
compilation moves on through ATTEMPTS (inductor analyses off, only the batch dim dynamic, every shape static),
then the function runs eagerly for good. Tested here with a stand-in for torch.compile and a CUDA-looking argument."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from idlm.layers import fused


class CudaLike:
    is_cuda = True

    def __init__(self, value):
        self.value = value


def _failure():
    return torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, AssertionError("tiling"), None)


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced: records each call's options and `dynamic`; `fail` = how many compiled calls
    raise; torch._dynamo.mark_static recorded in "static"."""
    state = {"options": [], "dynamic": [], "fail": 0, "compiled_calls": 0, "static": []}

    def compile_(fn, dynamic=None, options=None):
        state["options"].append(options)
        state["dynamic"].append(dynamic)

        def compiled(*args):
            state["compiled_calls"] += 1
            if state["fail"] > 0:
                state["fail"] -= 1
                raise _failure()
            return ("compiled", fn(*args))
        return compiled

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch._dynamo, "mark_static", lambda t, dim: state["static"].append((tuple(t.shape), dim)))
    monkeypatch.setattr(fused, "_FUSED", [])  # the functions made here stay out of the package's registry
    monkeypatch.delenv("IDLM_FUSE", raising=False)
    return state


def double(x):
    return x.value * 2


def test_compiles_once_and_reuses(fake_compile):
    f = fused.cuda_fused(double)
    assert f(CudaLike(3)) == ("compiled", 6) and f(CudaLike(4)) == ("compiled", 8)
    assert fake_compile["options"] == [None]


def test_a_failed_compile_is_retried_with_the_fallback_options(fake_compile, caplog):
    fake_compile["fail"] = 1
    f = fused.cuda_fused(double)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert f(CudaLike(5)) == ("compiled", 10)  # the same call succeeds on the retry
    assert fake_compile["options"] == [None, fused.known_options(fused.RETRY_OPTIONS)]
    assert fake_compile["dynamic"] == [True, True]
    assert "trying dynamic, tiling analysis off" in caplog.text and "double" in caplog.text
    assert f(CudaLike(1)) == ("compiled", 2) and len(fake_compile["options"]) == 2  # no third compile
    assert fused.compile_fallbacks() == {"double": "dynamic, tiling analysis off"}


class CudaTensor(torch.Tensor):
    """A CPU tensor that says it is on CUDA (the wrapper only compiles for CUDA arguments)."""

    @property
    def is_cuda(self):
        return True


def test_the_attempts_after_that_keep_only_the_batch_dynamic_then_none(fake_compile):
    fake_compile["fail"] = 2
    f = fused.cuda_fused(lambda x, y, z: x.sum() + y.sum() + z.sum())
    x, y, z = torch.ones(3, 4, 5).as_subclass(CudaTensor), torch.ones(3), torch.ones(3, 2)
    assert f(x, y, z)[0] == "compiled"
    assert fake_compile["dynamic"] == [True, True, True]
    # every dim but dim 0 (the batch) of every tensor argument
    assert fake_compile["static"] == [((3, 4, 5), 1), ((3, 4, 5), 2), ((3, 2), 1)]
    assert list(fused.compile_fallbacks().values()) == ["only the batch dynamic"]
    fake_compile["fail"] = 1
    assert f(x, y, z)[0] == "compiled" and fake_compile["dynamic"][-1] is False  # the static attempt


def test_the_last_attempts_turn_split_reductions_off(fake_compile):
    """Past the static attempt: the batch dynamic, then static, both with inductor's split reductions off
    (`NO_SPLIT_OPTIONS`), then eager."""
    fake_compile["fail"] = 4
    f = fused.cuda_fused(lambda x: x.sum())
    x = torch.ones(3, 4).as_subclass(CudaTensor)
    assert f(x)[0] == "compiled"
    assert fake_compile["dynamic"] == [True, True, True, False, True]
    assert fake_compile["options"][-1] == fused.known_options(fused.NO_SPLIT_OPTIONS)
    assert fake_compile["options"][-1]["split_reductions"] is False
    assert list(fused.compile_fallbacks().values()) == ["only the batch dynamic, split reductions off"]
    fake_compile["fail"] = 1
    assert f(x)[0] == "compiled" and fake_compile["dynamic"][-1] is False
    assert list(fused.compile_fallbacks().values()) == ["static, split reductions off"]


def test_retry_options_exist_in_this_torch():
    """Options this torch lacks are dropped (torch.compile refuses unknown ones); the tiling analysis is
    a setting of every torch this project supports."""
    opts = fused.known_options(fused.RETRY_OPTIONS)
    assert opts["triton.coalesce_tiling_analysis"] is False
    assert fused.known_options({"no.such_setting": 1, "triton.coalesce_tiling_analysis": False}) == {
        "triton.coalesce_tiling_analysis": False}
    assert fused.known_options(None) is None


def test_every_failure_falls_back_to_eager_for_good(fake_compile, caplog):
    fake_compile["fail"] = len(fused.ATTEMPTS)
    f = fused.cuda_fused(double)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert f(CudaLike(5)) == 10  # eager result, no "compiled" tag
    assert "runs eagerly from now on" in caplog.text
    assert fake_compile["options"][0] is None and len(fake_compile["options"]) == len(fused.ATTEMPTS)
    calls = fake_compile["compiled_calls"]
    assert f(CudaLike(6)) == 12 and fake_compile["compiled_calls"] == calls  # never tries again
    assert fused.compile_fallbacks() == {"double": "eager"}


def test_errors_of_the_function_itself_are_not_swallowed(fake_compile):
    def broken(x):
        raise KeyError("mine")
    with pytest.raises(KeyError, match="mine"):
        fused.cuda_fused(broken)(CudaLike(0))


def test_cpu_tensors_and_IDLM_FUSE_0_run_eagerly(fake_compile, monkeypatch):
    f = fused.cuda_fused(lambda x: x + 1)
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    monkeypatch.setenv("IDLM_FUSE", "0")
    assert fused.cuda_fused(double)(CudaLike(2)) == 4
    assert fake_compile["options"] == []


def test_fallen_back_names_only_functions_that_gave_up(fake_compile):
    fake_compile["fail"] = len(fused.ATTEMPTS)

    def given_up(x):
        return x.value

    def fine(x):
        return x.value

    a, b = fused.cuda_fused(given_up), fused.cuda_fused(fine)
    assert a(CudaLike(1)) == 1 and b(CudaLike(1)) == ("compiled", 1)
    names = fused.fallen_back()
    assert any(n.endswith("given_up") for n in names) and not any(n.endswith("fine") for n in names)


def test_bench_rows_report_eager_fallbacks():
    from tiny import tiny_transformer

    from idlm.bench.offline import bench_offline
    from idlm.engine.llm_engine import EngineConfig, LLMEngine

    model = tiny_transformer(64, head_dim=16)
    eng = LLMEngine(model, None, EngineConfig(decoder="ar", num_pages=64, page_size=4, max_num_seqs=2))
    row = bench_offline(eng, [[5, 6, 7]], [1], max_tokens=4, num_requests=1, warmup=False)[0]
    assert row["eager_fallbacks"] == fused.fallen_back() == []  # CPU: nothing compiled, nothing fell back
    assert row["compile_fallbacks"] == fused.compile_fallbacks() == {}


def test_a_function_can_start_at_a_later_attempt(fake_compile):
    f = fused.cuda_fused(start="only the batch dynamic")(double)
    assert f(CudaLike(2)) == ("compiled", 4)
    assert fake_compile["options"] == [fused.known_options(fused.RETRY_OPTIONS)]
    assert fused.compile_fallbacks() == {}  # where it started is not a fallback
    fake_compile["fail"] = 1
    g = fused.cuda_fused(start="only the batch dynamic")(lambda x: x.value)
    assert g(CudaLike(3)) == ("compiled", 3) and fake_compile["dynamic"][-1] is False  # next: static
    assert list(fused.compile_fallbacks().values()) == ["static"]
    with pytest.raises(ValueError, match="start must be one of"):
        fused.cuda_fused(start="fastest")


def test_batch_rows_pads_a_lone_row_and_cuts_the_outputs_back(fake_compile):
    """A decode step's function (`batch_rows=True`) is compiled for two or more contiguous rows only: a
    batch of one is padded with a copy of its row, strided views are made contiguous (dynamo guards on
    strides), and the outputs are cut back to the caller's batch."""
    seen = []

    def step(x, y, flag):
        seen.append((tuple(x.shape), x.is_contiguous(), tuple(y.shape), flag))
        return x * 2, y.sum(-1)

    f = fused.cuda_fused(batch_rows=True)(step)
    packed = torch.arange(12.0).view(2, 6)
    x1, y1 = packed[:1, :2].as_subclass(CudaTensor), packed[:1, 2:5]  # views into a packed buffer
    tag, (a, b) = f(x1, y1, True)
    assert tag == "compiled" and seen[-1] == ((2, 2), True, (2, 3), True)
    assert torch.equal(a, packed[:1, :2] * 2) and torch.equal(b, packed[:1, 2:5].sum(-1))
    x2, y2 = packed[:, :2].as_subclass(CudaTensor), packed[:, 2:5]
    tag, (a, b) = f(x2, y2, False)
    assert seen[-1] == ((2, 2), True, (2, 3), False) and a.shape == (2, 2) and b.shape == (2,)
    assert fake_compile["options"] == [None]  # one compiled function for both batches
    assert torch.equal(fused.batch_rows_of([packed[:, 1:3]])[0], packed[:, 1:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_cat_columns_equals_torch_cat(dtype):
    """`cat_columns` (a concatenation written as one expression) gives torch.cat's tensor exactly: pieces of
    widths 1..5 (one piece alone too), leading dims of any rank."""
    from idlm.layers.fused import cat_columns

    g = torch.Generator().manual_seed(0)
    for widths, lead in (([1], (3,)), ([1, 1, 3, 1, 3], (4,)), ([2, 5], (2, 3)), ([3, 1, 2], ())):
        pieces = [(torch.randn(*lead, w, generator=g) * 100).to(dtype) for w in widths]
        out = cat_columns(pieces)
        assert out.dtype == dtype and torch.equal(out, torch.cat(pieces, -1))


def test_cat_columns_rejects_mixed_dtypes_and_no_pieces():
    from idlm.layers.fused import cat_columns

    with pytest.raises(ValueError, match="one dtype"):
        cat_columns([torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.int64)])
    with pytest.raises(ValueError, match="at least one"):
        cat_columns([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a CUDA device and compiled kernels: on a GPU run with TRITON_INTERPRET=0")
@pytest.mark.parametrize("rows,T", [(1, 1), (1, 16), (5, 7)])
def test_the_compiled_step_preamble_equals_its_eager_body_on_cuda(rows, T):
    """A decode step's preamble (session 33) compiled on CUDA against the same functions eager: the embedding
    lookup with and without the MASK embedding and the paged kernel's row metadata bit for bit, RoPE's cos /
    sin within one bf16 rounding (inductor's cos / sin against ATen's)."""
    from idlm.layers.paged_attention import kernel_rows
    from idlm.layers.rotary import rope_cos_sin, rope_inv_freq
    from idlm.models.transformer import embed_masked, embed_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 1000, (rows, T), device="cuda", generator=g)
    emb = torch.randn(1000, 64, device="cuda", generator=g).bfloat16()
    mask_emb, is_mask = torch.randn(64, device="cuda", generator=g), torch.rand(rows, T, device="cuda") > 0.5
    assert torch.equal(embed_rows(ids, emb), embed_rows.__wrapped__(ids, emb))
    assert torch.equal(embed_masked(ids, emb, mask_emb, is_mask), embed_masked.__wrapped__(ids, emb, mask_emb, is_mask))
    pos = torch.randint(0, 4000, (rows, T), device="cuda", generator=g)
    inv = rope_inv_freq(64, 1e4).cuda()
    for got, want in zip(rope_cos_sin(pos, inv, torch.bfloat16), rope_cos_sin.__wrapped__(pos, inv, torch.bfloat16)):
        assert got.shape == want.shape and (got.float() - want.float()).abs().max().item() <= 2 ** -8
    starts = torch.randint(0, 500, (rows,), device="cuda", generator=g)
    slots = starts[:, None] + torch.arange(T, device="cuda")
    slots[-1, -1] = 0  # a padded query token (the trash slot): its `last` is -1
    hide = torch.randint(0, T, (rows, T, 2), device="cuda", generator=g).sort(-1).values
    for h in (None, hide):
        got, want = kernel_rows(starts, slots, 0, T, None, h), kernel_rows.__wrapped__(starts, slots, 0, T, None, h)
        assert torch.equal(got[0], want[0]) and (h is None or torch.equal(got[1], want[1]))
