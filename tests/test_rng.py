"""The counter-based generator (`idlm.decoding.rng`): Philox4x32-10 against the reference implementation's
known-answer vectors, row independence from the batch, and the uniforms' distribution."""

from __future__ import annotations

import math

import pytest
import torch

from idlm.decoding.rng import MASK32, exponentials, philox4x32, seed_keys, uniforms

# Random123's kat_vectors for philox4x32 with 10 rounds: (counter, key) -> output
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    assert tuple(int(w) for w in philox4x32(*counter, *key)) == want


def test_philox_vectorised_equals_scalar():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2**32, (4, 64), generator=g, dtype=torch.int64)
    k = torch.randint(0, 2**32, (2, 64), generator=g, dtype=torch.int64)
    batch = torch.stack(philox4x32(*c, *k))
    for j in range(0, 64, 7):
        one = [int(w) for w in philox4x32(*(int(x) for x in c[:, j]), *(int(x) for x in k[:, j]))]
        assert batch[:, j].tolist() == one


def test_rows_do_not_depend_on_the_batch():
    keys = seed_keys([7, 2**64 - 1, -3, 123456789012345])
    draw = torch.tensor([0, 5, 2**33 + 1, 9])
    full = uniforms(keys, draw, 0, 1001)
    assert full.shape == (4, 1001) and full.dtype == torch.float32
    for b in range(4):
        assert torch.equal(uniforms(keys[b: b + 1], draw[b: b + 1], 0, 1001)[0], full[b])
        assert torch.equal(uniforms(keys[b: b + 1], draw[b: b + 1], 0, 10)[0], full[b, :10])  # prefix-stable
    assert torch.equal(seed_keys([-3]), seed_keys([2**64 - 3]))  # seeds are taken mod 2^64
    # another stream, draw or seed gives other numbers
    assert not torch.equal(uniforms(keys, draw, 1, 1001), full)
    assert not torch.equal(uniforms(keys, draw + 1, 0, 1001), full)
    assert not torch.equal(uniforms(seed_keys([8, 2**64 - 1, -3, 1]), draw, 0, 1001)[0], full[0])


def test_uniforms_are_uniform_and_exponentials_exponential():
    u = uniforms(seed_keys(list(range(8))), torch.arange(8), 0, 50_000).flatten()
    assert 0 < u.min() and u.max() < 1
    n, bins = u.numel(), 64
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = ((counts - n / bins) ** 2 / (n / bins)).sum().item()
    p = torch.special.gammaincc(torch.tensor((bins - 1) / 2, dtype=torch.float64), torch.tensor(chi2 / 2)).item()
    assert p > 1e-4, (chi2, p)
    # neighbours are not correlated
    corr = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()
    assert abs(corr) < 4 / math.sqrt(n)
    e = exponentials(seed_keys([3]), torch.tensor([1]), 0, 200_000)
    assert abs(e.mean().item() - 1) < 0.01 and abs(e.var().item() - 1) < 0.03
