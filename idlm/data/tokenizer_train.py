"""Train the byte-level BPE tokenizer of a from-scratch model, with a chat template and a MASK token.

Why our own tokenizer: a small model trained on Python source and arithmetic wastes capacity on a
150k vocabulary; 8k–16k byte-level BPE tokens trained on the corpus fit it (and token ids fit
uint16 shards). Choices:

- Byte-level (GPT-2 alphabet as the initial alphabet): every string encodes, nothing is <unk>.
- Qwen2's split regex before BPE: words, punctuation runs, newline runs and indentation runs are
  separate pieces, and every digit is its own piece, so numbers are written digit by digit — the
  representation that makes carries in multi-digit arithmetic learnable.
- Special tokens first, at fixed ids: `<|endoftext|>` 0 (document separator, pad),
  `<|im_start|>` 1, `<|im_end|>` 2 (end of a chat turn, the eos), `<|MASK|>` 3 (I-DLM drafts).
- ChatML template (as Qwen's, without a default system prompt): `<|im_start|>role\\ncontent<|im_end|>\\n`
  per message, `<|im_start|>assistant\\n` as the generation prompt.

The directory is written by `idlm.tokenizer.Tokenizer.save` plus generation_config.json (eos ids
[<|im_end|>, <|endoftext|>]), so `Tokenizer.from_dir` and transformers' AutoTokenizer both load it.
"""

from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from idlm.data import DataError
from idlm.data.io import write_json
from idlm.errors import ConfigError
from idlm.tokenizer import Tokenizer

ENDOFTEXT, IM_START, IM_END, MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, MASK)  # ids 0, 1, 2, 3
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 40  # bytes + specials + a few merges
MAX_VOCAB = 65536  # shards store uint16 ids

# Qwen2's pre-tokenizer split: like GPT-4's, but \p{N} one digit at a time
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def new_backend() -> Backend:
    """An untrained byte-level BPE pipeline (split regex → byte-level; byte-level decoder)."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def wrap_backend(backend: Backend) -> Tokenizer:
    """Our Tokenizer around a trained backend: specials, eos/pad, stop ids, MASK id, chat template."""
    for i, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != i:
            raise DataError(f"trained tokenizer has {token} at id {backend.token_to_id(token)}, expected {i}")
    return Tokenizer(
        backend,
        special_tokens={"eos_token": IM_END, "pad_token": ENDOFTEXT},
        chat_template=CHAT_TEMPLATE,
        stop_ids=[SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        mask_token_id=SPECIAL_TOKENS.index(MASK),
    )


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int = 12000,
    *,
    min_frequency: int = 2,
    progress: bool = False,
) -> Tokenizer:
    """Train on `texts`, save into `out_dir` (tokenizer.json, tokenizer_config.json, generation_config.json).

    The vocabulary can come out smaller than `vocab_size` when the texts support fewer merges.
    """
    if type(vocab_size) is not int or not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"vocab_size must be an int in [{MIN_VOCAB}, {MAX_VOCAB}], got {vocab_size!r}")
    if type(min_frequency) is not int or min_frequency < 1:
        raise ConfigError(f"min_frequency must be a positive int, got {min_frequency!r}")
    backend = new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    backend.train_from_iterator(texts, trainer)
    tok = wrap_backend(backend)
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str) -> None:
    """Tokenizer.save plus generation_config.json with the stop ids (eos first)."""
    tok.save(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # Tokenizer.save leaves mkstemp's 0600
        os.chmod(os.path.join(out_dir, name), 0o644)
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "eos_token_id": [SPECIAL_TOKENS.index(IM_END), SPECIAL_TOKENS.index(ENDOFTEXT)],
        "pad_token_id": SPECIAL_TOKENS.index(ENDOFTEXT),
    })


def plain_text_backend(tok: Tokenizer) -> Backend:
    """A copy of the backend that encodes special-token strings found in text as ordinary text.

    Source files contain literal "<|endoftext|>" strings (tokenizer code does); encoding them as
    the control token would teach the model to end documents in the middle of a string literal.
    """
    backend = Backend.from_str(tok.backend.to_str())
    backend.encode_special_tokens = True
    return backend
