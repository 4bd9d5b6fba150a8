"""The batched engine: many requests, any decoder, one loop (SPEC §8).

`LLMEngine.step()` asks the scheduler for a batch, runs the prefill chunks (eager) and the decode
rows (a CUDA graph on GPU) through the model runner, and applies each request's results with the
same functions the reference runner uses (`Decoder.block/step_inputs/compute/finish`,
`apply_result`), so engine output equals reference output request by request. KV is committed to
the page manager by length after every step (`QueryBlock.tokens[:advance]`), so MASK and rejected slots
are rolled back and only committed tokens ever reach the prefix cache.

The stride is chosen per step: fixed, by batch size (`EngineConfig.stride_schedule`), or adaptively
(`stride="auto"`, ISD / R-ISD: every `auto_interval` steps the N ∈ 1..`auto_max_stride` that maximises
expected committed tokens per second, from the running requests' acceptance so far and each stride's step
time — measured on the engine's own recent steps at this batch size where that stride has run, else a
step-cost model of the device, `idlm.decoding.stride_policy`; N = 1 is a plain AR step), and within it
each row its own N <= the step's (`auto_per_row`: the row's block padded to the step's length). A request
whose drafts were made under another stride restarts cold, which is exact; the choice reads only committed
history.

Fault isolation: a step computes everything (forward, sampling, results on the host) before it
changes any engine state, then applies each request's result on its own. If the computation
raises, the step is rerun one request at a time, so an error caused by one request (a value that
overflows, a bug on a rare path) finishes that request alone with finish_reason "error" and
`output.error`, and every other request goes on (`_isolated`); errors that poison the device
(`is_fatal`) still stop the engine.

Host work per decode step is kept per batch where it can be (on a GPU a small model's step is bound by
it, not by the one graph replay): the decode rows go to the runner as one `DecodeBatch` of arrays
(`Decoder.blocks`, `PageManager.decode_mapping` over its mirrored block tables), the per-request lists
of an unchanged batch are reused (`_BatchRows`, and with them the decoders' params tensors,
`Decoder.batch_params`), the packed results reach the host as one array read by columns, and stop
checks without a tokenizer take no per-token detour (`StopChecker.accept`). What remains per request
is applying its result: commit, output, stop rules. `tests/test_engine_host.py` measures it.

Overlapped steps (`EngineConfig.overlap`, on where decode steps replay CUDA graphs): a stable batch's next
decode step is launched before the last one's results reach the host — its block formed on the device from
the last step's output (`Decoder.next_inputs`, `ModelRunner.decode_next`) — and the last step's results are
applied while it runs (`_chain`, `_complete`); any change of the batch drains the step in flight and takes the
ordinary path (`_drain`). Same tokens as synchronous steps (`tests/test_overlap.py`).

Logprobs (`SamplingParams.logprobs`) come out of the decoders' `compute`/`finish` like the tokens.
Prompt logprobs (`prompt_logprobs`) are scored from the prefill forward itself, chunk by chunk (a
chunk's last position predicts the next chunk's first token), once per prompt token even across
preemptions (`_prompt_positions`).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from idlm.decoding import make_decoder
from idlm.decoding.base import Decoder, DecodeStats, StepResult
from idlm.decoding.isd import ISDPlainStep
from idlm.decoding.output import GenerationOutput, apply_result, check_request
from idlm.decoding.sampling import SamplingParams
from idlm.decoding.stops import StopChecker
from idlm.decoding.stride_policy import (
    CostTracker,
    StepCostModel,
    StepTimer,
    StrideChoice,
    acceptance_rows,
    choose_layout,
    choose_stride,
    default_prior,
    position_counts,
    sampling_class,
    stride_to_probe,
    stride_to_refresh,
)
from idlm.engine.block_manager import PageManager
from idlm.engine.calibrate import calibrate_step_cost
from idlm.engine.config import EngineConfig  # noqa: F401 (its home since session 40; imported from here too)
from idlm.engine.model_runner import DecodeBatch, ModelRunner, Row
from idlm.engine.scheduler import Scheduler, admits_now
from idlm.engine.sequence import SeqStatus, Sequence
from idlm.errors import ConfigError

logger = logging.getLogger("idlm.engine")


# what a sticky device error says, from torch ("CUDA error: …") or from a Triton kernel's launcher ("Triton
# Error [CUDA]: an illegal memory access was encountered" — a plain RuntimeError: on the H200 one was taken
# for a request's own error, the batch was retried row by row, and the retry died on the poisoned context)
FATAL_MESSAGES = ("CUDA error", "Triton Error [CUDA]", "illegal memory access", "device-side assert",
                  "unspecified launch failure")


def is_fatal(error: BaseException) -> bool:
    """Errors after which the device cannot be trusted (a CUDA error poisons the whole context): the
    engine stops instead of failing requests one by one for ever."""
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(error, accel)) or any(m in str(error) for m in FATAL_MESSAGES)


def _seq_of(item) -> Sequence:
    return item[0] if isinstance(item, tuple) else item


_UNFREEZE_AT_EXIT: list[bool] = []


def freeze_gc() -> None:
    """Move every object alive now out of the cyclic garbage collector's view (`gc.freeze`), as `idlm serve`
    does once at start: a model, its engine, compiled functions and tokenizer live as long as the process,
    and a full collection walks them all — measured on this project's CPU, one such collection during a
    64-step AR run at batch 256 took ~120 ms (a stall of one step; a benchmark cell lasts under a second).
    Called after `LLMEngine.warmup` and by the benchmarks before they measure. Objects frozen earlier are
    unfrozen and collected first, so an engine dropped since (engines hold reference cycles) is freed,
    not kept forever; frozen objects are still freed by reference counting. At exit everything is
    unfrozen, so interpreter shutdown collects it (extension modules report leaks otherwise)."""
    import atexit
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if not _UNFREEZE_AT_EXIT:
        _UNFREEZE_AT_EXIT.append(True)
        atexit.register(gc.unfreeze)


@dataclass(slots=True)
class RequestOutput:
    """What one step changed for one request (the streaming unit)."""
    request_id: str
    new_token_ids: list[int]
    new_text: str  # "" without a tokenizer
    finished: bool
    output: GenerationOutput = field(repr=False)

    @property
    def finish_reason(self) -> str | None:
        return self.output.finish_reason


@dataclass
class _BatchRows:
    """A decode batch's per-request lists, built once per batch composition: while the batch does not
    change (the scheduler's stationary batch) every step reuses them, and the decoders reuse what they
    derive from the same params list (`Decoder.batch_params`). Every entry is fixed for a request's life."""
    seqs: tuple[Sequence, ...]
    request_ids: list[str] = field(init=False)
    states: list = field(init=False)
    params: list[SamplingParams] = field(init=False)
    rngs: list = field(init=False)
    stats: list[DecodeStats] = field(init=False)

    def __post_init__(self):
        seqs = self.seqs
        self.request_ids, self.states = [s.request_id for s in seqs], [s.state for s in seqs]
        self.params, self.rngs = [s.params for s in seqs], [s.rng for s in seqs]
        self.stats = [s.output.stats for s in seqs]


@dataclass
class _InFlight:
    """A decode step launched without waiting for its results (`EngineConfig.overlap`): they are applied
    while the next step runs, or when the engine drains it. Its rows may include requests that finished, failed
    or were aborted since the chain began: their results are dropped (`_complete`), and from the step after
    the one in flight when they ended they run as padding rows (`_chain`)."""
    rows: _BatchRows
    decoder: object
    pending: object  # `PendingStep`
    sampled: bool = False  # its rows drew random numbers (each chained step takes one more draw number a row)


def _has_branches(decoder) -> bool:
    """Whether a decoder's steps carry rejection branches (an AR or plain-AR-step decoder has none)."""
    return bool(getattr(decoder, "branches", False))


def _prompt_positions(seq: Sequence, n: int) -> tuple[int, list[int], int] | None:
    """Prompt logprobs a prefill chunk of n tokens from `num_computed` = c adds: (first chunk index,
    target tokens, k) for `ModelRunner.forward_logits(score=...)`, or None. Chunk index t predicts
    kv_tokens[c+t+1] (the last index the next chunk's first token); only prompt tokens not yet recorded
    count, so a recompute after a preemption adds nothing twice (and prefix hits never skip any:
    `Sequence.max_prefix_hit`). Records the first prompt token's entry (None) itself."""
    k, out = seq.params.prompt_logprobs, seq.output
    if k is None:
        return None
    if not out.prompt_logprobs:  # the first prompt token has no prefix
        out.prompt_logprobs.append(None)
        out.prompt_top_logprobs.append([])
    c = seq.num_computed
    lo, hi = max(len(out.prompt_logprobs), c + 1), min(c + n, len(seq.prompt) - 1)
    if lo > hi:
        return None
    return lo - 1 - c, seq.prompt[lo: hi + 1], k


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, lora=None, eos_token_ids=None):
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        mcfg = model.config
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's context of "
                              f"{mcfg.max_position_embeddings} tokens")
        self._decoders: dict[tuple[int, bool], object] = {}  # (stride, rejection branches) -> decoder
        strides = config.strides
        for n in strides:
            self._decoder(n)  # validate every stride up front (MASK token, N >= 2, ...)
        # the decoder that draws each request's first token (any ISD stride starts the same cold state; an
        # adaptive engine bounded to N = 1 still starts with an ISD decoder: its plain steps cannot start)
        self._start_stride = config.stride if config.stride != "auto" else max(2, *strides)
        dec = self._decoder(self._start_stride)
        if dec.uses_lora and lora is None:
            raise ConfigError(f"decoder {dec.name!r} needs a LoRA adapter (lora=...)")
        if lora is not None:
            if not dec.uses_lora:
                raise ConfigError(f"a LoRA adapter is only used by decoder 'risd', not {dec.name!r}")
            lora.check_fits(mcfg)
        self.max_query_len = max(self._decoder(n).query_len for n in strides)
        if config.max_num_batched_tokens < self.max_query_len:
            raise ConfigError(f"max_num_batched_tokens {config.max_num_batched_tokens} is below one decode "
                              f"block ({self.max_query_len} tokens)")
        self.eos = mcfg.eos_token_ids if eos_token_ids is None else list(eos_token_ids)
        self.runner = ModelRunner(model, config.page_size, config.num_pages, self.max_model_len, lora=lora,
                                  gpu_memory_utilization=config.gpu_memory_utilization,
                                  cuda_graphs=config.cuda_graphs, max_num_seqs=config.max_num_seqs,
                                  attention=config.attention, fuse_projections=config.fuse_projections,
                                  max_query_len=self.max_query_len, exact=config.exact,
                                  lora_layout=config.lora_layout)
        self.block_manager = PageManager(self.runner.num_blocks, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   admit_batch=config.admit_batch)
        self.seqs: dict[str, Sequence] = {}
        self._batch: _BatchRows | None = None  # the last decode batch's lists
        self._ids = itertools.count()
        self.decode_stats = DecodeStats()  # SPEC §7 counters summed over finished and aborted requests
        # the same per sampling class (`sampling_class`): the adaptive stride's prior for a request is what
        # requests sampled like it showed (greedy drafts are accepted far more often than T = 1 ones)
        self._class_stats: dict[tuple, DecodeStats] = {}
        self.stride_mix: dict[int, int] = {}  # decode steps per stride (the step's: its query length)
        self.row_stride_mix: dict[int, int] = {}  # decode rows per stride each row ran (auto per row)
        self._auto_rows: dict[str, int] = {}  # request id -> its own stride at the last choice
        # "auto": per step layout (False: plain 2N−1 blocks; True: with rejection branches, weighed against the
        # plain layout when `branches` is set) its step-cost corrections and measured step times
        self._trackers: dict[bool, tuple[CostTracker, StepTimer]] = {}
        self._auto: StrideChoice | None = None
        # (the rows of the last decode step, its q̃ output): a CUDA graph's output buffer, which the graph's
        # next replay overwrites; rows that keep a q̃ row of it outside a step get a copy (`_spill_kept`)
        self._kept_from: tuple[list[Sequence], torch.Tensor] | None = None
        # (choice, the rows it was made for): the next choice, made while the device ran the last step
        self._prechosen: tuple[StrideChoice, list[Sequence]] | None = None
        self._auto_steps = 0
        self._next_choice = 0  # `_auto_steps` at which "auto" chooses next (`_choice_due`)
        self._refreshed = 0  # `_auto_steps` at the last refresh probe
        self._forced_stride: int | None = None  # `warmup` runs each stride in turn
        self._forced_branches: bool | None = None  # (and each layout of it: None, the configured one)
        self._inflight: _InFlight | None = None  # a launched decode step whose results are not applied yet
        self._rerun = False  # `_isolated` reruns a failed phase one request at a time (synchronously)
        self._text_streamed = False  # this step's text was streamed (`_stream_text`)
        self._text_owed: dict[str, Sequence] = {}  # requests whose last tokens' text `_stream_text` makes
        if config.stride == "auto":
            model = (StepCostModel(*config.step_cost) if config.step_cost is not None
                     else calibrate_step_cost(self))
            self._new_trackers(model)
        self.counters = {"decode_forwards": 0, "prefill_forwards": 0, "prefill_tokens": 0, "decode_query_tokens": 0,
                         "generated_tokens": 0, "finished": 0, "aborted": 0, "failed": 0, "overlapped_steps": 0,
                         "stride_changes": 0, "branch_steps": 0, "decode_time_s": 0.0, "chained_time_s": 0.0,
                         "prefill_time_s": 0.0}
        self.chain_breaks: dict[str, int] = {}  # why steps in flight were drained, not chained (`_unchained`)
        self._last_stride: tuple[int, bool] | None = None  # (stride, branches) of the last decode step

    def _new_trackers(self, model: StepCostModel) -> None:
        """Fresh step-cost corrections and step timers of each layout "auto" weighs (`_trackers`)."""
        layouts = (False, True) if self.config.branches else (False,)
        # (a stride tried for one interval must count as measured after it: min_samples <= auto_interval)
        self._trackers = {br: (CostTracker(model, branches=br),
                               StepTimer(window=max(16, self.config.auto_interval),
                                         min_samples=min(3, self.config.auto_interval)))
                          for br in layouts}

    @property
    def _cost(self) -> CostTracker | None:
        """The configured layout's step-cost corrections ("auto"; else None)."""
        return self._trackers[self.config.branches][0] if self._trackers else None

    @property
    def _times(self) -> StepTimer | None:
        """The configured layout's measured step times ("auto"; else None)."""
        return self._trackers[self.config.branches][1] if self._trackers else None

    def _decoder(self, stride: int, branches: bool | None = None):
        """The decoder of a stride (with rejection branches or not; None: as configured), made once."""
        branches = self.config.branches if branches is None else branches
        plain_ar = stride == 1 and self.config.decoder in ("isd", "risd") and stride != self.config.stride
        if plain_ar:
            branches = False  # (one plain AR step for both layouts)
        key = (stride, branches)
        if key not in self._decoders:
            if plain_ar:
                decoder = ISDPlainStep(self.config.decoder)  # a schedule's N = 1: plain AR steps, exact
            else:
                decoder = make_decoder(self.config.decoder, stride, self.model.config, self.tokenizer,
                                       self.config.threshold, branches=branches,
                                       guesses=self.config.guesses if branches else 0,
                                       guess_rows=self.config.guess_rows if branches else None)
                if self.config.stride == "auto" and self.config.auto_per_row:
                    decoder.per_row = True  # every step with per-row inputs: one compiled step per stride
            self._decoders[key] = decoder
        return self._decoders[key]

    def _step_decoder(self, decodes: list[Sequence]):
        """The decoder of this step's decode rows: the one of the stride (fixed, scheduled or "auto"), with
        rejection branches as configured (a fixed or scheduled stride: not above `branches_max_batch`)."""
        n, branches = self._stride_now(decodes)
        decoder = self._decoder(n, branches)
        self._count_step(decodes, n, decoder)
        return decoder

    def _stride_now(self, decodes: list[Sequence]) -> tuple[int, bool | None]:
        """(N, branches) of a decode step of these rows (branches None: as configured): warm-up's forced one, a
        fixed stride's or schedule's, or "auto"'s choice (made now when one is due)."""
        if self._forced_stride is not None:
            return self._forced_stride, self._forced_branches
        if self.config.stride != "auto":
            return self._fixed_stride(len(decodes))
        if self._choice_due():
            self._choose(decodes)
        return self._auto.stride, self._auto.branches

    def _count_step(self, decodes: list[Sequence], n: int, decoder) -> None:
        """The bookkeeping of a decode step of stride n and this decoder, synchronous or chained: with "auto",
        its step count (not under warm-up's forced strides) and each row's own stride (`_set_row_strides`);
        `stride_mix`, `counters["branch_steps"]` (steps with rejection branches) and `counters["stride_changes"]`
        when the last step's stride or layout differed (each change runs a synchronous step and restarts the
        rows' drafts)."""
        branches = _has_branches(decoder)
        if self._trackers:  # "auto"
            if self._forced_stride is None:
                self._auto_steps += 1
            self._set_row_strides(decodes, n)
        self.stride_mix[n] = self.stride_mix.get(n, 0) + 1
        self.counters["branch_steps"] += branches
        if self._last_stride is not None and (n, branches) != self._last_stride:
            self.counters["stride_changes"] += 1
        self._last_stride = (n, branches)

    def _unchained(self, reason: str) -> bool:
        """`_chain`'s refusal, counted by reason in `chain_breaks` (why a step ran synchronously: "batch" the
        running rows are not the chained ones less those that ended, "bucket" the rows left fit a smaller
        graph, "admit" a request could be admitted, "stride" / "row_strides" the stride or a row's own stride
        changed, "pages" no room for the KV, "length" the model's length, "table" a wider graph, "launch" a
        failed launch) -> False."""
        self.chain_breaks[reason] = self.chain_breaks.get(reason, 0) + 1
        return False

    def _choose(self, decodes: list[Sequence]) -> None:
        """The adaptive stride's choice for the coming interval (`_auto`, `_next_choice`, each row's own stride
        in `_auto_rows`): the one made during the last step (`_prechoose`) if it was made for this batch's
        bucket, else one made now; or a probe / refresh of a stride to measure."""
        bucket = self.runner.bucket(len(decodes))
        pre, self._prechosen = self._prechosen, None
        if pre is not None and self.runner.bucket(len(pre[1])) == bucket:
            choice, chosen_for = pre  # made during the last step (`_prechoose`)
        else:
            choice, chosen_for = self._choose_stride(decodes), decodes
        times = self._trackers[choice.branches][1]  # (the chosen layout's: a probe keeps the layout)
        probe = stride_to_probe(choice, times.seconds(bucket))  # a close stride of a kind never run
        refresh = self.config.auto_refresh
        if probe is None and refresh and self._auto_steps - self._refreshed >= refresh:
            # re-measure the best stride whose measurement here has expired
            probe = stride_to_refresh(choice, times.expired(bucket))
            if probe is not None:
                self._refreshed = self._auto_steps
        self._auto = choice if probe is None else StrideChoice(probe, choice.rates[probe], choice.rates,
                                                               branches=choice.branches and probe > 1)
        # a probe runs only the steps that measure it (`StepTimer.min_samples`), not a whole interval:
        # it is a stride rated below the choice, and at a large batch each of its steps can cost
        # several plain AR steps (the H200's 8B table: 0.85x AR at C = 128 with 20 steps of probes)
        self._next_choice = self._auto_steps + (self.config.auto_interval if probe is None
                                                else times.min_samples)
        rows = self._auto.rows or ()
        self._auto_rows = {seq.request_id: r for seq, r in zip(chosen_for, rows) if r < self._auto.stride}

    def _fixed_stride(self, batch: int) -> tuple[int, bool | None]:
        """(N, branches) of a fixed stride or a stride schedule at this batch size (branches None: as
        configured; False above `branches_max_batch`: too large a batch for N²-token rows)."""
        limit = self.config.branches_max_batch
        return self.config.stride_for(batch), (False if limit is not None and batch > limit else None)

    def _own_strides(self, n: int) -> dict[str, int]:
        """{request id: its own stride} of the rows that run less than a step of stride n (none when n = 1)."""
        return self._auto_rows if n > 1 else {}

    def _set_row_strides(self, decodes: list[Sequence], n: int) -> None:
        """Each row's own stride for a step of stride n (`ISDState.n`; None: n): what the last choice gave
        it, n for rows that arrived since. Counted in `row_stride_mix`."""
        mix, own = self.row_stride_mix, self._own_strides(n)
        if not own:  # the common case: every row runs the step's stride
            for seq in decodes:
                seq.state.n = None
            mix[n] = mix.get(n, 0) + len(decodes)
            return
        for seq in decodes:
            r = own.get(seq.request_id)
            seq.state.n = r
            r = r or n
            mix[r] = mix.get(r, 0) + 1

    def _choice_due(self) -> bool:
        """Whether this step chooses the stride: the first, then every `auto_interval` steps (after a probe,
        once the probed stride has run `StepTimer.min_samples` steps)."""
        return self._auto is None or self._auto_steps >= self._next_choice

    def _prechoose(self, decodes: list[Sequence]) -> None:
        """Called while the device runs a decode step (between its launch and the host sync): if the next
        step is one where "auto" chooses, make that choice now, from what is committed so far — the step
        running now is not (`_acceptance` reads finished steps only). The next step takes it if its batch
        falls in the same bucket (rows that joined meanwhile run the step's stride; `_set_row_strides`),
        else chooses afresh. The host would otherwise wait idle for the device here; made on the host
        before the step, the choice (~0.1–0.4 ms every `auto_interval` steps) cost the H200's batch-1 ISD
        engine ~0.07 ms a step against the AR engine's."""
        if not self._trackers or self._forced_stride is not None:
            return
        if self._auto is not None and self._choice_due():
            try:
                self._prechosen = (self._choose_stride(decodes), list(decodes))
            except Exception as e:  # not this step's failure: the next step chooses afresh (and raises there)
                if is_fatal(e):
                    raise
                self._prechosen = None

    def _retire_stats(self, seq: Sequence) -> None:
        """A finished, failed or aborted request's counters into the engine's totals and its class's."""
        self.decode_stats = self.decode_stats.merge(seq.output.stats)
        key = sampling_class(seq.params)
        self._class_stats[key] = self._class_stats.get(key, DecodeStats()).merge(seq.output.stats)

    def _choose_stride(self, decodes: list[Sequence]) -> StrideChoice:
        """The adaptive stride from committed history only (`_acceptance`): each layout's best stride
        (`choose_stride`, with its own measured step times; a layout whose steps have not run yet borrows the
        other's measured / modelled ratios), and the better of them (`choose_layout`)."""
        cur, strides, batch = self._auto, self.config.strides, len(decodes)
        accepts, bucket = self._acceptance(decodes), self.runner.bucket(batch)
        measured_any = [cost for cost, _ in self._trackers.values() if cost.measured]
        choices = []
        for br, (cost, times) in self._trackers.items():
            scales = (cost if cost.measured or not measured_any else measured_any[0]).scales(strides, batch)
            current = cur.stride if cur is not None and (cur.branches == br or cur.stride == 1) else None
            choices.append(choose_stride(accepts, cost.model, strides, current=current, cost_scale=scales,
                                         measured=times.seconds(bucket), per_row=self.config.auto_per_row,
                                         ar_margin=self.config.auto_ar_margin, branches=br))
        return choose_layout(choices, cur)

    def _acceptance(self, decodes: list[Sequence]) -> np.ndarray:
        """[B, auto_max_stride − 1] each row's per-position conditional acceptance: its own counts, smoothed
        towards the pooled counts of the requests of its sampling class (`sampling_class`; running and
        finished ones)."""
        k = self.config.auto_max_stride - 1
        acc, ver = position_counts([s.output.stats for s in decodes], k)  # [B, k] each
        classes = [sampling_class(s.params) for s in decodes]
        prior = np.empty(acc.shape)  # [B, k]: each row's class prior
        for key in set(classes):
            mine = np.array([c == key for c in classes])
            done = self._class_stats.get(key)
            acc_done, ver_done = position_counts([done] if done is not None else [], k)
            prior[mine] = default_prior(list(acc[mine].sum(0) + acc_done.sum(0)),
                                        list(ver[mine].sum(0) + ver_done.sum(0)), k)
        return acceptance_rows(acc, ver, prior)

    # ----------------------------------------------------------------- requests

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (a prompt string needs a tokenizer); errors name the problem."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs a tokenizer; pass token ids instead")
            prompt = self.tokenizer.encode_prompt(prompt)
        prompt = list(prompt)
        check_request(prompt, params, self.max_model_len, self.model.config.vocab_size)
        need = self.block_manager.pages_needed(len(prompt) + params.max_tokens + self.max_query_len)
        if need > self.block_manager.num_pages:
            raise ConfigError(f"request needs up to {need} KV pages but the pool has {self.block_manager.num_pages}: "
                              "lower max_tokens or give the engine more KV memory")
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self.seqs:
            raise ConfigError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, prompt, params, StopChecker(params, self.eos, self.tokenizer),
                       params.rng())
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def add_requests(self, jobs: list[tuple[str | list[int], SamplingParams | None, str | None]]) -> list[str]:
        """Queue several (prompt, params, request id) requests, all or none: if one is invalid its
        error is raised and none of them stays queued (they never ran, so nothing else changed)."""
        added: list[str] = []
        try:
            for prompt, params, rid in jobs:
                added.append(self.add_request(prompt, params, rid))
        except BaseException:
            for rid in added:
                self.scheduler.finish(self.seqs.pop(rid))
            raise
        return added

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its pages; False if it is unknown or already finished."""
        seq = self.seqs.pop(str(request_id), None)
        if seq is None:
            return False
        self._retire_stats(seq)
        seq.output.finish_reason = seq.output.finish_reason or "abort"
        self.scheduler.finish(seq)
        self.counters["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ----------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        updates: dict[str, RequestOutput] = {}
        self._text_streamed = False
        if self._inflight is not None:
            t0, graphs = time.perf_counter(), self.runner.graphs_captured
            chained = self._chain(updates)
            if not chained:
                self._drain(updates)
            dt = time.perf_counter() - t0
            self.counters["decode_time_s"] += dt
            if chained:
                self.counters["chained_time_s"] += dt
                if self._trackers and self.runner.graphs_captured == graphs:
                    self._observe(self._inflight.decoder, len(self._inflight.rows.seqs), dt)
                return list(updates.values())
        sched = self.scheduler.schedule(self._step_decoder)
        if sched.prefills:
            t0 = time.perf_counter()
            self._isolated(self._prefill, sched.prefills, updates)
            self.counters["prefill_time_s"] += time.perf_counter() - t0
        if sched.decodes:
            t0, graphs = time.perf_counter(), self.runner.graphs_captured
            self._isolated(lambda seqs, upd: self._decode(seqs, sched.decoder, upd), sched.decodes, updates)
            dt = time.perf_counter() - t0
            self.counters["decode_time_s"] += dt
            if self._trackers and self.runner.graphs_captured == graphs and self._inflight is None:
                # the adaptive stride learns what its steps really cost (not from a step that captured a
                # graph: that one took seconds; nor from one only launched, `_overlaps`: the next step
                # times it, and every step after it while they overlap)
                self._observe(sched.decoder, len(sched.decodes), dt)
        if not self._text_streamed:  # no device step to hide it behind (prefill only, an eager decoder)
            self._stream_text(updates)
        return list(updates.values())

    def _observe(self, decoder, rows: int, seconds: float) -> None:
        """A decode step's time into its layout's trackers (a plain AR step's into every layout's: the same step)."""
        n, branches = decoder.stride, _has_branches(decoder)
        for br, (cost, times) in self._trackers.items():
            if br == branches or n == 1:
                cost.observe(n, rows, seconds)
                times.observe(n, self.runner.bucket(rows), seconds)

    def _stream_text(self, updates) -> None:
        """The text of the ids kept since the last call (`StopChecker.flush_text`) into this step's outputs.
        Called while the device runs a decode step (between its launch and the host sync), so the
        detokenization of the last step's tokens costs no step time — it was half the engine's host time
        per step at batch 64 (docs/engine.md); a step's text therefore comes with the next step's outputs
        (a request's last text with its last tokens)."""
        self._text_streamed = True
        owed, self._text_owed = self._text_owed, {}
        for rid, seq in owed.items():
            if rid in self.seqs:  # (not finished, failed or aborted meanwhile)
                delta = seq.checker.new_text()
                if delta:
                    self._update(updates, seq, [], delta, False)

    @staticmethod
    def _update(updates, seq: Sequence, new_ids: list[int], text: str, finished: bool) -> None:
        """This step's output of `seq` in `updates`: after what the step already reported for it (a prefill
        and a decode, streamed text, a failure in the same step)."""
        prev = updates.get(seq.request_id)
        if prev is not None:
            new_ids, text = prev.new_token_ids + new_ids, prev.new_text + text
        updates[seq.request_id] = RequestOutput(seq.request_id, new_ids, text, finished, seq.output)

    # ----------------------------------------------------------------- fault isolation

    def _isolated(self, phase, items: list, updates) -> None:
        """Run a phase (`_prefill` / `_decode`) over the batch; if it raises, rerun it one request at a
        time so that only the requests whose own step raises fail (`_fail`), never the engine. Sound
        because a phase changes no engine state before its device work and host computation are done
        (the retry redraws the random numbers of the requests involved). Errors that leave the device
        unusable (`is_fatal`) are raised: the engine loop dies and the server restarts."""
        try:
            phase(items, updates)
            return
        except Exception as e:
            if is_fatal(e):
                raise
            if len(items) == 1:
                self._fail(_seq_of(items[0]), e, updates)
                return
        self._rerun = True
        try:
            for item in items:
                try:
                    phase([item], updates)
                except Exception as e:
                    if is_fatal(e):
                        raise
                    self._fail(_seq_of(item), e, updates)
        finally:
            self._rerun = False

    def _fail(self, seq: Sequence, error: BaseException, updates) -> None:
        """Finish one request with finish_reason "error" (its pages freed), leaving every other one running."""
        if seq.request_id not in self.seqs:
            return  # already finished or failed
        logger.warning("request %s failed in its engine step and was stopped: %r", seq.request_id, error,
                       exc_info=error)
        seq.output.finish_reason = "error"
        seq.output.error = f"{type(error).__name__}: {error}"
        self._retire_stats(seq)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        self.counters["failed"] += 1
        self._update(updates, seq, [], "", True)

    def _apply_each(self, items: list[tuple], apply, updates) -> None:
        """Apply a computed step to each request (`apply(seq, *rest)` per item); an error while applying
        fails that request alone."""
        for item in items:
            try:
                apply(*item)
            except Exception as e:
                if is_fatal(e):
                    raise
                self._fail(item[0], e, updates)

    def _emit(self, seq: Sequence, res: StepResult, from_decode: bool, updates) -> None:
        n0 = len(seq.output.token_ids)
        done = apply_result(seq.output, seq.checker, res, from_decode)
        if seq.first_token_time is None and len(seq.output.token_ids) > n0:
            seq.first_token_time = time.perf_counter()
        new = seq.output.token_ids[n0:]
        self.counters["generated_tokens"] += len(new)
        # a running request's text comes with the next step's outputs (`_stream_text`), unless needed now
        text = ""
        if self.tokenizer is not None:
            if done or seq.checker.text_with_tokens:
                text = seq.checker.new_text()
            else:
                self._text_owed[seq.request_id] = seq
        self._update(updates, seq, new, text, done)
        if done:
            seq.finish_time = time.perf_counter()
            self._retire_stats(seq)
            self.scheduler.finish(seq)
            self.seqs.pop(seq.request_id, None)
            self.counters["finished"] += 1

    def _row(self, seq: Sequence, tokens: list[int], **extra) -> Row:
        rid, start = seq.request_id, seq.num_computed
        return Row(tokens, start, self.block_manager.slots(rid, start, len(tokens)),
                   self.block_manager.block_table(rid), **extra)

    def _prefill(self, prefills: list[tuple[Sequence, int]], updates) -> None:
        # compute: nothing in the engine changes until every row's forward and first token are done
        rows = [self._row(seq, seq.kv_tokens[seq.num_computed: seq.num_computed + n]) for seq, n in prefills]
        score = {i: sc for i, (seq, n) in enumerate(prefills) if (sc := _prompt_positions(seq, n)) is not None}
        scored: dict = {}
        if score:  # prompt logprobs from this same forward
            logits, scored = self.runner.forward_logits(rows, score=score)
        else:
            logits = self.runner.forward_logits(rows)  # [B, V] at each chunk's last token
        # a request draws its first token once its whole prompt is in (not again after a preemption)
        started = [i for i, (seq, n) in enumerate(prefills)
                   if seq.num_computed + n == len(seq.kv_tokens) and seq.state is None]
        first: dict[int, tuple] = {}
        if started:
            seqs = [prefills[i][0] for i in started]
            with self.runner.decoder_math():
                states, results = self._decoder(self._start_stride).start(
                    logits[started], [s.params for s in seqs], [s.rng for s in seqs])
            first = {i: (st, res) for i, st, res in zip(started, states, results)}
        self.counters["prefill_forwards"] += 1

        def apply(seq: Sequence, i: int, n: int, row: Row) -> None:
            if i in scored:
                lps, tops = scored[i]
                seq.output.prompt_logprobs += lps
                seq.output.prompt_top_logprobs += tops
            self.block_manager.commit(seq.request_id, seq.num_computed + n, row.tokens, release=False)
            seq.num_computed += n
            self.counters["prefill_tokens"] += n
            if i in first:
                seq.state, res = first[i]
                self._emit(seq, res, False, updates)

        self._apply_each([(seq, i, n, row) for i, ((seq, n), row) in enumerate(zip(prefills, rows))], apply, updates)

    def _batch_rows(self, seqs: list[Sequence]) -> _BatchRows:
        key = tuple(seqs)
        if self._batch is None or self._batch.seqs != key:  # (Sequences compare by identity)
            self._batch = _BatchRows(key)
        return self._batch

    def _decode_batch(self, rows: _BatchRows, decoder, query_len: int) -> tuple[DecodeBatch, list[list[int]]]:
        """The step's DecodeBatch (decoder blocks + the block manager's slots and tables, all as arrays) and
        each row's block tokens as a list (the first `advance` of them are committed)."""
        blocks = decoder.blocks(rows.states)
        starts, slots, tables = self.block_manager.decode_mapping(rows.request_ids, query_len)
        lora = decoder.uses_lora
        batch = DecodeBatch(blocks.tokens, starts, slots, tables, is_mask=blocks.is_mask if lora else None,
                            gate=blocks.gate if lora else None, visible=blocks.visible, offsets=blocks.offsets,
                            hide=blocks.hide)
        return batch, blocks.tokens.tolist()

    def _spill_kept(self, seqs: list[Sequence]) -> None:
        """Before a decode step: the rows of the last step that are not in this one (preempted, left out by the
        token budget, or the other rows while a failed batch is rerun one request at a time) and still keep
        their drafts' q̃ as a row of the last step's graph output get their own copy of that row, since a
        replay of that graph would overwrite it. The rows of this step read theirs before it replays (the
        runner copies its inputs in first), so the output is not cloned every step."""
        if self._kept_from is None:
            return
        rows, out = self._kept_from
        here = set(map(id, seqs))
        for seq in rows:
            kept = getattr(seq.state, "spec_q", None)
            if id(seq) not in here and kept is not None and kept[0] is out and seq.status is not SeqStatus.FINISHED:
                seq.state.spec_q = (out[kept[1]: kept[1] + 1].clone(), 0)

    def _decode(self, seqs: list[Sequence], decoder, updates) -> None:
        # compute: nothing in the engine changes until the step's results are on the host
        self._spill_kept(seqs)
        query_len = decoder.query_len
        rows = self._batch_rows(seqs)
        batch, block_tokens = self._decode_batch(rows, decoder, query_len)
        states, params, rngs, stats = rows.states, rows.params, rows.rngs, rows.stats
        if decoder.fused:
            tensors, static = decoder.step_inputs(states, params, rngs, self.model.config.vocab_size,
                                                  self.runner.device)
            if self._overlaps(decoder, static, rngs):  # launch only: its results are applied in the next `step`
                pending = self.runner.decode(batch, decoder, tensors, static, defer=True)
                self._kept_from = None
                self._inflight = _InFlight(rows, decoder, pending, sampled="draw" in tensors)
                self._stream_text(updates)
                return
            packed, extra = self.runner.decode(batch, decoder, tensors, static)
            self._prechoose(seqs)  # host work while the device runs the step
            self._stream_text(updates)  # (the last step's text)
            host = packed.cpu().numpy()  # the one host sync
            # a graph's q̃ output is kept by reference (`_spill_kept` copies what must outlive a replay)
            self._kept_from = (list(seqs), extra) if extra is not None and self.runner.use_graphs else None
            try:  # finish updates every row's decoder state: past this point a failure fails the whole batch
                results = decoder.finish(states, host, extra, params, stats)
            except Exception as e:
                if is_fatal(e):
                    raise
                for seq in seqs:
                    self._fail(seq, e, updates)
                return
        else:
            self._kept_from = None  # (rows of the last step not in this one were spilled above)
            logits = self.runner.decode_logits(batch)
            with self.runner.decoder_math():
                results = decoder.step(states, logits, params, rngs, stats)
        self._apply_decode(seqs, decoder, block_tokens, results, updates)

    def _apply_decode(self, seqs: list[Sequence], decoder, block_tokens: list[list[int]], results: list[StepResult],
                      updates, release: bool = True) -> None:
        """Apply a decode step's results: commit each row's kept block tokens, emit, stop checks. release=False
        (a later step is in flight): pages past the committed length stay reserved (that step writes them)."""
        query_len = decoder.query_len
        self.counters["decode_forwards"] += 1
        self.counters["decode_query_tokens"] += len(seqs) * query_len

        def apply(seq: Sequence, tokens: list[int], res: StepResult) -> None:
            if not 0 <= res.advance <= query_len:
                raise RuntimeError(f"decoder {decoder.name} kept {res.advance} of {query_len} slots")
            kept = tokens[: res.advance]
            self.block_manager.commit(seq.request_id, seq.num_computed + res.advance, kept, release=release)
            seq.kv_tokens += kept
            seq.num_computed += res.advance
            seq.output.stats.forwards += 1
            self._emit(seq, res, True, updates)

        self._apply_each(list(zip(seqs, block_tokens, results)), apply, updates)

    # ----------------------------------------------------------------- overlapped steps

    def _overlaps(self, decoder, static: dict, rngs: list) -> bool:
        """Whether this decode step may be launched without waiting for its results (`EngineConfig.overlap`):
        graph steps without logprobs, every row with its own random stream, whose
        next block the decoder can form on the device — and never inside `_isolated`'s one-by-one rerun."""
        return (self.config.overlap and self.runner.use_graphs and not self.config.exact and not self._rerun
                and static.get("logprobs") is None
                and type(decoder).next_inputs is not Decoder.next_inputs and all(r is not None for r in rngs))

    def _live(self, seq: Sequence) -> bool:
        return self.seqs.get(seq.request_id) is seq and seq.status is SeqStatus.RUNNING

    def _chain(self, updates) -> bool:
        """Launch the in-flight step's successor (its block formed on the device), then apply the in-flight
        step's results while it runs. Only for the same rows — less those that finished, failed or were aborted
        since (their rows become padding rows: KV to the trash slot, results dropped; as long as the rows left
        fit no smaller batch bucket) — at the same decoder, no waiting request the scheduler would admit now,
        room reserved for the successor's KV (its start is at most the in-flight step's `max_advance` past the
        committed length); else False (the caller drains). A finish no longer stops the chain: on the H200 at
        C = 64 the synchronous step after each finish cost an R-ISD engine ~1.3 ms more than a chained one."""
        inf = self._inflight
        rows = list(inf.rows.seqs)
        live = [self._live(s) for s in rows]
        seqs = [s for s, ok in zip(rows, live) if ok]  # the rows still running
        sch = self.scheduler
        if not seqs or sch.running != seqs:
            return self._unchained("batch")
        if len(seqs) < len(rows) and self.runner.bucket(len(seqs)) != self.runner.bucket(len(rows)):
            return self._unchained("bucket")  # fewer rows fit a smaller graph: the synchronous step takes it
        if sch.waiting and len(seqs) < sch.max_num_seqs and admits_now(len(seqs), len(sch.waiting), sch.max_num_seqs,
                                                                      sch.admit_batch):
            return self._unchained("admit")  # the scheduler would admit one now
        decoder = inf.decoder
        if self._forced_stride is not None:  # (`warmup`: so that it captures the chained steps' graphs too)
            n, branches = self._forced_stride, self._forced_branches
        elif self.config.stride == "auto":
            if self._choice_due():  # choose now (from what is committed: the step in flight is not yet)
                self._choose(seqs)
            n, branches = self._auto.stride, self._auto.branches
            own = self._own_strides(n)
            if any(seq.state.n != own.get(seq.request_id) for seq in seqs):
                return self._unchained("row_strides")  # (the synchronous step sets them; the choice stands)
        else:
            n, branches = self._fixed_stride(len(seqs))
        if self._decoder(n, branches) is not decoder:
            return self._unchained("stride")
        bm, q, adv = self.block_manager, decoder.query_len, decoder.max_advance
        grown = False
        for seq in seqs:
            if seq.num_computed + adv > self.max_model_len:
                return self._unchained("length")
            before = bm.capacity(seq.request_id)
            if not bm.reserve(seq.request_id, adv + q):
                return self._unchained("pages")  # (the synchronous path preempts)
            grown |= bm.capacity(seq.request_id) != before
        dead = [i for i, ok in enumerate(live) if not ok]
        tables = bm.table_rows([s.request_id for s in seqs]) if grown else None
        if tables is not None and dead:  # a dead row's table: zeros (never written through: its slots are trash)
            tables = np.insert(tables, [i - k for k, i in enumerate(dead)], 0, axis=0)
        if tables is not None and tables.shape[1] > self.runner.table_width:
            return self._unchained("table")  # a wider graph: the synchronous path picks it
        try:
            pending = self.runner.decode_next(decoder, tables, padding=dead)
        except Exception as e:
            if is_fatal(e):
                raise
            logger.warning("an overlapped decode step could not be launched; running synchronously: %r", e)
            return self._unchained("launch")
        self._count_step(seqs, n, decoder)  # (the rows' own strides are unchanged: checked above)
        self.counters["overlapped_steps"] += 1
        if inf.sampled:  # the device moved every row's draw number on (`advanced_inputs`): so does the host
            for ok, r in zip(live, inf.rows.rngs):
                if ok:  # (an ended request's stream is not read again)
                    r.draw += 1
        self._inflight = _InFlight(inf.rows, decoder, pending, sampled=inf.sampled)
        self._stream_text(updates)  # (the last step's text, while the device runs)
        self._prechoose(seqs)
        self._complete(inf, updates, release=False)
        return True

    def _drain(self, updates) -> None:
        """Apply the in-flight step's results (nothing launched after it). Its q̃ output, which rows keep by
        reference, is the graph's: rows that sit the next step out get their own copy (`_spill_kept`)."""
        inf, self._inflight = self._inflight, None
        self._complete(inf, updates, release=True)
        extra = inf.pending.extra
        self._kept_from = (list(inf.rows.seqs), extra) if extra is not None else None

    def _complete(self, inf: _InFlight, updates, release: bool) -> None:
        """Wait for a launched step's results and apply them to its rows that are still live. Its block is
        `blocks` of the rows' states before `finish` (the device formed the same from the last step's output)."""
        rows, decoder = inf.rows, inf.decoder
        host = inf.pending.result()
        live = [self._live(s) for s in rows.seqs]
        if not any(live):
            return
        block_tokens = decoder.blocks(rows.states).tokens.tolist()
        # a row that finished, failed, was aborted or preempted after the launch: its (wasted) results touch
        # neither its statistics nor its decoder state (a preempted request resumes from the state it had)
        stats = [st if ok else DecodeStats() for st, ok in zip(rows.stats, live)]
        states = [st if ok else copy.copy(st) for st, ok in zip(rows.states, live)]
        try:
            results = decoder.finish(states, host, inf.pending.extra, rows.params, stats)
        except Exception as e:
            if is_fatal(e):
                raise
            for seq, ok in zip(rows.seqs, live):
                if ok:
                    self._fail(seq, e, updates)
            return
        keep = [i for i, ok in enumerate(live) if ok]
        self._apply_decode([rows.seqs[i] for i in keep], decoder, [block_tokens[i] for i in keep],
                           [results[i] for i in keep], updates, release=release)

    # ----------------------------------------------------------------- convenience

    def run(self, prompts: list, params: SamplingParams | list[SamplingParams]) -> list[GenerationOutput]:
        """Submit all prompts, step until done, outputs in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        seqs = [self.seqs[self.add_request(p, sp)] for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        if self.tokenizer is not None:
            for seq in seqs:
                seq.output.text = seq.checker.text
        return [seq.output for seq in seqs]

    def _warmup_steps(self) -> list[tuple[int, bool | None]]:
        """(N, branches) of every kind of decode step this engine may run: each stride in the configured layout
        (None), and with "auto" weighing both layouts each N >= 2 without rejection branches too."""
        both = len(self._trackers) > 1
        return [(n, br) for n in self.config.strides for br in ((None, False) if both and n > 1 else (None,))]

    def warmup(self, max_tokens: int = 6, all_batches: bool | None = None) -> dict[int, float]:
        """Run every stride this engine may use (`EngineConfig.strides`) on a dummy request, once greedy and
        once sampled, so that compiling each decode step and capturing its first CUDA graphs happen now, not
        while requests wait: a `stride="auto"` engine would otherwise stall every running request for the
        compile of each stride the policy tries first (on the H200 a bench cell spent minutes so). Call it on
        an idle engine; it leaves no trace in what the engine reports or learns (statistics, counters, stride
        mix, the adaptive stride's state and measurements are reset to what they were or fresh). -> wall
        seconds per stride (both variants; on CUDA mostly compile and capture).

        all_batches (default: on for `stride="auto"` with CUDA graphs): also run every stride at every batch
        bucket up to max_num_seqs, so that each (stride, bucket) step's graphs, greedy and
        sampled, are captured now, as vLLM captures its graphs at start. An adaptive engine moves between
        strides as its batch shrinks and grows; captured lazily, each new pair stalled the running requests
        mid-run (an H200 table run captured 7 to 63 graphs inside the timed cells)."""
        if self.has_unfinished():
            raise ConfigError("warmup needs an idle engine (requests are running or waiting)")
        saved = (self.decode_stats, dict(self._class_stats), dict(self.counters), dict(self.stride_mix),
                 dict(self.row_stride_mix), dict(self.chain_breaks), self._last_stride,
                 self._auto, self._auto_steps, self._next_choice)
        prompt = [1 + i % (self.model.config.vocab_size - 1) for i in range(8)]
        seconds = {}

        def greedy_and_sampled(rows: int, tokens: int) -> None:
            for temperature in (0.0, 1.0):
                self.run([prompt] * rows, [SamplingParams(temperature=temperature, seed=0, max_tokens=tokens,
                                                          ignore_eos=True)] * rows)

        sweep = all_batches if all_batches is not None else (self.config.stride == "auto" and self.runner.use_graphs)
        sizes = [b for b in self.runner.batch_buckets if 1 < b <= self.scheduler.max_num_seqs] if sweep else []
        try:
            for n, br in self._warmup_steps():  # (an auto engine's decoders always take per-row inputs)
                self._forced_stride, self._forced_branches = n, br
                t0 = time.perf_counter()
                greedy_and_sampled(1, max_tokens)
                if n in (self.config.strides[0], self.config.strides[-1]):
                    # two rows: the forward's compiled elementwise functions, specialized on a batch of 1
                    # above, compile their any-batch version now (once for Q = 1, once for longer blocks);
                    # the decode steps' own functions serve every batch already (`cuda_fused(batch_rows)`)
                    self.run([prompt, prompt[::-1]], [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True)] * 2)
                seconds[n] = round(seconds.get(n, 0.0) + time.perf_counter() - t0, 3)
            for n, br in self._warmup_steps() if sizes else ():  # all_batches: every bucket above 1
                self._forced_stride, self._forced_branches = n, br
                t0 = time.perf_counter()
                for rows in sizes:  # 3 tokens: the prefill's, a cold step, a verify step (and the chained
                    greedy_and_sampled(rows, 3)  # step's graph where steps overlap)
                seconds[n] = round(seconds[n] + time.perf_counter() - t0, 3)
        finally:
            self._forced_stride = self._forced_branches = None
            for rid in list(self.seqs):  # only warm-up requests can be here (the engine was idle)
                self.abort_request(rid)
            (self.decode_stats, self._class_stats, self.counters, self.stride_mix, self.row_stride_mix,
             self.chain_breaks, self._last_stride, self._auto, self._auto_steps, self._next_choice) = saved
            self._prechosen = self._kept_from = None  # (the warm-up's rows are gone)
            self._refreshed = min(self._refreshed, self._auto_steps)
            if self._trackers:  # what the dummy steps measured is not the workload's
                self._new_trackers(self._cost.model)
        freeze_gc()  # the compiled functions and graphs made here live as long as the engine
        return seconds

    def kv_usage(self) -> dict:
        bm = self.block_manager
        return {"pages_total": bm.num_pages, "pages_free": bm.num_free_pages,
                "pages_used": bm.num_pages - bm.num_free_pages}

