"""One tokenizer for training, decoding and serving, without depending on transformers.

A checkpoint directory (tokenizer.json + tokenizer_config.json + friends) and a GGUF file both
become the same `Tokenizer`: a thin wrapper around the `tokenizers` library that also knows the
special tokens, the stop ids and the chat template, and renders that template the way
transformers' `apply_chat_template` does. `save()` writes files transformers' `AutoTokenizer`
loads back unchanged, so a model trained here can be used elsewhere. `IncrementalDetokenizer`
turns a stream of generated ids into text deltas for the server without splitting UTF-8 characters.
"""

from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from idlm.atomic import atomic_write_text
from idlm.errors import TokenizerError

_MASK_TOKENS = ("<|MASK|>", "<|mask|>")
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# llama.cpp `tokenizer.ggml.pre` name -> split regex applied before a regex-less ByteLevel
_GGUF_SPLITS = {"qwen2": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _read_json(path: str) -> dict[str, Any] | None:
    """An optional JSON side file: None when absent, TokenizerError naming it when unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _write_atomic(path: str, text: str) -> None:
    """Write `text` to a temp file next to `path`, then rename it over `path` (`idlm.atomic`)."""
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise TokenizerError(f"cannot write {path}: {e}") from e


def _token_str(value: Any) -> str | None:
    """A special token given as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    """An eos_token_id given as an int, a list of ints or nothing."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in values if type(v) is int]


def _chat_template_from_config(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template refused the conversation: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"the chat template is not valid Jinja: {e}") from e


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate a conversation; drop None-valued keys like transformers does."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TokenizerError(f"message {i} needs a string {key!r}, got {m.get(key)!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer named by `tokenizer.ggml.pre`, as a `tokenizers` pipeline."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _GGUF_SPLITS)
    if pre == "smollm":  # HF SmolLM2's own pipeline: every digit on its own, then GPT-2 byte-level
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GGUF_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_GGUF_SPLITS[pre]), "isolated"), byte_level])
    return byte_level


def _gguf_backend(meta: Mapping[str, Any]) -> _Backend:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is unsupported: only 'gpt2' (byte-level BPE) is read")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    pairs = []
    for m in merges:
        cut = m.find(" ", 1)  # like llama.cpp: the first part may itself start with a space
        if cut < 0:
            raise TokenizerError(f"GGUF merge {m!r} is not of the form 'a b'")
        pairs.append((m[:cut], m[cut + 1 :]))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta.get("tokenizer.ggml.token_type") or []
    for kind, special in ((_GGUF_CONTROL, True), (_GGUF_USER_DEFINED, False)):
        added = [AddedToken(tokens[i], special=special, normalized=False) for i, t in enumerate(types) if t == kind]
        (backend.add_special_tokens if special else backend.add_tokens)(added)
    return backend


@functools.lru_cache(maxsize=1)
def _byte_level_inverse() -> dict[str, int]:
    """Byte-level BPE's alphabet read backwards: the printable character standing for each byte -> the byte.
    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to code points 256 + i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens, stop ids and a chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        stop_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        mask_token_id: int | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self._tok = backend
        self._added: frozenset[int] | None = None  # ids of added (special) tokens, read on first use
        self.special_tokens = {k: (special_tokens or {}).get(k) for k in _SPECIAL_KEYS}
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        bos = self._special_id("bos_token")
        self._bos_id = bos if bos is not None else bos_token_id
        eos = [i for i in (self._special_id("eos_token"), *stop_ids) if i is not None]
        self._eos_ids = list(dict.fromkeys(eos))  # ordered, primary first
        if mask_token_id is None:
            mask_token_id = next((i for i in map(self.token_to_id, _MASK_TOKENS) if i is not None), None)
        self._mask_id = mask_token_id

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json and the optional HF side files of a checkpoint directory."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerError(f"tokenizer directory not found: {path}")
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise TokenizerError(f"tokenizer file not found: {tok_file}")
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception with a serde message
            raise TokenizerError(f"cannot parse {tok_file}: {e}") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        smap = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
        gen = _read_json(os.path.join(path, "generation_config.json")) or {}
        model_cfg = _read_json(os.path.join(path, "config.json")) or {}
        special = {k: _token_str(cfg.get(k)) or _token_str(smap.get(k)) for k in _SPECIAL_KEYS}
        template = _chat_template_from_config(cfg.get("chat_template"))
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            try:
                with open(jinja_file, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read {jinja_file}: {e}") from e
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # no explicit flag: follow what tokenizer.json's post-processor does
            add_bos = _post_processor_adds_bos(backend, special["bos_token"])
        max_len = cfg.get("model_max_length")
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=bool(add_bos),
            chat_template=template,
            stop_ids=_id_list(gen.get("eos_token_id")) + _id_list(model_cfg.get("eos_token_id")),
            bos_token_id=next(iter(_id_list(model_cfg.get("bos_token_id"))), None),
            mask_token_id=next(iter(_id_list(model_cfg.get("mask_token_id"))), None),
            model_max_length=int(max_len) if isinstance(max_len, (int, float)) else None,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (see `idlm.models.gguf.gguf_metadata`)."""
        backend = _gguf_backend(meta)
        tokens = meta["tokenizer.ggml.tokens"]

        def token(name: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{name}_token_id")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        max_len = meta.get(f"{meta.get('general.architecture')}.context_length")
        return cls(
            backend,
            special_tokens={"bos_token": token("bos"), "eos_token": token("eos"),
                            "pad_token": token("padding"), "unk_token": token("unknown")},
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            stop_ids=[i for i in stops if isinstance(i, int)],
            mask_token_id=meta.get("tokenizer.ggml.mask_token_id"),
            model_max_length=int(max_len) if isinstance(max_len, int) else None,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json that transformers' AutoTokenizer loads."""
        path = os.fspath(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise TokenizerError(f"cannot create tokenizer directory {path}: {e}") from e
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        }
        if self.model_max_length is not None:
            cfg["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        _write_atomic(os.path.join(path, "tokenizer.json"), self._backend_for_saving().to_str(pretty=True))
        cfg_text = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
        _write_atomic(os.path.join(path, "tokenizer_config.json"), cfg_text)

    def _backend_for_saving(self) -> _Backend:
        """A copy whose post-processor adds exactly what encode(add_special_tokens=True) adds.

        transformers (v5) ignores add_bos_token when a tokenizer.json exists and trusts its
        post-processor, so the BOS behaviour has to live there.
        """
        post = self._tok.post_processor
        adds = post is not None and post.num_special_tokens_to_add(False) > 0
        wants_bos = self.add_bos_token and self._bos_id is not None
        if not adds and not wants_bos:
            return self._tok
        copy = _Backend.from_str(self._tok.to_str())
        bos = f"{self.id_to_token(self._bos_id)}:0 " if wants_bos else ""
        copy.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A:0", pair=f"{bos}$A:0 $B:1",
            special_tokens=[(self.id_to_token(self._bos_id), self._bos_id)] if wants_bos else [],
        )
        return copy

    # -- encoding ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS is prepended when add_bos_token is set."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain-text prompt as the model expects it: with the special tokens the tokenizer adds (a BOS
        for Llama-style models). The one prompt encoding of `idlm.LLM`, `idlm serve` and the CLI."""
        return self.encode(text, add_special_tokens=True)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise TokenizerError(f"cannot decode a negative token id ({min(ids)})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (the `bytes` of OpenAI logprobs): a byte-level BPE piece mapped
        back through the byte alphabet, a SentencePiece byte-fallback piece (<0xNN>) as its byte, special
        tokens and anything else as the UTF-8 of the token decoded on its own."""
        piece = self.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added_ids():
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            if m:
                return bytes([int(m.group(1), 16)])
            if "ByteLevel" in repr(self._tok.decoder):
                table = _byte_level_inverse()
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
        return self.decode([token_id]).encode("utf-8", "replace")

    def add_mask_token(self, token: str = "<|MASK|>") -> int:
        """Give a tokenizer without a MASK token one (a special token at the next free id) and return its
        id; a tokenizer that has one keeps it. Saved with the tokenizer (and found again by its name)."""
        from tokenizers import AddedToken

        if self._mask_id is not None:
            return self._mask_id
        if token not in _MASK_TOKENS:
            raise ValueError(f"the MASK token is one of {_MASK_TOKENS}, not {token!r}")
        if self.token_to_id(token) is None:
            self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            self._added = None
        self._mask_id = self.token_to_id(token)
        return self._mask_id

    def _added_ids(self) -> frozenset[int]:
        if self._added is None:
            self._added = frozenset(self._tok.get_added_tokens_decoder())
        return self._added

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id)) if token_id >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def backend(self) -> _Backend:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    # -- special ids ---------------------------------------------------------------------------

    def _special_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self._eos_ids)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def mask_token_id(self) -> int | None:
        return self._mask_id

    # -- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the chat template exactly like transformers' apply_chat_template(tokenize=False)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template in tokenizer_config.json, "
                                 "chat_template.jinja or GGUF tokenizer.chat_template)")
        template = _compile_template(self.chat_template)
        messages = _check_messages(messages)
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables = {"tools": None, "documents": None, **variables, **kwargs}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TokenizerError:
            raise
        except Exception as e:  # jinja errors, or a template doing arithmetic on a wrong type
            raise TokenizerError(f"the chat template failed to render: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the conversation and encode it (the template writes any BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _post_processor_adds_bos(backend: _Backend, bos: str | None) -> bool:
    bos_id = None if bos is None else backend.token_to_id(bos)
    if bos_id is None or backend.post_processor is None:
        return False
    try:
        return backend.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    except Exception:
        return False


class IncrementalDetokenizer:
    """Turn generated ids into text deltas, one token at a time.

    Only a short window of recent ids is decoded (vLLM/TGI's prefix/read offsets): `_ids[:_read]`
    were already emitted and stay as context, so decoders that treat a first token specially still
    agree; `_ids[_read:]` are not emitted yet. Text is emitted only when the window's text does not
    end in U+FFFD, i.e. no UTF-8 character is left half-finished; the window then slides forward.
    (A run of invalid bytes holds the window open until a clean character follows, as in vLLM.)
    With skip_special_tokens, special tokens never enter the window: they add no text, and a long run
    of them (a model past its EOS under ignore_eos) must not grow the decoded window without bound.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._skip_ids = ({i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}
                          if skip_special_tokens else set())
        self._ids: list[int] = []
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly "")."""
        return self.add_many((token_id,))

    def add_many(self, token_ids) -> str:
        """Append several ids (a decode step's committed tokens); return the text they complete (possibly
        ""), exactly what adding them one by one returns in all. Two decodes for the chunk when its text
        ends on a whole character (the common case), not two per id; else one id at a time."""
        new = []
        for token_id in token_ids:
            token_id = int(token_id)
            if token_id < 0:
                raise TokenizerError(f"cannot decode a negative token id ({token_id})")
            if token_id not in self._skip_ids:
                new.append(token_id)
        if len(new) == 1:  # the common case (an AR step, a text flush of one id)
            return self._append(new) or ""
        if len(new) > 1:
            before = len(self._ids)
            text = self._append(new)
            if text is not None:
                return text
            del self._ids[before:]  # held back (an unfinished character): as `add` would, one id at a time
        return "".join(t for t in (self._append([i]) for i in new) if t)

    def _append(self, ids: list[int]) -> str | None:
        """Add ids to the window: the text they complete, with the window slid past them; or None, ids kept
        in the window (held back), when the window's text is no longer than what was emitted or ends in an
        unfinished character."""
        self._ids += ids
        done, full = self._decode(self._ids[: self._read]), self._decode(self._ids)
        if len(full) <= len(done) or full.endswith("\ufffd"):
            return None
        del self._ids[: self._read]
        self._read = len(self._ids)
        return full[len(done):]

    def flush(self) -> str:
        """End of stream: return whatever is held back (an unfinished character decodes as U+FFFD)."""
        done, full = self._decode(self._ids[: self._read]), self._decode(self._ids)
        self._ids, self._read = [], 0
        return full[len(done) :]
