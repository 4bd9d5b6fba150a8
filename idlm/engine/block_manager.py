"""Paged KV-cache bookkeeping for the serving engine (SPEC §4.4, §8): pure Python and numpy, no tensors.

Why each piece exists
---------------------
* **Fixed-size pages in one pool.** The KV cache is one preallocated tensor of `num_pages * page_size`
  slots; a request owns a list of page ids (its *block table*), so requests of any length share the pool
  without fragmentation and the attention kernel finds token `p` of a request at physical slot
  `block_table[p // page_size] * page_size + p % page_size` (`slots`).
* **Committed length vs reserved capacity.** An ISD decode step writes 2N−1 query tokens at positions
  P..P+2N−2 but keeps only `advance` (1..N) of them (SPEC §4.4: MASK and rejected slots are dropped).
  `reserve` makes room for the writes before the forward; `commit(new_length)` afterwards keeps
  exactly `new_length` tokens and returns every page wholly past it to the pool (rollback by length).
  The KV past `new_length` in the last kept page is simply overwritten by the next step. So the cache
  only ever holds committed tokens, which is what makes prefix caching sound (SPEC §8).
* **Reference counts.** A full page of committed tokens can be shared by several requests with the
  same prefix; it returns to the free list only when its last owner lets go.
* **Prefix caching with chained hashes.** When a page fills with committed tokens it is registered
  under `hash((hash of the previous page, tuple(page tokens)))`, so a hash names the page *and the whole
  prefix before it*. `allocate` walks a new prompt page by page and reuses every leading page whose
  chained hash (and stored token ids, guarding against collisions) matches; it returns how many prompt
  tokens already have KV. The hit never covers the last prompt token (at least one token must be run
  to get logits), and because a request must never write into a shared page the hit is
  `page_size * floor((len − 1) / page_size)`: whole pages that lie strictly before the last token.
  `allocate(..., max_hit=n)` caps the hit at n tokens (a request that wants prompt logprobs needs the
  logits of its prompt positions, so it must compute them).
* **Freed pages keep their hash.** A page whose ref count drops to 0 goes back on the free list but
  stays in the hash table, so a later request with the same prefix can revive it; only when the page is
  handed out for new content is its hash dropped. The free list is FIFO (oldest freed reused first),
  pages without a hash are reused before cached ones, and a request's pages are released tail first,
  so the most shareable (leading) pages survive longest.
* **Allocation failure is a result, not a crash.** `can_allocate`/`can_reserve` answer up front;
  `reserve` returns False and `allocate` raises `AllocationError` having changed nothing: every
  operation plans first and mutates only once it knows it can finish.
* **Write-safety invariant.** Writes happen only at positions >= the committed length; pages there are
  private (ref 1) and unhashed, because only full committed pages are ever hashed or shared. `slots`
  asserts this for the pages it maps past the committed length; `check_invariants` verifies the whole
  state (used in tests).
* **Host block tables, kept up to date.** Every request also owns a row of one int64 array that mirrors
  its block table (zero past its end), updated by the operations that change its pages. A decode step
  then gets the tables and slots of its whole batch with a few array operations (`decode_mapping`)
  instead of rebuilding every request's table from its list of pages each step. (Decode rows write only
  at or past the committed length, into pages `reserve` just took or the private partial page, so the
  write-safety invariant holds there by construction; `check_invariants` checks it and the mirror.)
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from idlm.errors import ConfigError, IdlmError

__all__ = ["AllocationError", "BlockManager", "BlockManagerError", "PageManager", "PageManagerError", "SeqBlocks"]

_ROOT_HASH = -1  # the "previous page hash" of a sequence's first page


class PageManagerError(IdlmError):
    """Misuse of the page manager: unknown or duplicate request id, out-of-range length."""


# the old name, kept for one release
BlockManagerError = PageManagerError


class AllocationError(PageManagerError):
    """The pool has too few free pages; nothing was allocated."""


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set only while the page holds a full page of committed tokens
    token_ids: tuple[int, ...] = ()  # the page's tokens when hashed (collision check)


@dataclass
class SeqBlocks:
    """Per-request state: its pages, how many tokens of KV are kept, and what hashing needs."""

    seq_id: object
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # committed length: KV of positions 0..num_tokens-1 is valid and kept
    partial_tokens: list[int] = field(default_factory=list)  # committed tokens of the last, non-full page
    last_hash: int = _ROOT_HASH  # chained hash of the last full committed page
    row: int = -1  # its row of the host block tables (PageManager._tables)


class PageManager:
    """A paged KV pool of `num_pages` pages of `page_size` slots, with optional prefix caching."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
            raise ConfigError(f"num_pages must be a positive integer, got {num_pages!r}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ConfigError(f"page_size must be a positive integer, got {page_size!r}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._blocks = [_Block(i) for i in range(num_pages)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_pages))  # front = reused first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[object, SeqBlocks] = {}
        # host block tables: row r mirrors the block_ids of the request holding it, padded with page 0
        self._tables = np.zeros((0, 16), dtype=np.int64)
        self._free_rows: list[int] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, n_tokens: int) -> int:
        return -(-max(n_tokens, 0) // self.page_size)

    # the old names, kept for one release
    @property
    def num_blocks(self) -> int:
        return self.num_pages

    @property
    def block_size(self) -> int:
        return self.page_size

    @property
    def num_free_blocks(self) -> int:
        return self.num_free_pages

    def blocks_needed(self, n_tokens: int) -> int:
        return self.pages_needed(n_tokens)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).block_ids)

    def length(self, seq_id) -> int:
        """Committed length: number of leading positions whose KV is kept."""
        return self._seq(seq_id).num_tokens

    def capacity(self, seq_id) -> int:
        """Number of positions the request's pages can hold (committed + reserved)."""
        return len(self._seq(seq_id).block_ids) * self.page_size

    def can_allocate(self, n_tokens: int) -> bool:
        """Whether a prompt of `n_tokens` can be admitted even with no prefix hit (a safe upper bound)."""
        return self.pages_needed(n_tokens) <= len(self._free)

    def can_reserve(self, seq_id, n_new_tokens: int) -> bool:
        return self._pages_to_reserve(self._seq(seq_id), n_new_tokens) <= len(self._free)

    def slots(self, seq_id, start: int, n: int) -> list[int]:
        """Physical slot ids of positions start..start+n-1 (the model runner's slot mapping)."""
        seq = self._seq(seq_id)
        if start < 0 or n < 0 or start + n > len(seq.block_ids) * self.page_size:
            raise PageManagerError(
                f"positions {start}..{start + n - 1} of request {seq_id!r} are outside its "
                f"{len(seq.block_ids) * self.page_size} reserved slots; call reserve() first"
            )
        bs = self.page_size
        out = [seq.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]
        # Write safety: every page covering a position at or past the committed length is private.
        for idx in range(max(start, seq.num_tokens) // bs, self.pages_needed(start + n)):
            block = self._blocks[seq.block_ids[idx]]
            assert block.ref_count == 1 and block.hash is None, f"page {block.block_id} is shared or cached"
        return out

    def decode_mapping(self, seq_ids: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A decode step's mapping for requests that each write `n` slots right after their committed
        length (room made by `reserve`): (starts [B], slots [B, n], block tables [B, M]) int64 arrays,
        row b = seq_ids[b], M = the most pages any of them holds. Equals `length`, `slots(id, length, n)`
        and `block_table` (zero-padded) per request, computed for the whole batch at once."""
        seqs = [self._seq(s) for s in seq_ids]
        B, bs = len(seqs), self.page_size
        rows = np.fromiter((s.row for s in seqs), np.int64, B)
        starts = np.fromiter((s.num_tokens for s in seqs), np.int64, B)
        pages = np.fromiter((len(s.block_ids) for s in seqs), np.int64, B)
        outside = starts + n > pages * bs
        if outside.any():
            b = int(outside.argmax())
            raise PageManagerError(
                f"positions {starts[b]}..{starts[b] + n - 1} of request {seq_ids[b]!r} are outside its "
                f"{pages[b] * bs} reserved slots; call reserve() first")
        tables = self._tables[rows, : pages.max(initial=0)]
        pos = starts[:, None] + np.arange(n)
        # (plain fancy indexing: np.take_along_axis's index building cost more than the gather at small B)
        slots = tables[np.arange(B)[:, None], pos // bs] * bs + pos % bs
        return starts, slots, tables

    def table_rows(self, seq_ids: list) -> np.ndarray:
        """[B, M] int64 the requests' block tables (zero-padded; M = the most pages any of them holds): the
        tables of `decode_mapping`, without the slots."""
        rows = np.fromiter((self._seq(s).row for s in seq_ids), np.int64, len(seq_ids))
        pages = max((len(self._seq(s).block_ids) for s in seq_ids), default=0)
        return self._tables[rows, :pages]

    # ------------------------------------------------------------------ mutations

    def allocate(self, seq_id, token_ids, max_hit: int | None = None) -> int:
        """Admit a prompt: reuse cached leading pages (at most `max_hit` tokens of them, if given), take
        fresh pages for the rest.

        Afterwards `length(seq_id)` is the prefix hit (the returned count of prompt tokens whose KV is
        already cached) and the pages cover the whole prompt; run the forward on positions
        hit..len-1 and then `commit(seq_id, len(token_ids), token_ids[hit:])`.
        Raises AllocationError (state unchanged) when the pool is too small.
        """
        if seq_id in self._seqs:
            raise PageManagerError(f"request {seq_id!r} is already allocated")
        tokens = list(token_ids)
        bs = self.page_size
        hit_blocks: list[int] = []
        last_hash = _ROOT_HASH
        if self.enable_prefix_caching:
            pages = max(len(tokens) - 1, 0) // bs
            if max_hit is not None:
                pages = min(pages, max(max_hit, 0) // bs)
            for i in range(pages):
                page = tuple(tokens[i * bs:(i + 1) * bs])
                h = hash((last_hash, page))
                bid = self._hash_to_block.get(h)
                if bid is None or self._blocks[bid].token_ids != page:
                    break
                hit_blocks.append(bid)
                last_hash = h
        n_new = self.pages_needed(len(tokens)) - len(hit_blocks)
        revived = sum(1 for bid in hit_blocks if self._blocks[bid].ref_count == 0)
        if n_new + revived > len(self._free):
            raise AllocationError(
                f"cannot admit request {seq_id!r}: needs {n_new + revived} free KV pages, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        for bid in hit_blocks:
            block = self._blocks[bid]
            if block.ref_count == 0:
                del self._free[bid]
            block.ref_count += 1
        seq = SeqBlocks(seq_id, block_ids=hit_blocks + [self._take_free() for _ in range(n_new)])
        seq.num_tokens = len(hit_blocks) * bs
        seq.last_hash = last_hash
        seq.row = self._take_row()
        self._sync_table(seq, 0, 0)
        self._seqs[seq_id] = seq
        return seq.num_tokens

    def reserve(self, seq_id, n_new_tokens: int) -> bool:
        """Make room to write `n_new_tokens` slots after the committed length (ISD: 2N−1 per step).

        Returns False, allocating nothing, if the pool cannot supply the pages.
        """
        if n_new_tokens < 0:
            raise PageManagerError(f"n_new_tokens must be >= 0, got {n_new_tokens}")
        seq = self._seq(seq_id)
        need = self._pages_to_reserve(seq, n_new_tokens)
        if need == 0:  # the usual decode step: its pages already have room
            return True
        if need > len(self._free):
            return False
        old = len(seq.block_ids)
        seq.block_ids.extend(self._take_free() for _ in range(need))
        self._sync_table(seq, old, old)
        return True

    def commit(self, seq_id, new_length: int, token_ids, release: bool = True) -> None:
        """Keep exactly `new_length` tokens of KV; discard the rest (rollback by length).

        `token_ids` are the newly committed tokens, positions length(seq_id)..new_length-1. Pages wholly
        past `new_length` go back to the pool (unless release=False: a chunked prefill keeps the pages
        of the rest of its prompt); pages that became full of committed tokens are registered in the
        prefix cache. The committed length never shrinks.
        """
        seq = self._seq(seq_id)
        new_tokens = list(token_ids)
        capacity = len(seq.block_ids) * self.page_size
        if not seq.num_tokens <= new_length <= capacity:
            raise PageManagerError(
                f"commit length {new_length} for request {seq_id!r} must lie between its committed "
                f"length {seq.num_tokens} and its reserved capacity {capacity}"
            )
        if len(new_tokens) != new_length - seq.num_tokens:
            raise PageManagerError(
                f"commit of request {seq_id!r} to length {new_length} needs {new_length - seq.num_tokens} "
                f"new token ids, got {len(new_tokens)}"
            )
        bs = self.page_size
        if self.enable_prefix_caching:
            pos = seq.num_tokens
            for tok in new_tokens:
                seq.partial_tokens.append(tok)
                pos += 1
                if pos % bs == 0:
                    self._register(seq, pos // bs - 1)
        seq.num_tokens = new_length
        if not release:
            return
        keep = -(-new_length // bs)  # pages holding committed tokens
        if len(seq.block_ids) == keep:  # nothing past new_length (the usual AR step)
            return
        dropped = seq.block_ids[keep:]
        del seq.block_ids[keep:]
        self._sync_table(seq, keep, keep + len(dropped))
        for bid in reversed(dropped):
            self._release(bid)

    def free(self, seq_id) -> None:
        """Release all of a finished or aborted request's pages (cached ones stay revivable)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise PageManagerError(f"unknown request {seq_id!r}")
        self._tables[seq.row, : len(seq.block_ids)] = 0
        self._free_rows.append(seq.row)
        for bid in reversed(seq.block_ids):
            self._release(bid)

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests and debugging)."""
        owners = [0] * self.num_pages
        for seq in self._seqs.values():
            assert len(set(seq.block_ids)) == len(seq.block_ids), "a request holds a page twice"
            for bid in seq.block_ids:
                owners[bid] += 1
            assert self.pages_needed(seq.num_tokens) <= len(seq.block_ids), "committed KV without a page"
            for idx in range(seq.num_tokens // self.page_size, len(seq.block_ids)):
                block = self._blocks[seq.block_ids[idx]]
                assert block.ref_count == 1 and block.hash is None, "writable page is shared or cached"
            if self.enable_prefix_caching:
                assert len(seq.partial_tokens) == seq.num_tokens % self.page_size
        for block in self._blocks:
            assert block.ref_count == owners[block.block_id], f"page {block.block_id}: bad ref count"
            assert (block.ref_count == 0) == (block.block_id in self._free), f"page {block.block_id}: free/used"
        for h, bid in self._hash_to_block.items():
            assert self._blocks[bid].hash == h, "hash table points at a page with another hash"
        rows = [seq.row for seq in self._seqs.values()]
        assert len(set(rows)) == len(rows) and set(rows).isdisjoint(self._free_rows), "a table row is shared"
        assert sorted(rows + self._free_rows) == list(range(len(self._tables))), "a table row is lost"
        for seq in self._seqs.values():
            n = len(seq.block_ids)
            assert self._tables[seq.row, :n].tolist() == seq.block_ids, "host block table is stale"
            assert not self._tables[seq.row, n:].any(), "host block table is not zero past its end"
        assert not self._tables[self._free_rows].any(), "a free table row is not zero"

    # ------------------------------------------------------------------ internals

    def _seq(self, seq_id) -> SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise PageManagerError(f"unknown request {seq_id!r}") from None

    def _pages_to_reserve(self, seq: SeqBlocks, n_new_tokens: int) -> int:
        return max(0, -(-(seq.num_tokens + n_new_tokens) // self.page_size) - len(seq.block_ids))

    def _take_row(self) -> int:
        """A free row of the host block tables (the array doubles when none is left)."""
        if not self._free_rows:
            n, width = self._tables.shape
            self._tables = np.concatenate([self._tables, np.zeros((max(n, 8), width), dtype=np.int64)])
            self._free_rows = list(range(len(self._tables) - 1, n - 1, -1))  # lowest rows first
        return self._free_rows.pop()

    def _sync_table(self, seq: SeqBlocks, start: int, old_len: int) -> None:
        """Mirror seq.block_ids[start:] into its host table row, which held old_len pages (zero the rest).
        Scalar writes: a decode step changes one page or none, where slice writes cost more."""
        n = len(seq.block_ids)
        if n > self._tables.shape[1]:  # widen (double) the table
            width = max(n, 2 * self._tables.shape[1])
            self._tables = np.pad(self._tables, ((0, 0), (0, width - self._tables.shape[1])))
        tables, r = self._tables, seq.row
        for i in range(start, n):
            tables[r, i] = seq.block_ids[i]
        for i in range(n, old_len):
            tables[r, i] = 0

    def _take_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self._blocks[bid]
        if block.hash is not None:  # new content: the cached prefix page is gone
            if self._hash_to_block.get(block.hash) == bid:
                del self._hash_to_block[block.hash]
            block.hash = None
            block.token_ids = ()
        block.ref_count = 1
        return bid

    def _release(self, bid: int) -> None:
        block = self._blocks[bid]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"page {bid} released twice"
        if block.ref_count == 0:
            self._free[bid] = None
            if block.hash is None:  # nothing worth keeping: reuse it before cached pages
                self._free.move_to_end(bid, last=False)

    def _register(self, seq: SeqBlocks, idx: int) -> None:
        """Page `idx` of `seq` just filled with committed tokens: hash it and publish it."""
        page = tuple(seq.partial_tokens)
        seq.partial_tokens = []
        h = hash((seq.last_hash, page))
        seq.last_hash = h
        block = self._blocks[seq.block_ids[idx]]
        if block.hash is not None:  # already a cached page (prefix hit); nothing to do
            return
        block.hash = h
        block.token_ids = page
        if h not in self._hash_to_block:  # an identical page may already be published by a sibling
            self._hash_to_block[h] = block.block_id


# the old name, kept for one release (the KV cache's units are pages everywhere now)
BlockManager = PageManager
