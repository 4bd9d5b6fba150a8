"""The batch-invariant matmul (idlm.layers.invariant, issue 16): a row's output bits do not depend on the
other rows (added, removed, reordered), and the values match torch. Triton's interpreter on CPU."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the invariant kernels need the triton package (dev extra)")

from idlm.layers.invariant import BLOCK_M, invariant_linear  # noqa: E402


@pytest.mark.parametrize("K,N,bias", [(48, 80, False), (200, 64, True), (64, 130, False)])
def test_rows_keep_their_bits_whatever_the_batch(K, N, bias):
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    rows = torch.randn(3 * BLOCK_M + 5, K, generator=g)
    full = invariant_linear(rows, w, b)
    torch.testing.assert_close(full, torch.nn.functional.linear(rows, w, b), rtol=1e-5, atol=1e-5)
    # the same rows alone, in other batch sizes, shifted inside the tiles, and reordered: identical bits
    alone = torch.cat([invariant_linear(rows[i:i + 1], w, b) for i in (0, 7, len(rows) - 1)])
    assert torch.equal(alone, full[[0, 7, len(rows) - 1]])
    assert torch.equal(invariant_linear(rows[3:10], w, b), full[3:10])
    perm = torch.randperm(len(rows), generator=g)
    assert torch.equal(invariant_linear(rows[perm], w, b), full[perm])
    # a batch with other rows added around them
    noise = torch.randn(11, K, generator=g)
    mixed = invariant_linear(torch.cat([noise[:4], rows[:9], noise[4:]]), w, b)
    assert torch.equal(mixed[4:13], full[:9])


def test_shapes_and_errors():
    w = torch.randn(16, 32)
    x = torch.randn(2, 3, 32)
    assert invariant_linear(x, w).shape == (2, 3, 16)
    with pytest.raises(ValueError, match="features"):
        invariant_linear(torch.randn(4, 31), w)
    with pytest.raises(ValueError, match="stride"):
        invariant_linear(torch.randn(32, 4).t(), w)


def test_column_tile_depends_on_the_weight_and_device_only():
    from idlm.layers.invariant import block_n

    assert block_n(151936, 132) == 64  # an LM head: 2374 tiles of 64 columns fill 132 SMs twice over
    assert block_n(12288, 132) == 32  # 192 tiles of 64 would leave SMs idle; 384 of 32 do not
    assert block_n(4096, 132) == 16  # even 16 columns give 256 < 264 tiles: the narrowest
    assert block_n(960, 132) == 16
    assert block_n(4096, 8) == 64


@pytest.mark.parametrize("residual,pair,dual", [(False, False, False), (True, False, False), (False, True, False),
                                                (True, True, False), (True, False, True), (True, True, True)])
def test_rms_norm_matches_the_module_and_keeps_row_bits(residual, pair, dual):
    """invariant_rms_norm = RMSNorm.forward (residual add, R-ISD pair/dual forms) within float rounding, and a
    row's bits unchanged when rows are added, removed or reordered."""
    from idlm.layers.invariant import invariant_rms_norm
    from idlm.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(3)
    dim, rows = 48, 13
    norm = RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    x = torch.randn(rows, 2 * dim if dual else dim, generator=g)
    res = torch.randn(rows, dim, generator=g) if residual else None
    gate = (torch.rand(rows, generator=g) < 0.5).float() if (pair or dual) else None

    def run(idx):
        return invariant_rms_norm(x[idx], norm.weight, norm.eps, None if res is None else res[idx],
                                  None if gate is None else gate[idx], pair, dual)

    with torch.no_grad():
        want = norm(x, res, gate, pair=pair, dual=dual)
        got = run(torch.arange(rows))
    flat = lambda o: torch.cat(o, -1) if isinstance(o, tuple) else o  # noqa: E731
    torch.testing.assert_close(flat(got), flat(want), rtol=1e-5, atol=1e-5)
    for idx in (torch.tensor([4]), torch.tensor([9, 4, 0]), torch.randperm(rows, generator=g)):
        assert torch.equal(flat(run(idx)), flat(got)[idx])
    with pytest.raises(ValueError, match="width"):
        invariant_rms_norm(torch.randn(2, dim + 1), norm.weight, 1e-6)


# --- the fixed split-K path (K cut into S ranges, float32 partials summed in the order s = 0..S-1) ---


def _rows_keep_bits(f, rows, g):
    """f's output rows for 64 rows, checked against batches of 1, 7, 33 and 64 rows that hold the same rows
    at other positions, reordered, and among other rows: identical bits. Returns the 64-row output."""
    full = f(rows)
    K = rows.shape[1]
    assert torch.equal(f(rows[5:6]), full[5:6])  # M = 1
    assert torch.equal(f(rows[9:16]), full[9:16])  # M = 7, shifted inside the tile
    noise = torch.randn(33 - 20, K, generator=g, dtype=rows.dtype)
    mixed = f(torch.cat([noise[:6], rows[40:60], noise[6:]]))  # M = 33: two row tiles, other rows around
    assert torch.equal(mixed[6:26], full[40:60])
    perm = torch.randperm(len(rows), generator=g)
    assert torch.equal(f(rows[perm]), full[perm])  # M = 64, reordered
    return full


@pytest.mark.parametrize("K,N,bias,splits", [(256, 48, True, None), (512, 48, False, None), (600, 40, True, 3),
                                             (640, 48, True, 3), (256, 48, False, 16)])
