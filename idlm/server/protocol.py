"""The OpenAI wire format: request models, request -> `SamplingParams`, response and chunk builders, errors.

Why it exists: everything about the shape of the API lives here as plain data and pure functions, so
the app (`app.py`) only runs requests, and each rule is testable without a server:

- request bodies are parsed strictly: strings and booleans are never coerced into numbers, every
  numeric field has its range (an int64, a seed in [-2^63, 2^64), 0..20 logprobs, ...), chat roles are
  system / user / assistant / tool and every message has content;
- fields other servers implement but idlm does not (`response_format`, `tools`, `logit_bias`, penalties,
  `min_tokens`, `best_of`, `suffix`, vLLM's guided decoding, ...) are a 400 naming the field unless
  they carry their neutral value; other unknown fields are ignored, as vLLM and OpenAI's clients expect;
- `to_sampling_params` is the one mapping request -> per-choice `SamplingParams` (choice i of `n`
  uses seed + i, modulo 2^64);
- logprobs are the model's raw log-softmax (vLLM's default): completions' legacy block (`tokens`,
  `token_logprobs`, `top_logprobs` as {token: logprob} dicts that include the chosen token,
  `text_offset`; with `echo` the prompt's tokens come first, the first with null) and chat's
  `[{token, logprob, bytes, top_logprobs}]`;
- every error is an `ApiError` rendered as `{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from idlm.decoding.sampling import MAX_LOGPROBS, VERIFICATIONS, SamplingParams
from idlm.engine.async_engine import QueueFullError
from idlm.errors import ConfigError, IdlmError

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # capped by what is left of the context
MAX_N = 128
MAX_STOP = 64
MAX_JSON_DEPTH = 32
INT64_MAX = 2**63 - 1
HTTP_DRAFT_MODES = ("sample", "argmax")  # "argmax-ratio" (biased) stays a Python-API-only option
CHAT_ROLES = ("system", "user", "assistant", "tool")


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def server_error(message: str, code: str = "internal_error", status: int = 500) -> ApiError:
    return ApiError(status, message, type_="server_error", code=code)


def engine_dead() -> ApiError:
    return server_error("the engine is not running", code="engine_dead", status=503)


def shutting_down() -> ApiError:
    return server_error("the server is shutting down", code="shutting_down", status=503)


def from_validation(errors: list) -> ApiError:
    """The first pydantic error as a 400 naming the field (`param` = the top-level field)."""
    err = errors[0] if errors else {}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if param == "prompt":
        return ApiError(400, "invalid prompt: must be a string, a list of strings, a list of token ids or a list "
                             "of lists of token ids", param="prompt")
    return ApiError(400, f"invalid value for {'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}", param=param)


def map_engine_error(e: BaseException) -> ApiError | BaseException:
    """What an exception from `AsyncLLM.add_requests` / a stream becomes over HTTP."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, ConfigError):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, IdlmError):
        return ApiError(400, str(e))
    if isinstance(e, RuntimeError):
        return server_error(str(e), code="engine_dead", status=503)
    return e


def outcome(e: BaseException) -> str:
    """The `idlm_requests_total{outcome}` label of a request that ended with `e`."""
    if isinstance(e, QueueFullError) or (isinstance(e, ApiError) and e.status == 429):
        return "queue_full"
    if isinstance(e, (IdlmError, ConfigError)) or (isinstance(e, ApiError) and e.status < 500):
        return "invalid"
    return "error"


# --------------------------------------------------------------------------- the raw body


def check_json(data: Any) -> None:
    """Reject what pydantic would not catch cleanly: nesting deeper than MAX_JSON_DEPTH and strings
    that are not valid Unicode (a lone surrogate such as "\\ud800" cannot be encoded or tokenized).
    Iterative, so a hostile body cannot exhaust the stack."""
    stack = [(data, "", 1)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep", code="invalid_json")
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError as e:
                field = path.split(".", 1)[0].split("[", 1)[0] or None
                raise ApiError(400, f"{path or 'body'} is not valid Unicode: {e.reason} at index {e.start} "
                                    f"({obj[e.start]!r})", param=field) from None
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, str):
                    stack.append((k, path or "body", depth + 1))
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(obj, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj))


