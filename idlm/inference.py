"""One inference setup: model name or path -> model, tokenizer, decoder choice and its R-ISD adapter.

Why it exists: `idlm.LLM`, `idlm serve` and the `generate` / `eval` / `bench` commands all need the
same rules, so they are written once:

- device and dtype: CUDA (bf16) when available, else CPU (float32), unless given;
- CPU threads: `threads`, else `$IDLM_NUM_THREADS`, else 1 for a model under 50 M parameters (a small
  model's matmuls are too small to split, and on a busy machine extra threads only wait on each other:
  ISD decode of idlm-tiny is 10-20x slower with torch's default) and min(physical cores, 8) above;
- the decoder: given, or by default the best exact one the model supports — lossless R-ISD for a
  model with a known adapter (`registry.RISD_ADAPTERS`, e.g. SmolLM2-135M-Instruct) or a given one,
  ISD for an I-DLM (a model with a MASK token), plain AR otherwise;
- R-ISD needs an adapter: the one given, else the model's known adapter; none is a clear error; an
  adapter only makes sense with R-ISD; an adapter built for another base (shapes, vocabulary) or
  missing its MASK embedding is refused by name when it is loaded (`LoRAAdapter.load`).
"""

from __future__ import annotations

import os
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
    threads: int | None = None  # torch's CPU threads set for decoding (None: not on CPU)


SMALL_MODEL_PARAMS = 50_000_000  # below this, one CPU thread decodes fastest
MAX_AUTO_THREADS = 8
THREADS_ENV = "IDLM_NUM_THREADS"


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads counted once; Linux /proc/cpuinfo, else os.cpu_count)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            phys = "0"
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    phys = value
                elif key == "core id":
                    cores.add((phys, value))
    except OSError:
        pass
    return max(1, min(usable, len(cores) or usable))


def default_threads(num_params: int, threads: int | None = None) -> int:
    """CPU threads for decoding: `threads`, else $IDLM_NUM_THREADS, else 1 below 50 M parameters and
    min(physical cores, 8) above."""
    if threads is None and os.environ.get(THREADS_ENV, "").strip():
        text = os.environ[THREADS_ENV].strip()
        try:
            threads = int(text)
        except ValueError:
            raise ConfigError(f"{THREADS_ENV}={text!r} must be a positive integer", param="threads") from None
        if threads < 1:
            raise ConfigError(f"{THREADS_ENV}={text!r} must be a positive integer", param="threads")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads {threads!r} must be a positive integer", param="threads")
        return threads
    return 1 if num_params < SMALL_MODEL_PARAMS else min(physical_cores(), MAX_AUTO_THREADS)


def set_cpu_threads(model, threads: int | None = None) -> int:
    """Set torch's intra-op threads for CPU decoding of `model` (`default_threads`); returns the count."""
    n = default_threads(sum(p.numel() for p in model.parameters()), threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


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
                       device: str | None = None, dtype=None, threads: int | None = None) -> Inference:
    """Load a model for decoding with the rules above (errors are ConfigError / CheckpointError).
    On CPU it also sets torch's thread count (`threads`, else $IDLM_NUM_THREADS, else by model size)."""
    from idlm.layers.lora import LoRAAdapter
    from idlm.models.loader import load_pretrained, resolve_model_path
    from idlm.models.registry import DEFAULT_MODEL

    model = model or DEFAULT_MODEL
    device = default_device(device)
    if threads is not None or os.environ.get(THREADS_ENV, "").strip():
        default_threads(0, threads)  # a bad value is an error before the model loads
    net, tok = load_pretrained(model, dtype=default_dtype(device, dtype), device=device)
    decoder, adapter_name = choose_decoder(decoder, model, net.config, tok, lora)
    adapter = None
    if adapter_name is not None:
        adapter = LoRAAdapter.load(resolve_model_path(adapter_name), net.config, device=device, dtype=net.dtype)
    n_threads = set_cpu_threads(net, threads) if torch.device(device).type == "cpu" else None
    return Inference(net, tok, decoder, adapter, adapter_name, device, net.dtype, n_threads)
