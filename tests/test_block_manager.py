"""Paged KV block manager: slot mapping, rollback, prefix caching, failure handling, stress."""

from __future__ import annotations

import copy
import random

import pytest

from idlm.engine import AllocationError, PageManager, PageManagerError
from idlm.errors import ConfigError

JUNK = -1  # what a MASK / rejected slot writes into the KV


def _state(bm: PageManager):
    return copy.deepcopy((list(bm._free), bm._blocks, bm._hash_to_block, bm._seqs))


def _owners(bm: PageManager) -> list[int]:
    owners = [0] * bm.num_pages
    for seq in bm._seqs.values():
        for bid in seq.block_ids:
            owners[bid] += 1
    return owners


def _check(bm: PageManager) -> None:
    bm.check_invariants()
    owners = _owners(bm)
    used = {bid for bid, n in enumerate(owners) if n}
    assert used.isdisjoint(bm._free)
    assert len(used) + bm.num_free_pages == bm.num_pages
    assert [b.ref_count for b in bm._blocks] == owners


class KV:
    """Brute-force model of the physical KV tensor: one token id per slot."""

    def __init__(self, bm: PageManager):
        self.bm = bm
        self.mem = [None] * (bm.num_pages * bm.page_size)

    def write(self, seq_id, start: int, values: list[int]) -> None:
        for slot, v in zip(self.bm.slots(seq_id, start, len(values)), values, strict=True):
            self.mem[slot] = v

    def read(self, seq_id, n: int) -> list[int]:
        return [self.mem[s] for s in self.bm.slots(seq_id, 0, n)]


def _prefill(bm: PageManager, kv: KV, seq_id, prompt: list[int]) -> int:
    hit = bm.allocate(seq_id, prompt)
    kv.write(seq_id, hit, prompt[hit:])
    bm.commit(seq_id, len(prompt), prompt[hit:])
    return hit


def _isd_step(bm: PageManager, kv: KV, rng: random.Random, seq_id, committed: list[int], n: int) -> bool:
    """One ISD forward: write 2N−1 slots, keep 1..N of them. False if the pool is full."""
    if not bm.reserve(seq_id, 2 * n - 1):
        return False
    p = bm.length(seq_id)
    advance = rng.randint(1, n)
    new = [rng.randrange(50) for _ in range(advance)]
    kv.write(seq_id, p, new + [JUNK] * (2 * n - 1 - advance))
    bm.commit(seq_id, p + advance, new)
    committed.extend(new)
    return True


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_pages": 0, "page_size": 4}, "num_pages"),
        ({"num_pages": 4, "page_size": 0}, "page_size"),
        ({"num_pages": 2.5, "page_size": 4}, "num_pages"),
        ({"num_pages": 4, "page_size": True}, "page_size"),
    ],
)
def test_config_validation(kwargs, name):
    with pytest.raises(ConfigError, match=name):
        PageManager(**kwargs)