def _neutral_number(value: float) -> Any:
    return lambda v: type(v) in (int, float) and v == value


# field -> a test of the values that mean "feature off" (accepted as if absent); None is always neutral
UNSUPPORTED: dict[str, Any] = {
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "logit_bias": lambda v: v == {},
    "presence_penalty": _neutral_number(0),
    "frequency_penalty": _neutral_number(0),
    "repetition_penalty": _neutral_number(1),
    "min_p": _neutral_number(0),
    "min_tokens": _neutral_number(0),
    "suffix": lambda v: v == "",
    "use_beam_search": lambda v: v is False,
    "prompt_logprobs": lambda v: False,
    "guided_json": lambda v: False,
    "guided_regex": lambda v: False,
    "guided_choice": lambda v: False,
    "guided_grammar": lambda v: False,
    "structured_outputs": lambda v: False,
    "prediction": lambda v: False,
    "audio": lambda v: False,
    "modalities": lambda v: v == ["text"],
}


def check_unsupported(data: dict) -> None:
    """A 400 naming the first field idlm does not implement that carries a non-neutral value."""
    for name, neutral in UNSUPPORTED.items():
        if name in data and data[name] is not None and not neutral(data[name]):
            raise ApiError(400, f"{name} is not supported by this server (idlm); leave it out", param=name,
                           code="unsupported_parameter")
    best_of = data.get("best_of")
    if best_of is not None and not (type(best_of) is int and best_of in (1, data.get("n", 1))):
        raise ApiError(400, "best_of is not supported by this server (idlm); leave it out or use n", param="best_of",
                       code="unsupported_parameter")


# --------------------------------------------------------------------------- request bodies

