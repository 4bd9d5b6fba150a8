"""Stop rules applied to each emitted token, in order (SPEC §4.4): stop token ids / EOS, stop
strings (also when split across tokens) and max_tokens. Tokens after a stop are dropped.

`StopChecker` also produces the streamed text: it holds back the last few characters while they
could still be the start of a stop string, so a client never sees a stop string's prefix.
"""

from __future__ import annotations

from idlm.decoding.sampling import SamplingParams
from idlm.errors import ConfigError


class StopChecker:
    def __init__(self, params: SamplingParams, eos_token_ids, tokenizer=None):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids or ()))
        if params.stop and tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to detect them")
        self.detok = None
        if tokenizer is not None:
            from idlm.tokenizer import IncrementalDetokenizer

            self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self._text = ""  # text so far (cut at a stop string once one is found); `text` adds the pending ids'
        self._pending: list[int] = []  # kept ids not detokenized yet (requests without stop strings)
        self._flushed = False  # the detokenizer's held-back end added (once finished)
        # whether a stream needs each step's text with its tokens: stop strings (they decide the stop) and
        # logprobs (their text offsets count the text streamed before them); else it may come a step later
        self.text_with_tokens = bool(params.stop) or params.logprobs is not None
        self.sent = 0  # characters of `text` already streamed
        self.n_tokens = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        """All text so far (the pending ids detokenized first)."""
        self.flush_text()
        return self._text

    @property
    def text_pending(self) -> bool:
        """Whether kept ids wait for their text (`flush_text`)."""
        return bool(self._pending) or (self.finish_reason is not None and self.detok is not None
                                       and not self._flushed)

    def flush_text(self) -> None:
        """Detokenize the ids `accept` kept without text. Without stop strings the text decides nothing, so
        `accept` only queues the ids and this runs when text is wanted: the engine calls it while the device
        runs the next step (detokenization was half the engine's host time per step at batch 64,
        docs/engine.md), `new_text` and `text` call it. Same text as detokenizing each step at once
        (`IncrementalDetokenizer.add_many` = the ids one by one)."""
        if self.detok is None:
            return
        if self._pending:
            ids, self._pending = self._pending, []
            self._text += self.detok.add_many(ids)
        if self.finish_reason is not None and not self._flushed:
            self._flushed = True
            self._text += self.detok.flush()

    def add(self, token_id: int) -> bool:
        """Account one emitted token; True once the request is finished."""
        self.n_tokens += 1
        if self.detok is not None:
            self.flush_text()
            start = max(0, len(self._text) - self.holdback)
            self._text += self.detok.add(token_id)
            if self.params.stop:
                hits = [i for i in (self._text.find(s, start) for s in self.params.stop) if i >= 0]
                if hits:
                    self._text = self._text[: min(hits)]
                    self.finish_reason = "stop"
                    self._flushed = True  # (the cut text ends before anything held back)
                    return True
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
        elif self.n_tokens >= self.params.max_tokens:
            self.finish_reason = "length"
        self.flush_text()  # finished: the detokenizer's held-back end
        return self.finish_reason is not None

    def accept(self, token_ids: list[int]) -> int:
        """Account a step's emitted tokens in order, as `add` each; returns how many are kept: all of them,
        or up to and including the one that finished the request."""
        if self.detok is not None and self.params.stop:  # a stop string may end the request mid-step
            for i, t in enumerate(token_ids):
                if self.add(t):
                    return i + 1
            return len(token_ids)
        # by ids alone: the first stop id, or the token that reaches max_tokens, ends the request
        n = min(len(token_ids), max(1, self.params.max_tokens - self.n_tokens))
        for i in range(n):
            if token_ids[i] in self.stop_ids:
                self.finish_reason = "stop"
                n = i + 1
                break
        self.n_tokens += n
        if self.finish_reason is None and n and self.n_tokens >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.detok is not None:  # their text when wanted (`flush_text`: one window decode for all of them)
            self._pending += token_ids[:n]
        return n

    def new_text(self) -> str:
        """Text that is safe to stream now (all of it once finished)."""
        text = self.text
        end = len(text) if self.finish_reason else max(self.sent, len(text) - self.holdback)
        delta, self.sent = text[self.sent:end], end
        return delta
