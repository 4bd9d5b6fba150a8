"""Continuous batching: which requests run in the next engine step, and with how many tokens.

Every step the scheduler builds, under a token budget (`max_num_batched_tokens`),
  1. the decode batch: every running request whose KV is complete contributes exactly Q query tokens
     (Q = the decoder's query length for the stride chosen for this step: 2N−1 for ISD, 1 for AR);
     room for the Q writes is reserved in the block manager first, and if the pool runs out the most
     recently admitted request is preempted (pages freed, back to the front of the queue, recomputed
     later; its output so far is kept), repeatedly, until the batch fits;
  2. prefill chunks with the budget left: first requests already prefilling (chunked prefill of long
     prompts), then waiting requests in arrival order (FCFS; preempted ones go first) while the pool
     can hold their whole prompt and `max_num_seqs` allows. Prefix-cache hits are taken on admission,
     except over prompt positions whose logprobs a request still needs (`Sequence.max_prefix_hit`).
     While requests are running, admission waits until `admit_batch` seats are free (or every waiting
     request has a seat), so that a saturated engine runs one prefill forward for a group of new
     requests instead of one per step (`admits_now`); an idle engine admits at once.
Requests that do not fit wait; none is dropped. `abort` removes a request wherever it is and frees
its pages.

Stationary batch (SPEC §8): when nothing waits and the running set did not change since the last
step, the previous decode batch is reused as is and only the KV reservations are made (one `reserve`
per request, free when its pages already have room); the engine then reuses the batch's per-request
lists too.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from idlm.engine.block_manager import AllocationError, PageManager
from idlm.engine.sequence import SeqStatus, Sequence


@dataclass
class SchedulerOutput:
    decoder: Any = None  # the decoder of every decode row this step (each row reserves its query_len tokens)
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (request, tokens from num_computed)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def query_len(self) -> int:
        """Q: the query tokens of each decode row this step (0 without decodes)."""
        return self.decoder.query_len if self.decoder is not None else 0


def admits_now(running: int, waiting: int, max_num_seqs: int, admit_batch: int) -> bool:
    """Whether waiting requests may be admitted this step: always when nothing runs, else once the free
    seats reach `admit_batch` or hold every waiting request."""
    free = max_num_seqs - running
    return running == 0 or free >= min(admit_batch, waiting)


class Scheduler:
    def __init__(self, block_manager: PageManager, max_num_seqs: int, max_num_batched_tokens: int,
                 admit_batch: int = 1):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admit_batch = admit_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (preemption takes from the end)
        self._stationary: list[Sequence] | None = None  # last decode batch, while nothing changed
        self.num_preemptions = 0

    # ----------------------------------------------------------------- membership

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        self._stationary = None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished (or aborted) request and free its pages."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.request_id in self.bm:
            self.bm.free(seq.request_id)
        seq.status = SeqStatus.FINISHED
        self._stationary = None

    def preempt(self, seq: Sequence) -> None:
        """Free a running request's pages and requeue it at the front (recomputed when readmitted)."""
        self.running.remove(seq)
        self.bm.free(seq.request_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        self._stationary = None

    # ----------------------------------------------------------------- one step

    def schedule(self, step_decoder: Callable[[list[Sequence]], Any]) -> SchedulerOutput:
        """step_decoder(the decode rows) -> the decoder that runs them this step (the engine's stride
        policy); each decode row reserves that decoder's `query_len` KV slots."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self._stationary is not None and not self.waiting:
            decodes = self._stationary
        else:
            decodes = [s for s in self.running if not s.prefilling]
        if decodes:
            out.decoder = step_decoder(decodes)
            q = out.decoder.query_len
            decodes = decodes[: max(1, budget // q)]
            for seq in decodes:
                if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                    continue
                while not self.bm.reserve(seq.request_id, q):  # False: nothing reserved, the pool is short
                    victim = self.running[-1]
                    self.preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
                else:
                    out.decodes.append(seq)
            if out.preempted:
                out.decodes = [s for s in out.decodes if s not in out.preempted]
            budget -= len(out.decodes) * q
        changed = bool(out.preempted)

        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                n = min(len(seq.kv_tokens) - seq.num_computed, budget)
                out.prefills.append((seq, n))
                budget -= n
        admit = admits_now(len(self.running), len(self.waiting), self.max_num_seqs, self.admit_batch)
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq in out.preempted:  # just preempted for lack of pages: not back in the same step
                break
            # keep a page per running decode free so admission does not force immediate preemption
            if self.running and self.bm.pages_needed(len(seq.kv_tokens)) + len(self.running) > self.bm.num_free_pages:
                break
            try:
                hit = self.bm.allocate(seq.request_id, seq.kv_tokens, max_hit=seq.max_prefix_hit)
            except AllocationError:
                break
            self.waiting.popleft()
            seq.num_computed, seq.status = hit, SeqStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq.kv_tokens) - hit, budget)
            out.prefills.append((seq, n))
            budget -= n
            changed = True
        changed |= bool(out.prefills)
        self._stationary = None if changed else out.decodes
        return out
