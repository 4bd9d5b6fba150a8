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