def test_slot_mapping_matches_brute_force():
    bs = 4
    bm = PageManager(num_pages=16, page_size=bs)
    lengths = {"a": 5, "b": 8, "c": 1, "d": 0}
    for sid, n in lengths.items():
        assert bm.allocate(sid, list(range(100 * ord(sid), 100 * ord(sid) + n))) == 0
        assert bm.length(sid) == 0
        assert len(bm.block_table(sid)) == -(-n // bs)
    assert bm.reserve("a", 7)  # relative to the committed length 0: still 2 pages
    assert len(bm.block_table("a")) == 2
    assert bm.reserve("a", 12)  # capacity 12 -> 3 pages
    assert len(bm.block_table("a")) == 3
    all_slots = []
    for sid in lengths:
        table = bm.block_table(sid)
        cap = bm.capacity(sid)
        assert cap == len(table) * bs
        slots = bm.slots(sid, 0, cap)
        assert slots == [table[p // bs] * bs + p % bs for p in range(cap)]
        if cap >= 2:
            assert bm.slots(sid, 1, cap - 2) == slots[1:cap - 1]
        all_slots += slots
    assert len(all_slots) == len(set(all_slots)), "two requests share a private slot"
    assert bm.num_free_pages == 16 - len(all_slots) // bs
    with pytest.raises(PageManagerError, match="reserve"):
        bm.slots("c", 0, bs + 1)
    _check(bm)


def test_rollback_frees_exactly_pages_past_new_length():
    bs = 4
    bm = PageManager(num_pages=10, page_size=bs)
    kv = KV(bm)
    _prefill(bm, kv, "r", [1, 2, 3, 4, 5, 6])  # 2 pages, length 6
    assert bm.reserve("r", 13)  # up to position 18 -> 5 pages
    table = bm.block_table("r")
    assert len(table) == 5 and bm.num_free_pages == 5
    bm.commit("r", 9, [7, 8, 9])  # keep ceil(9/4) = 3 pages
    assert bm.block_table("r") == table[:3]
    assert bm.num_free_pages == 7
    assert set(table[3:]) <= set(bm._free)
    bm.commit("r", 9, [])  # no-op rollback of nothing
    assert bm.block_table("r") == table[:3]
    assert bm.reserve("r", 3)  # 12 fits in 3 pages
    assert bm.block_table("r") == table[:3]
    bm.commit("r", 12, [10, 11, 12])
    assert bm.reserve("r", 1)
    assert len(bm.block_table("r")) == 4
    bm.commit("r", 12, [])  # the page for position 12 is discarded again
    assert bm.block_table("r") == table[:3] and bm.num_free_pages == 7
    with pytest.raises(PageManagerError, match="committed"):
        bm.commit("r", 11, [])  # never shrinks below the committed length
    with pytest.raises(PageManagerError, match="capacity"):
        bm.commit("r", 13, [13])
    with pytest.raises(PageManagerError, match="new token ids"):
        bm.reserve("r", 2) and bm.commit("r", 14, [1])
    _check(bm)
    bm.free("r")
    assert bm.num_free_pages == 10
    _check(bm)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_isd_loop_keeps_invariants_and_kv_contents(n):
    rng = random.Random(n)
    bs = 8
    bm = PageManager(num_pages=64, page_size=bs)
    kv = KV(bm)
    seqs = {}
    for i in range(6):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, 30))]
        _prefill(bm, kv, i, prompt)
        seqs[i] = list(prompt)
    for _ in range(200):
        i = rng.choice(list(seqs))
        if not _isd_step(bm, kv, rng, i, seqs[i], n):
            bm.free(i)
            del seqs[i]
            if not seqs:
                break
            continue
        assert bm.length(i) == len(seqs[i])
        assert len(bm.block_table(i)) == -(-len(seqs[i]) // bs)  # reserved tail rolled back
        assert kv.read(i, len(seqs[i])) == seqs[i]
        _check(bm)
    for i in seqs:
        assert kv.read(i, len(seqs[i])) == seqs[i]
        bm.free(i)
    assert bm.num_free_pages == bm.num_pages
    _check(bm)


def test_prefix_caching_shares_full_pages():
    bs = 8
    bm = PageManager(num_pages=32, page_size=bs)
    kv = KV(bm)
    prompt = list(range(1, 38))  # 37 tokens: 4 full pages + 5
    assert _prefill(bm, kv, "a", prompt) == 0
    hit = bm.allocate("b", prompt)
    assert hit == (len(prompt) // bs) * bs == 32
    assert bm.length("b") == 32
    assert bm.block_table("b")[:4] == bm.block_table("a")[:4]
    assert bm.block_table("b")[4] != bm.block_table("a")[4]  # partial page is private
    for bid in bm.block_table("a")[:4]:
        assert bm._blocks[bid].ref_count == 2
    kv.write("b", hit, prompt[hit:])
    bm.commit("b", len(prompt), prompt[hit:])
    assert kv.read("b", len(prompt)) == prompt
    _check(bm)
    # A different prompt gets nothing; one sharing two leading pages gets exactly those.
    assert bm.allocate("c", [p + 1000 for p in prompt]) == 0
    assert bm.allocate("d", prompt[:16] + [999] * 20) == 16
    assert bm.block_table("d")[:2] == bm.block_table("a")[:2]
    assert bm._blocks[bm.block_table("a")[0]].ref_count == 3
    assert bm._blocks[bm.block_table("a")[2]].ref_count == 2
    _check(bm)
    # Decoding on top of a shared prefix never writes into a shared page.
    rng = random.Random(0)
    committed = list(prompt)
    for _ in range(20):
        assert _isd_step(bm, kv, rng, "b", committed, 4)
    assert kv.read("b", len(committed)) == committed
    assert kv.read("a", len(prompt)) == prompt
    _check(bm)
    for sid in "abcd":
        bm.free(sid)
    assert bm.num_free_pages == bm.num_pages
    assert all(b.ref_count == 0 for b in bm._blocks)
    _check(bm)


@pytest.mark.parametrize("length, expected", [(1, 0), (8, 0), (9, 8), (16, 8), (17, 16), (40, 32)])
def test_prefix_hit_leaves_last_token_to_compute(length, expected):
    bm = PageManager(num_pages=16, page_size=8)
    kv = KV(bm)
    prompt = list(range(length))
    _prefill(bm, kv, "a", prompt)
    hit = bm.allocate("b", prompt)
    assert hit == expected <= length - 1
    kv.write("b", hit, prompt[hit:])  # the slots() write-safety assertion holds
    _check(bm)


def test_freed_cached_pages_are_revived_and_later_evicted():
    bs = 4
    bm = PageManager(num_pages=6, page_size=bs)
    kv = KV(bm)
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages + 1
    _prefill(bm, kv, "a", prompt)
    cached = bm.block_table("a")[:3]
    bm.free("a")
    assert bm.num_free_pages == 6
    # Unhashed pages are reused first, so a small request does not evict the cached prefix.
    _prefill(bm, kv, "x", [1, 2, 3])
    assert not set(bm.block_table("x")) & set(cached)
    bm.free("x")
    assert bm.allocate("b", prompt) == 12
    assert bm.block_table("b")[:3] == cached
    assert bm.num_free_pages == 2
    _check(bm)
    kv.write("b", 12, prompt[12:])
    bm.commit("b", 13, prompt[12:])
    assert kv.read("b", 13) == prompt
    bm.free("b")
    # Filling the pool with other content evicts the cached pages.
    _prefill(bm, kv, "y", list(range(500, 524)))
    bm.free("y")
    assert bm.allocate("c", prompt) == 0
    bm.free("c")
    assert bm.num_free_pages == 6
    _check(bm)


def test_prefix_caching_disabled():
    bm = PageManager(num_pages=16, page_size=4, enable_prefix_caching=False)
    kv = KV(bm)
    prompt = list(range(20))
    _prefill(bm, kv, "a", prompt)
    assert bm.allocate("b", prompt) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    assert not bm._hash_to_block
    _check(bm)


def test_allocation_failure_leaves_state_unchanged():
    bs = 4
    bm = PageManager(num_pages=5, page_size=bs)
    kv = KV(bm)
    _prefill(bm, kv, "a", list(range(9)))  # 3 pages
    before = _state(bm)
    assert not bm.can_allocate(9)
    with pytest.raises(AllocationError, match="free KV pages"):
        bm.allocate("b", list(range(100, 109)))
    assert _state(bm) == before
    assert "b" not in bm
    assert not bm.can_reserve("a", 12)
    assert not bm.reserve("a", 12)  # length 9 + 12 needs 6 pages: 3 more, 2 free
    assert _state(bm) == before
    # Even with a prefix hit, a request that cannot get its remaining pages is refused cleanly.
    with pytest.raises(AllocationError):
        bm.allocate("c", list(range(9)) + list(range(100, 112)))
    assert _state(bm) == before
    assert bm.can_reserve("a", 11) and bm.reserve("a", 11)
    assert bm.num_free_pages == 0
    with pytest.raises(AllocationError):
        bm.allocate("d", [1])
    _check(bm)


def test_misuse_is_reported():
    bm = PageManager(num_pages=4, page_size=4)
    bm.allocate("a", [1, 2])
    with pytest.raises(PageManagerError, match="already allocated"):
        bm.allocate("a", [1])
    for call in (lambda: bm.free("zz"), lambda: bm.length("zz"), lambda: bm.reserve("zz", 1)):
        with pytest.raises(PageManagerError, match="unknown request"):
            call()
    with pytest.raises(PageManagerError, match=">= 0"):
        bm.reserve("a", -1)
    _check(bm)


def test_stress_random_requests_aborts_and_isd_commits():
    rng = random.Random(1234)
    bs = 16
    bm = PageManager(num_pages=96, page_size=bs)
    kv = KV(bm)
    prefixes = [[rng.randrange(50) for _ in range(rng.randint(16, 64))] for _ in range(5)]
    live: dict[int, tuple[list[int], int, int]] = {}  # id -> (tokens, N, remaining steps)
    next_id = started = 0
    hits = 0
    steps = 0
    while started < 1000 or live:
        if started < 1000 and (len(live) < 12 or rng.random() < 0.2):
            tail = [rng.randrange(50) for _ in range(rng.randint(1, 40))]
            prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + tail
            if bm.can_allocate(len(prompt)):
                hits += _prefill(bm, kv, next_id, prompt) > 0
                live[next_id] = (list(prompt), rng.choice([1, 2, 4]), rng.randint(0, 30))
                next_id += 1
                started += 1
            elif not live:
                pytest.fail("pool too small for a single request")
        if not live:
            continue
        sid = rng.choice(list(live))
        tokens, n, remaining = live[sid]
        if remaining == 0 or rng.random() < 0.03:  # finished or aborted mid-way
            assert kv.read(sid, len(tokens)) == tokens
            bm.free(sid)
            del live[sid]
        elif _isd_step(bm, kv, rng, sid, tokens, n):
            live[sid] = (tokens, n, remaining - 1)
        else:  # out of pages: preempt (abort) the request
            bm.free(sid)
            del live[sid]
        steps += 1
        if steps % 50 == 0:
            _check(bm)
    assert hits > 100, "prefix caching never kicked in"
    assert bm.num_free_pages == bm.num_pages
    assert all(b.ref_count == 0 for b in bm._blocks)
    assert not bm._seqs
    _check(bm)