Int64 = Annotated[int, Field(ge=-(2**63), le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None  # 0 or -1 = off (vLLM: -1)
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    best_of: int | None = None  # checked by check_unsupported (only 1 or n)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    user: str | None = None
    # idlm decoder options
    stride: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    draft: Literal[HTTP_DRAFT_MODES] | None = None  # type: ignore[valid-type]
    draft_temperature: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    verify_alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    verification: Literal[VERIFICATIONS] | None = None  # type: ignore[valid-type]


class CompletionRequest(_Common):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: str | list[TextPart]
    name: str | None = None
    tool_call_id: str | None = None

    def as_template_message(self) -> dict:
        c = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        m = {"role": self.role, "content": c}
        for k in ("name", "tool_call_id"):
            if getattr(self, k) is not None:
                m[k] = getattr(self, k)
        return m


class ChatRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered through the chat template."""
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    tokens: list[TokenId]


# --------------------------------------------------------------------------- request -> SamplingParams


def to_sampling_params(req: CompletionRequest | ChatRequest, prompt_len: int, max_len: int, *, server_stride: int,
                       defaults: dict, default_max_tokens: int | None) -> list[SamplingParams]:
    """The `SamplingParams` of each of the request's n choices for one prompt of `prompt_len` tokens.

    `defaults`: the server's per-request defaults (temperature, top_k, top_p, verify_alpha, draft,
    draft_temperature, verification);
    `default_max_tokens`: None = what is left of the context, capped at CHAT_DEFAULT_MAX_TOKENS.
    Raises ApiError (400) naming the field.
    """
    if req.stride is not None and req.stride != server_stride:
        raise ApiError(400, f"stride={req.stride} is not supported: this server decodes with stride "
                            f"{server_stride} (send {server_stride} or leave it out)", param="stride")
    is_completion = isinstance(req, CompletionRequest)
    if prompt_len >= max_len:
        raise ApiError(400, f"the prompt has {prompt_len} tokens but the model's context is {max_len} tokens",
                       param="prompt" if is_completion else "messages", code="context_length_exceeded")
    max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens or min(CHAT_DEFAULT_MAX_TOKENS, max_len - prompt_len)
    if prompt_len + max_tokens > max_len:
        raise ApiError(400, f"prompt of {prompt_len} tokens + max_tokens {max_tokens} exceeds the model's "
                            f"context of {max_len} tokens", param="max_tokens", code="context_length_exceeded")
    if is_completion:
        logprobs = req.logprobs
        prompt_logprobs = req.logprobs if req.echo else None
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        prompt_logprobs = None
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    top_k = defaults.get("top_k", 0) if req.top_k is None else req.top_k
    kw = dict(temperature=defaults.get("temperature", 1.0) if req.temperature is None else req.temperature,
              top_k=0 if top_k == -1 else top_k,
              top_p=defaults.get("top_p", 1.0) if req.top_p is None else req.top_p,
              max_tokens=max_tokens, stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
              draft=defaults.get("draft", "sample") if req.draft is None else req.draft,
              draft_temperature=defaults.get("draft_temperature") if req.draft_temperature is None
              else req.draft_temperature,
              verify_alpha=defaults.get("verify_alpha", 1.0) if req.verify_alpha is None else req.verify_alpha,
              verification=defaults.get("verification", "block") if req.verification is None else req.verification,
              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    out = []
    for i in range(req.n):
        seed = None if req.seed is None else (req.seed + i) % 2**64
        try:
            out.append(SamplingParams(seed=seed, **kw))
        except ConfigError as e:
            raise ApiError(400, str(e), param=e.param) from None
    return out


# --------------------------------------------------------------------------- responses


def envelope(rid: str, obj: str, model: str, choices: list, usage_: dict | None = None) -> dict:
    """A response or stream chunk: {id, object, created, model, choices[, usage]}."""
    d = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        d["usage"] = usage_
    return d


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """idlm's finish reasons as OpenAI's: "stop" (EOS / stop id / stop string, or an abort), "length"."""
    return "length" if reason == "length" else ("stop" if reason in ("stop", "abort") else reason)


def _finite(lp: float | None) -> float | None:
    """JSON has no -inf: a token of probability 0 gets the most negative float instead (as vLLM does)."""
    if lp is None or lp != lp:
        return None
    return -9999.0 if math.isinf(lp) and lp < 0 else float(lp)


class TokenText:
    """Token strings and bytes for logprobs, cached per id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._text: dict[int, str] = {}

    def text(self, t: int) -> str:
        s = self._text.get(t)
        if s is None:
            s = self._text[t] = self.tok.decode([t])
        return s

    def bytes(self, t: int) -> list[int]:
        return list(self.tok.token_bytes(t))


def completion_logprobs(tt: TokenText, token_ids: list[int], logprobs: list[float | None],
                        top: list[list[tuple[int, float]]], offset0: int = 0) -> dict:
    """The legacy completions `logprobs` block over `token_ids` (prompt and/or generated tokens).
    A position whose logprob is None (the first prompt token) has null `top_logprobs` too."""
    tokens = [tt.text(t) for t in token_ids]
    offsets, o = [], offset0
    for s in tokens:
        offsets.append(o)
        o += len(s)
    tops = []
    for t, lp, alts in zip(token_ids, logprobs, top):
        if lp is None:
            tops.append(None)
            continue
        d = {tt.text(a): _finite(v) for a, v in alts}
        d.setdefault(tt.text(t), _finite(lp))  # the chosen token is always there (OpenAI: up to k + 1 entries)
        tops.append(d)
    return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp in logprobs], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(tt: TokenText, token_ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]
                  ) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(t: int, lp: float) -> dict:
        return {"token": tt.text(t), "logprob": _finite(lp), "bytes": tt.bytes(t)}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, v) for a, v in alts]}
                        for t, lp, alts in zip(token_ids, logprobs, top)]}


def top_or_empty(out, n0: int, n1: int) -> list[list[tuple[int, float]]]:
    """out.top_logprobs[n0:n1], or empty lists where the engine recorded none."""
    top = out.top_logprobs[n0:n1]
    return top if len(top) == n1 - n0 else [[] for _ in range(n1 - n0)]