def test_split_k_matches_torch_and_keeps_row_bits(K, N, bias, splits, monkeypatch):
    import idlm.layers.invariant as inv
    from idlm.layers.invariant import k_partition, split_k

    monkeypatch.setattr(inv, "MIN_SPLIT_ELEMENTS", 0)  # the automatic choice splits these small weights too
    S = k_partition(K, split_k(N, K, 132) if splits is None else splits)[0]
    assert S > 1  # these shapes take the split path (the interpreter's device counts 132 SMs)
    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    rows = torch.randn(64, K, generator=g)
    f = lambda x: invariant_linear(x, w, b, splits=splits)  # noqa: E731
    full = _rows_keep_bits(f, rows, g)
    torch.testing.assert_close(full, torch.nn.functional.linear(rows, w, b), rtol=1e-5, atol=1e-5)
    # a row's value with splits is a float32 sum in another order than without: close, not necessarily equal
    torch.testing.assert_close(full, invariant_linear(rows, w, b, splits=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_k_half_precision_keeps_row_bits(dtype):
    """16-bit operands (the serving case): float32 partials, one cast at the end. Values checked in float16
    only: the interpreter's tl.dot multiplies bfloat16's uint16 storage as integers (its values are garbage
    on CPU, deterministically so, which still tests the row bits)."""
    g = torch.Generator().manual_seed(5)
    K, N = 512, 48
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    rows = torch.randn(64, K, generator=g).to(dtype)
    full = _rows_keep_bits(lambda x: invariant_linear(x, w, b, splits=4), rows, g)
    assert full.dtype == dtype
    if dtype == torch.float16:
        want = torch.nn.functional.linear(rows.float(), w.float(), b.float())
        torch.testing.assert_close(full.float(), want, rtol=1e-2, atol=1e-2)


def test_split_k_row_slabs_do_not_change_bits(monkeypatch):
    """Large M runs in row slabs (a bounded partial buffer): the rows' bits are those of one launch."""
    import idlm.layers.invariant as inv

    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 256, generator=g)
    b = torch.randn(48, generator=g)
    rows = torch.randn(100, 256, generator=g)
    whole = invariant_linear(rows, w, b, splits=2)
    monkeypatch.setattr(inv, "PARTIAL_ELEMENTS", 2 * 48 * BLOCK_M)  # one row tile per slab: 4 slabs
    assert torch.equal(invariant_linear(rows, w, b, splits=2), whole)


def test_split_choice_depends_on_the_weight_and_device_only():
    import inspect

    from idlm.layers.invariant import split_k

    assert list(inspect.signature(split_k).parameters) == ["n", "k", "sm_count"]  # no row count to depend on
    # Qwen3-8B on an H200 (132 SMs): qkv, o_proj, gate/up, down, LM head
    assert split_k(6144, 4096, 132) == 2  # 384 column tiles of 16 -> 768 programs
    assert split_k(4096, 4096, 132) == 4  # 256 -> 1024
    assert split_k(24576, 4096, 132) == 2  # 384 tiles of 64 -> 768
    assert split_k(4096, 12288, 132) == 4
    assert split_k(151936, 4096, 132) == 1  # 2374 tiles already fill the SMs: one kernel, no partials
    assert split_k(960, 576, 132) == 1  # SmolLM2's q/k/v: too small to gain from a second kernel
    assert split_k(4096, 1024, 132) == 1  # below MIN_SPLIT_ELEMENTS
    assert split_k(48, 1 << 16, 132) == 1  # 3.1 M elements: below the floor however few its tiles


def test_split_choice_rule_without_the_size_floor(monkeypatch):
    import idlm.layers.invariant as inv
    from idlm.layers.invariant import BLOCK_K, MAX_SPLITS, PROGRAMS_PER_SM, block_n, k_partition, split_k

    monkeypatch.setattr(inv, "MIN_SPLIT_ELEMENTS", 0)
    assert split_k(960, 64, 132) == 1  # a single BLOCK_K chunk cannot be split
    assert split_k(48, 1 << 16, 132) == MAX_SPLITS  # capped
    for n in (48, 960, 4096, 6144, 24576, 151936):
        for k in (64, 256, 600, 4096, 12288):
            for sm in (8, 78, 132):
                s = split_k(n, k, sm)
                chunks = -(-k // BLOCK_K)
                tiles = -(-n // block_n(n, sm))
                assert 1 <= s <= min(MAX_SPLITS, chunks)
                assert k_partition(k, s)[0] == s  # S ranges of whole chunks, none empty
                if tiles >= PROGRAMS_PER_SM * sm:
                    assert s == 1  # enough programs already: the single-kernel path
                if chunks % MAX_SPLITS == 0:  # K of whole 16-chunk multiples: a power of two, enough or capped
                    assert s & (s - 1) == 0
                    assert tiles * s >= PROGRAMS_PER_SM * sm or s == MAX_SPLITS
    # k_partition: whole chunks, equal ranges but the last, none empty, all of K covered
    for k in (1, 64, 128, 129, 600, 640, 4096, 12288):
        for want in (1, 2, 3, 4, 7, 16, 100):
            s, per = k_partition(k, want)
            chunks = -(-k // BLOCK_K)
            assert 1 <= s <= min(want, chunks)
            assert (s - 1) * per < chunks <= s * per
    assert k_partition(4096, 4) == (4, 8)
    assert k_partition(640, 3) == (3, 2)  # 5 chunks: 2 + 2 + 1
    assert k_partition(512, 3) == (2, 2)  # 4 chunks in ranges of 2: two splits, no empty third
    with pytest.raises(ValueError, match="splits"):
        k_partition(256, 0)


def test_bias_shape_is_checked():
    with pytest.raises(ValueError, match="bias"):
        invariant_linear(torch.randn(2, 32), torch.randn(16, 32), torch.randn(15))
