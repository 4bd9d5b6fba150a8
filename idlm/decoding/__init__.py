"""Decoding: sampling parameters, the filtered distribution p̃ and samplers, raw logprobs, and the decoders.

Decoders by name: `ar` (one token per forward), and the diffusion decoders `isd`, `risd` and `sdar`
(SPEC §4–§6), which need a MASK token in the model's vocabulary.
"""

from __future__ import annotations

from idlm.errors import ConfigError

DECODERS = ("ar", "isd", "risd", "sdar")
DIFFUSION_DECODERS = ("isd", "risd", "sdar")
VERIFICATIONS = ("block", "token")  # SamplingParams.verification (here: the command line reads it without torch)


def resolve_mask_token(decoder: str, model_config, tokenizer=None) -> int | None:
    """The MASK token id a decoder needs (None for `ar`); a clear error when the model has none."""
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if decoder not in DIFFUSION_DECODERS:
        return None
    mask = model_config.mask_token_id
    if mask is None and tokenizer is not None:
        mask = tokenizer.mask_token_id
    if mask is None or not 0 <= mask < model_config.vocab_size:
        raise ConfigError(
            f"decoder {decoder!r} needs a MASK token, but this model has none (no mask_token_id in its "
            f"config.json and no <|MASK|> token in its tokenizer): use --decoder ar, or an I-DLM checkpoint"
        )
    return mask


def make_decoder(name: str, stride: int, model_config, tokenizer=None, threshold: float = 0.9,
                 branches: bool = False, guesses: int = 0, guess_rows: int | None = None):
    """A decoder by name: `ar`; `isd` / `risd` with stride N (SPEC §4–5; `branches`: with rejection
    branches, `guesses`: and that many guessed corrections per draft, `guess_rows`: the rows of each guessed
    group, None: N − 1); `sdar` with block size `stride` and
    confidence threshold `threshold` (SPEC §6)."""
    if (branches or guesses) and name not in ("isd", "risd"):
        raise ConfigError(f"rejection branches are for the isd and risd decoders, not {name!r}")
    mask = resolve_mask_token(name, model_config, tokenizer) if name != "risd" else None
    if name == "ar":
        from idlm.decoding.ar import ARDecoder

        return ARDecoder()
    if name in ("isd", "risd"):
        from idlm.decoding.isd import ISDDecoder

        if name == "risd":  # the adapter brings its own MASK embedding; a MASK id is optional
            mask = model_config.mask_token_id if model_config.mask_token_id is not None else (
                tokenizer.mask_token_id if tokenizer is not None else None)
        return ISDDecoder(stride, mask, lora=name == "risd", branches=branches, guesses=guesses,
                           guess_rows=guess_rows)
    from idlm.decoding.sdar import SDARDecoder

    return SDARDecoder(stride, mask, threshold)
