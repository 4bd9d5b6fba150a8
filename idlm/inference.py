"""One inference setup: model name or path -> model, tokenizer, decoder choice and its R-ISD adapter.

Why it exists: `idlm.LLM`, `idlm serve` and the `generate` / `eval` / `bench` commands all need the
same rules, so they are written once:

- device and dtype: CUDA (bf16) when available, else CPU (float32), unless given;
- the decoder: given, or by default the best exact one the model supports — lossless R-ISD for a
  model with a known adapter (`registry.RISD_ADAPTERS`, e.g. SmolLM2-135M-Instruct) or a given one,
  ISD for an I-DLM (a model with a MASK token), plain AR otherwise;
- R-ISD needs an adapter: the one given, else the model's known adapter; none is a clear error; an
  adapter only makes sense with R-ISD; an adapter built for another base (shapes, vocabulary) or
  missing its MASK embedding is refused by name when it is loaded (`LoRAAdapter.load`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from idlm.decoding import DECODERS
from idlm.errors import ConfigError


@dataclass
class Inference:
    model: object
    tokenizer: object
    decoder: str
    adapter: object | None  # the loaded LoRAAdapter (R-ISD) or None
    adapter_name: str | None  # what it was loaded from (a name or a path)
    device: str
    dtype: torch.dtype


def default_device(device: str | None = None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine", param="device")
    return str(device)


def default_dtype(device: str, dtype=None):
    return dtype if dtype is not None else ("bfloat16" if str(device).startswith("cuda") else "float32")


def choose_decoder(decoder: str | None, model_name: str, model_config, tokenizer, lora: str | None
                   ) -> tuple[str, str | None]:
    """(decoder, adapter name or path to load, or None) by the rules of this module's docstring."""
    from idlm.models import registry

    if decoder is not None and decoder not in DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}", param="decoder")
    known = registry.risd_adapter(str(model_name))
    if decoder is None:
        has_mask = model_config.mask_token_id is not None or (tokenizer is not None and tokenizer.mask_token_id
                                                               is not None)
        decoder = "risd" if lora or known else ("isd" if has_mask else "ar")
    if decoder != "risd":
        if lora:
            raise ConfigError(f"a LoRA adapter is only used by the risd decoder, not {decoder!r}", param="lora")
        return decoder, None
    adapter = lora or known
    if adapter is None:
        raise ConfigError(f"the risd decoder needs a gated LoRA adapter and none is known for {model_name!r}: "
                          f"give one (--lora PATH; idlm serve: --lora-paths PATH; known: "
                          f"{registry.risd_adapters_text()})", param="lora")
    return decoder, adapter


def load_for_inference(model: str | None = None, decoder: str | None = None, lora: str | None = None,
                       device: str | None = None, dtype=None) -> Inference:
    """Load a model for decoding with the rules above (errors are ConfigError / CheckpointError)."""
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained, resolve_model_path
    from idlm.models.registry import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    device = default_device(device)
    net, tok = load_pretrained(model, dtype=default_dtype(device, dtype), device=device)
    decoder, adapter_name = choose_decoder(decoder, model, net.config, tok, lora)
    adapter = None
    if adapter_name is not None:
        adapter = LoRAAdapter.load(resolve_model_path(adapter_name), net.config, device=device, dtype=net.dtype)
    return Inference(net, tok, decoder, adapter, adapter_name, device, net.dtype)
